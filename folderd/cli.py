"""The `folderd` command: run, once, status, check, plan, retry.

Exit codes: 0 success; 1 `once` finished with failed files, or `check` found problems;
2 configuration or usage error; 3 `once` stopped because the API refused the key or
credits ran out with work pending; 4 the state or a folder could not be written (disk
full, I/O error, another daemon holds the state directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from folderd import __version__, logs
from folderd.config import DEFAULT_CONFIG_PATH, Config, load, read_api_key
from folderd.errors import ConfigError, StateError
from folderd.watch import choose_method


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folderd", description="Watched-folder image upscaler (Clipdrop API or local engine).")
    parser.add_argument("--version", action="version", version=f"folderd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "run the daemon in the foreground until SIGTERM/SIGINT",
        "once": "take every file now in the inboxes, finish every job, exit",
        "status": "show queued, in-flight, delivered and failed jobs (read-only)",
        "check": "validate the configuration and the environment",
        "plan": "dry run: what would happen to each file in the inboxes, and its estimated credits",
        "retry": "move failed files back into their inbox (and remove their error sidecars)",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("-c", "--config", help=f"config file (default: $FOLDERD_CONFIG, then {DEFAULT_CONFIG_PATH})")
        if name in ("status", "plan"):
            command.add_argument("--json", action="store_true", help="machine-readable output (a stable format)")
        if name == "retry":
            command.add_argument("--folder", help="only this folder")
            command.add_argument("files", nargs="*", metavar="FILE", help="failed files (relative path or name); default: all")
        if name in ("run", "once"):
            command.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")
            command.add_argument("--log-format", choices=["auto", "console", "json"], help="override log.format")
    return parser


def config_path(given: str | None) -> str:
    return given or os.environ.get("FOLDERD_CONFIG") or DEFAULT_CONFIG_PATH


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    path = config_path(arguments.config)
    try:
        config = load(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if arguments.command in ("run", "once"):
        level = arguments.log_level or config.log_level
        if arguments.command == "once" and not arguments.log_level and level in ("debug", "info") and sys.stderr.isatty():
            level = "warning"  # on a terminal the progress bar tells the story; info lines would break it
        logs.configure(level, arguments.log_format or config.log_format)
        from folderd.daemon import Daemon

        return Daemon(config, once=arguments.command == "once").run()
    if arguments.command == "status":
        return _status(config, arguments.json)
    if arguments.command == "plan":
        from folderd.plan import plan, render

        entries = plan(config)
        print(json.dumps(entries, indent=2) if arguments.json else render(entries))
        return 0
    if arguments.command == "retry":
        from folderd.retry import retry

        moved, problems = retry(config, arguments.folder, arguments.files)
        for line in moved:
            print(f"moved back: {line}")
        for problem in problems:
            print(f"folderd retry: {problem}", file=sys.stderr)
        if not moved and not problems:
            print("no failed files")
        return 1 if problems else 0
    return _check(config)


def _status(config: Config, as_json: bool) -> int:
    from folderd.status import collect, render

    try:
        document = collect(config)
    except StateError as error:
        print(f"folderd status: {error}", file=sys.stderr)
        return 4
    if as_json:
        print(json.dumps(document, indent=2, default=str))
    else:
        print(render(document))
    return 0


def _writable_or_creatable(path: Path) -> str | None:
    """Why `path` cannot be used as a folder, or None if it can."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path} cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user" if probe == path else f"{path} does not exist and {probe} is not writable to create it"
    return None


def _check(config: Config) -> int:
    problems: list[str] = []
    notes: list[str] = []
    state_problem = _writable_or_creatable(config.state_dir)
    if state_problem:
        problems.append(f"state_dir: {state_problem}")
    for rule in config.folders:
        for key in ("inbox", "outbox", "done", "failed"):
            problem = _writable_or_creatable(getattr(rule, key))
            if problem:
                problems.append(f"folder {rule.name}: {key}: {problem}")
        method, why = choose_method(rule)
        notes.append(f"folder {rule.name}: {rule.backend}, watch {method} ({why})")
    if config.uses_clipdrop():
        try:
            key, source = read_api_key(config.clipdrop)
        except ConfigError as error:
            problems.extend(error.problems)
        else:
            if key is None:
                users = ", ".join(rule.name for rule in config.folders if rule.backend == "clipdrop")
                problems.append(f"folders {users} use clipdrop but there is {source}")
            else:
                notes.append(f"API key: from {source}")
    print(f"{config.path}: configuration valid, {len(config.folders)} folder(s)")
    for note in notes:
        print(f"  {note}")
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print("no problems found")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
