"""Load and validate folderd's YAML configuration.

The schema is data (`GLOBAL_KEYS`, `CLIPDROP_KEYS`, `FOLDER_KEYS`): every option has a
type, a default, a description and an example. Loading collects every problem before
giving up, each named by file, line and key path (`folders[1].target.scale: must be > 0`),
then runs the checks that need the whole file (inbox != outbox, folders not nested).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from folderd.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/folderd/config.yaml"
CREDENTIAL_NAME = "clipdrop_api_key"

# Files that operating systems, NAS boxes, sync tools and office programs leave behind,
# and the names partial downloads/copies go by. Dot-files cover .DS_Store, ._* (macOS
# resource forks), .stfolder, .syncthing.* and rsync's temporary names.
BUILTIN_IGNORES = (
    ".*",
    "~$*",
    "*.tmp",
    "*.temp",
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.download",
    "*.filepart",
    "*.!sync",
    "Thumbs.db",
    "desktop.ini",
    "@eaDir",
    "#recycle",
    "#snapshot",
    "$RECYCLE.BIN",
    "System Volume Information",
    "lost+found",
)

DEFAULT_INCLUDE = (
    "*.jpg", "*.jpeg", "*.jpe", "*.png", "*.webp", "*.tif", "*.tiff",
    "*.bmp", "*.gif", "*.heic", "*.heif", "*.avif",
)


# --------------------------------------------------------------------------- values

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Given a number of seconds or a string like `500ms`, `5s`, `2m`, `1h`, return seconds.

    Raise ValueError for anything else, or for a negative value.
    """
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 5s, 500ms or 2m")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"must be a duration such as 5s, 500ms or 2m, not {value!r}")


@dataclass(frozen=True)
class Target:
    """How big the output should be. Exactly one shape is set."""

    scale: float | None = None
    width: int | None = None
    height: int | None = None
    long_edge: int | None = None
    fit: str = "contain"  # contain | exact (only with width and height)

    def describe(self) -> str:
        if self.scale is not None:
            return f"scale {self.scale:g}"
        if self.long_edge is not None:
            return f"long edge {self.long_edge}"
        if self.width is not None and self.height is not None:
            return f"{self.width}x{self.height} ({self.fit})"
        if self.width is not None:
            return f"width {self.width}"
        return f"height {self.height}"


@dataclass(frozen=True)
class Budget:
    """Credit caps; None means no cap. `low_balance` warns before the account hits 402."""

    daily: Decimal | None = None
    monthly: Decimal | None = None
    low_balance: Decimal | None = None


@dataclass(frozen=True)
class FolderRule:
    """One watched inbox and what to do with the images dropped into it."""

    name: str
    inbox: Path
    outbox: Path
    failed: Path
    done: Path
    on_success: str
    backend: str
    strategy: str
    mode: str
    target: Target
    recursive: bool
    include: tuple[str, ...]
    ignore: tuple[str, ...]
    settle: float
    incomplete_timeout: float
    watch: str
    poll_interval: float
    rescan: float
    output_format: str
    jpeg_quality: int
    dedupe: bool = True
    budget: Budget = Budget()

    def recipe(self, width: int, height: int, strategy: str) -> str:
        """What makes two results interchangeable: same engine, size, strategy and format."""
        return f"{self.backend}|{strategy}|{width}x{height}|{self.output_format}"


@dataclass(frozen=True)
class ClipdropSettings:
    """How to reach the Clipdrop API and how hard to use it."""

    api_key_env: str
    api_key_file: Path | None
    base_url: str
    requests_per_minute: int
    burst: int
    poll_interval: float
    timeout: float
    max_attempts: int
    concurrency: int
    pause_retry: float
    retry_backoff: float = 1.0
    ambiguous_retries: int = 1
    budget: Budget = Budget()


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    path: Path
    state_dir: Path
    log_level: str
    log_format: str
    clipdrop: ClipdropSettings
    folders: tuple[FolderRule, ...]
    local_workers: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def folder(self, name: str) -> FolderRule | None:
        for rule in self.folders:
            if rule.name == name:
                return rule
        return None

    def uses_clipdrop(self) -> bool:
        return any(rule.backend == "clipdrop" for rule in self.folders)


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Option:
    """One configuration key: its check, default, description and an example."""

    check: Callable[[Any], Any]
    default: Any
    description: str
    example: Any
    required: bool = False


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, not {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"must be {bound}, not {value}")
        return value

    return check


def _duration(minimum: float = 0.0) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            raise ValueError(f"must be at least {minimum:g}s")
        return seconds

    return check


def _patterns(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError("must be a list of file name patterns such as ['*.jpg']")
    return tuple(value)


def _url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", value):
        raise ValueError(f"must be an http(s) URL without query, not {value!r}")
    return value.rstrip("/")


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError("must be a path")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"must be > 0, not {value!r}")
    return float(value)


GLOBAL_KEYS: dict[str, Option] = {
    "state_dir": Option(_path, None, "Where the ledger and lock live. Must be a local disk.", "/var/lib/folderd", required=True),
    "log": Option(lambda value: value, {}, "Logging: level (debug|info|warning|error) and format (auto|console|json).", {"level": "info", "format": "auto"}),
    "clipdrop": Option(lambda value: value, {}, "How to reach the Clipdrop API.", {"api_key_env": "CLIPDROP_API_KEY"}),
    "defaults": Option(lambda value: value, {}, "Any folder key; a folder's own keys win.", {"settle": "2s"}),
    "folders": Option(lambda value: value, None, "The watched folders.", [], required=True),
    "local_workers": Option(_integer(1, 64), os.cpu_count() or 1, "Images the local engine upscales at once.", 2),
}

LOG_KEYS: dict[str, Option] = {
    "level": Option(_choice("debug", "info", "warning", "error"), "info", "Least severe event logged.", "info"),
    "format": Option(_choice("auto", "console", "json"), "auto", "auto: console on a TTY, JSON lines otherwise.", "auto"),
}

CLIPDROP_KEYS: dict[str, Option] = {
    "api_key_env": Option(_string, "CLIPDROP_API_KEY", "Environment variable holding the API key.", "CLIPDROP_API_KEY"),
    "api_key_file": Option(_path, None, "File holding the API key (mode 0600). systemd's $CREDENTIALS_DIRECTORY/clipdrop_api_key wins over both.", "/etc/folderd/clipdrop_api_key"),
    "base_url": Option(_url, "https://clipdrop-api.co", "The API's base URL; the key is sent nowhere else.", "https://clipdrop-api.co"),
    "requests_per_minute": Option(_integer(1, 100_000), 60, "One budget shared by every call (submit, status, result).", 60),
    "burst": Option(_integer(1, 1000), 1, "Calls that may go back to back after an idle spell (1: none; more risks a 429 where the API counts a sliding window).", 1),
    "poll_interval": Option(_duration(0.05), 5.0, "How often to ask about a queued task when the API gives no eta.", "5s"),
    "timeout": Option(_duration(0.1), 120.0, "Longest wait for one HTTP response.", "120s"),
    "max_attempts": Option(_integer(1, 100), 6, "Tries of one call on transient faults (5xx, 429, resets) before the file fails.", 6),
    "concurrency": Option(_integer(1, 64), 8, "HTTP calls in flight at once, so latency does not waste the budget.", 8),
    "pause_retry": Option(_duration(0.05), 300.0, "After a 401/402/403, how long to wait before trying the key again.", "5m"),
    "ambiguous_retries": Option(_integer(0, 10), 1, "Times a paid call is sent again after it failed in a way that may have been charged (timeout or reset after sending).", 1),
    "retry_backoff": Option(_duration(0.01), 1.0, "First wait before retrying a transient fault; doubles each try (with jitter), at most 5m.", "1s"),
    "budget": Option(lambda value: value, {}, "Credit caps: daily, monthly (jobs wait, not fail), low_balance (warn below).", {"daily": 200, "monthly": 3000, "low_balance": 50}),
}

FOLDER_KEYS: dict[str, Option] = {
    "name": Option(_string, None, "Unique name, used in logs and status.", "scans", required=True),
    "inbox": Option(_path, None, "Where images are dropped.", "/srv/scans/inbox", required=True),
    "outbox": Option(_path, None, "Where results are delivered.", "/srv/scans/outbox", required=True),
    "failed": Option(_path, None, "Where originals that failed go, with NAME.error.json (default <inbox>/../failed).", "/srv/scans/failed"),
    "done": Option(_path, None, "Where originals go after success (default <inbox>/../done).", "/srv/scans/done"),
    "on_success": Option(_choice("archive", "delete"), "archive", "archive: move the original to done; delete: remove it once the result is safe.", "archive"),
    "backend": Option(_choice("clipdrop", "local"), "clipdrop", "clipdrop: the API; local: the embedded engine, offline and free.", "local"),
    "strategy": Option(_choice("smooth", "detailed"), "smooth", "smooth, or detailed (sharper; async only; costs 1 credit per output megapixel).", "smooth"),
    "mode": Option(_choice("auto", "sync", "async"), "auto", "auto: sync when the output fits 4096x4096, the input 16 MP and the strategy is smooth.", "auto"),
    "target": Option(lambda value: value, {"scale": 2}, "{scale: F} | {width: W} | {height: H} | {width: W, height: H, fit: contain|exact} | {long_edge: N}", {"scale": 2}),
    "recursive": Option(_boolean, False, "Also watch sub-folders, mirrored into outbox/failed/done.", False),
    "include": Option(_patterns, DEFAULT_INCLUDE, "File name patterns taken (case-insensitive).", ["*.jpg", "*.png"]),
    "ignore": Option(_patterns, (), "Patterns skipped, on top of the built-in OS/NAS/scanner junk.", ["scan_preview_*"]),
    "settle": Option(_duration(0.0), 2.0, "Quiet time (no change in size or times) before a file counts as complete.", "2s"),
    "incomplete_timeout": Option(_duration(0.0), 600.0, "How long a settled file that is not yet a whole image may stay before it fails as truncated.", "10m"),
    "watch": Option(_choice("auto", "native", "poll"), "auto", "auto: inotify, but polling on network and FUSE mounts.", "auto"),
    "poll_interval": Option(_duration(0.05), 2.0, "Scan period when polling.", "2s"),
    "rescan": Option(_duration(0.05), 60.0, "Full scan period with native events (events can be lost).", "60s"),
    "output": Option(lambda value: value, {"format": "auto"}, "format: auto (what the backend returned) | jpeg | png | webp; jpeg_quality.", {"format": "auto"}),
    "dedupe": Option(_boolean, True, "Serve identical content under the same rule from the earlier result (0 credits).", True),
    "budget": Option(lambda value: value, {}, "This folder's credit caps: daily, monthly.", {"daily": 50}),
}

FOLDER_DEFAULTABLE = {key for key in FOLDER_KEYS if key not in ("name", "inbox", "outbox", "failed", "done")}
TARGET_KEYS = {"scale", "width", "height", "long_edge", "fit"}
OUTPUT_KEYS = {"format", "jpeg_quality"}
BUDGET_KEYS = {"daily", "monthly", "low_balance"}


def _budget(value: Any, where: tuple[Any, ...], problems: _Problems, allowed: set[str]) -> Budget:
    if value in (None, {}):
        return Budget()
    if not isinstance(value, dict):
        problems.add(where, "must be a mapping such as {daily: 100, monthly: 2000}")
        return Budget()
    amounts: dict[str, Decimal | None] = {}
    for key, amount in value.items():
        if key not in allowed:
            problems.add((*where, key), f"unknown key (known: {', '.join(sorted(allowed))})")
            continue
        if amount is None:
            amounts[key] = None
            continue
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            problems.add((*where, key), f"must be a number of credits >= 0, not {amount!r}")
            continue
        amounts[key] = Decimal(str(amount))
    return Budget(**amounts)


# --------------------------------------------------------------------------- loading


class _Problems:
    """Collects problems with the line each one points at."""

    def __init__(self, file: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.file = file
        self.lines = lines
        self.items: list[tuple[int, str]] = []

    def add(self, where: tuple[Any, ...], message: str) -> None:
        line = _nearest_line(self.lines, where)
        item = (line, f"{self.file}:{line}: {_key_path(where) or '(top level)'}: {message}")
        if item not in self.items:  # a bad `defaults` key is checked once per folder: say it once
            self.items.append(item)

    def raise_if_any(self) -> None:
        if self.items:
            ordered = [message for _, message in sorted(self.items, key=lambda item: item[0])]
            raise ConfigError(self.file, ordered)


def _key_path(where: tuple[Any, ...]) -> str:
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _nearest_line(lines: dict[tuple[Any, ...], int], where: tuple[Any, ...]) -> int:
    for length in range(len(where), -1, -1):
        if where[:length] in lines:
            return lines[where[:length]]
    return 1


def _walk_nodes(node: yaml.Node, where: tuple[Any, ...], lines: dict[tuple[Any, ...], int], duplicates: list[tuple[tuple[Any, ...], int]]) -> None:
    """Record the line of every key and list item, and note duplicate keys."""
    lines.setdefault(where, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*where, key)
            if key in seen:
                duplicates.append((child, key_node.start_mark.line + 1))
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _walk_nodes(value_node, child, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk_nodes(item, (*where, index), lines, duplicates)


def load(path: str | os.PathLike[str]) -> Config:
    """Given a config file path, return the validated Config.

    Raise ConfigError naming the file, line and key of every problem found.
    """
    file = str(path)
    try:
        with open(file, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as error:
        raise ConfigError(file, [f"{file}: cannot read: {error.strerror or error}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(file, [f"{file}: not UTF-8 text: {error}"]) from None
    return loads(text, file)


def loads(text: str, file: str = "<config>") -> Config:
    """Given YAML text and the name of its file, return the validated Config (see load)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(file, [f"{where}: YAML syntax error: {problem}"]) from None
    lines: dict[tuple[Any, ...], int] = {}
    duplicates: list[tuple[tuple[Any, ...], int]] = []
    if node is not None:
        _walk_nodes(node, (), lines, duplicates)
    problems = _Problems(file, lines)
    for duplicate, _ in duplicates:
        problems.add(duplicate, "key given twice")
    if not isinstance(data, dict):
        problems.add((), "the file must be a mapping with state_dir and folders")
        problems.raise_if_any()
    base = Path(file).resolve().parent if file != "<config>" else Path.cwd()
    config = _build(data, problems, base, Path(file))
    problems.raise_if_any()
    assert config is not None
    _check_logic(config, problems)
    problems.raise_if_any()
    return config


def _section(data: Any, keys: dict[str, Option], where: tuple[Any, ...], problems: _Problems, *, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a mapping against its schema; return the checked values with defaults applied."""
    result: dict[str, Any] = {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.add(where, "must be a mapping")
        # Defaults stand in, so that callers reading result[key] still see every key.
        return {key: option.default for key, option in keys.items()}
    for key in data:
        if key not in keys:
            problems.add((*where, key), f"unknown key (known: {', '.join(sorted(keys))})")
    merged = dict(defaults or {})
    merged.update(data)
    for key, option in keys.items():
        if key not in merged or merged[key] is None and option.default is not None:
            if option.required:
                problems.add(where, f"missing required key {key!r}")
            result[key] = option.default
            continue
        place = (*where, key) if key in data else ("defaults", key)
        try:
            result[key] = option.check(merged[key])
        except ValueError as error:
            problems.add(place, str(error))
            result[key] = option.default
    return result


def _target(value: Any, where: tuple[Any, ...], problems: _Problems) -> Target:
    if not isinstance(value, dict):
        problems.add(where, "must be a mapping such as {scale: 2} or {long_edge: 4000}")
        return Target(scale=2)
    for key in value:
        if key not in TARGET_KEYS:
            problems.add((*where, key), f"unknown key (known: {', '.join(sorted(TARGET_KEYS))})")
    values: dict[str, Any] = {}
    for key in ("width", "height", "long_edge"):
        if key in value:
            try:
                values[key] = _integer(1, 100_000)(value[key])
            except ValueError as error:
                problems.add((*where, key), str(error).replace("between 1 and 100000", "> 0"))
    if "scale" in value:
        try:
            values["scale"] = _positive_number(value["scale"])
        except ValueError as error:
            problems.add((*where, "scale"), str(error))
    fit = value.get("fit", "contain")
    if fit not in ("contain", "exact"):
        problems.add((*where, "fit"), f"must be contain or exact, not {fit!r}")
        fit = "contain"
    shapes = [key for key in ("scale", "long_edge") if key in value]
    if "width" in value or "height" in value:
        shapes.append("width/height")
    if len(shapes) != 1:
        problems.add(where, "give exactly one of scale, long_edge, or width and/or height")
        return Target(scale=2)
    if "fit" in value and not ("width" in value and "height" in value):
        problems.add((*where, "fit"), "only applies when both width and height are given")
    return Target(
        scale=values.get("scale"),
        width=values.get("width"),
        height=values.get("height"),
        long_edge=values.get("long_edge"),
        fit=fit,
    )


def _build(data: dict[str, Any], problems: _Problems, base: Path, file: Path) -> Config | None:
    top = _section(data, GLOBAL_KEYS, (), problems)
    log = _section(top["log"], LOG_KEYS, ("log",), problems)
    clip = _section(top["clipdrop"], CLIPDROP_KEYS, ("clipdrop",), problems)
    defaults = top["defaults"] or {}
    if not isinstance(defaults, dict):
        problems.add(("defaults",), "must be a mapping of folder keys")
        defaults = {}
    for key in defaults:
        if key not in FOLDER_DEFAULTABLE:
            problems.add(("defaults", key), f"not a key that can have a default (allowed: {', '.join(sorted(FOLDER_DEFAULTABLE))})")
    defaults = {key: value for key, value in defaults.items() if key in FOLDER_DEFAULTABLE}

    def resolve(value: str) -> Path:
        return Path(os.path.normpath(base / os.path.expanduser(value)))

    folders: list[FolderRule] = []
    raw_folders = top["folders"]
    if raw_folders is not None and not isinstance(raw_folders, list):
        problems.add(("folders",), "must be a list of folders")
        raw_folders = []
    for index, raw in enumerate(raw_folders or []):
        where = ("folders", index)
        values = _section(raw, FOLDER_KEYS, where, problems, defaults=defaults)
        if not isinstance(raw, dict) or any(values.get(key) is None for key in ("name", "inbox", "outbox")):
            continue
        target_where = (*where, "target") if "target" in raw else ("defaults", "target")
        target = _target(values["target"], target_where, problems)
        output = values["output"]
        output_where = (*where, "output") if "output" in raw else ("defaults", "output")
        output_format, jpeg_quality = "auto", 92
        if not isinstance(output, dict):
            problems.add(output_where, "must be a mapping such as {format: auto}")
        else:
            for key in output:
                if key not in OUTPUT_KEYS:
                    problems.add((*output_where, key), f"unknown key (known: {', '.join(sorted(OUTPUT_KEYS))})")
            try:
                output_format = _choice("auto", "jpeg", "png", "webp")(output.get("format", "auto"))
            except ValueError as error:
                problems.add((*output_where, "format"), str(error))
            try:
                jpeg_quality = _integer(1, 100)(output.get("jpeg_quality", 92))
            except ValueError as error:
                problems.add((*output_where, "jpeg_quality"), str(error))
        inbox = resolve(values["inbox"])
        budget_where = (*where, "budget") if "budget" in raw else ("defaults", "budget")
        folder_budget = _budget(values["budget"], budget_where, problems, {"daily", "monthly"})
        folders.append(
            FolderRule(
                name=values["name"],
                inbox=inbox,
                outbox=resolve(values["outbox"]),
                failed=resolve(values["failed"]) if values["failed"] else inbox.parent / "failed",
                done=resolve(values["done"]) if values["done"] else inbox.parent / "done",
                on_success=values["on_success"],
                backend=values["backend"],
                strategy=values["strategy"],
                mode=values["mode"],
                target=target,
                recursive=values["recursive"],
                include=tuple(values["include"]),
                ignore=tuple(values["ignore"]),
                settle=values["settle"],
                incomplete_timeout=values["incomplete_timeout"],
                watch=values["watch"],
                poll_interval=values["poll_interval"],
                rescan=values["rescan"],
                output_format=output_format,
                jpeg_quality=jpeg_quality,
                dedupe=values["dedupe"],
                budget=folder_budget,
            )
        )
    if top["state_dir"] is None:
        return None
    settings = ClipdropSettings(
        api_key_env=clip["api_key_env"],
        api_key_file=resolve(clip["api_key_file"]) if clip["api_key_file"] else None,
        base_url=clip["base_url"],
        requests_per_minute=clip["requests_per_minute"],
        burst=clip["burst"],
        poll_interval=clip["poll_interval"],
        timeout=clip["timeout"],
        max_attempts=clip["max_attempts"],
        concurrency=clip["concurrency"],
        pause_retry=clip["pause_retry"],
        retry_backoff=clip["retry_backoff"],
        ambiguous_retries=clip["ambiguous_retries"],
        budget=_budget(clip["budget"], ("clipdrop", "budget"), problems, BUDGET_KEYS),
    )
    return Config(
        path=file.resolve() if str(file) != "<config>" else file,
        state_dir=resolve(top["state_dir"]),
        log_level=log["level"],
        log_format=log["format"],
        clipdrop=settings,
        folders=tuple(folders),
        local_workers=top["local_workers"],
        raw=data,
    )


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_logic(config: Config, problems: _Problems) -> None:
    """Checks that need the whole configuration: unique names, folders that do not collide."""
    seen_names: dict[str, int] = {}
    if not config.folders:
        problems.add(("folders",), "at least one folder is needed")
    for index, rule in enumerate(config.folders):
        where = ("folders", index)
        if rule.name in seen_names:
            problems.add((*where, "name"), f"{rule.name!r} is already the name of folders[{seen_names[rule.name]}]")
        seen_names.setdefault(rule.name, index)
        if rule.mode == "sync" and rule.strategy == "detailed":
            problems.add((*where, "mode"), "the detailed strategy is only offered by the async endpoint; use mode auto or async")
        own = {"outbox": rule.outbox, "failed": rule.failed, "done": rule.done}
        for key, place in own.items():
            if place == rule.inbox:
                problems.add((*where, key), f"must not be the inbox itself ({place})")
            elif _inside(place, rule.inbox):
                problems.add((*where, key), f"{place} is inside the inbox {rule.inbox}; results would be taken again")
            elif _inside(rule.inbox, place):
                problems.add((*where, key), f"the inbox {rule.inbox} is inside {place}")
        if rule.outbox in (rule.failed, rule.done):
            problems.add((*where, "outbox"), "must differ from failed and done, so results and originals never mix")
        if _inside(config.state_dir, rule.inbox):
            problems.add(("state_dir",), f"{config.state_dir} is inside the inbox of folder {rule.name!r}")
    for index, rule in enumerate(config.folders):
        for other_index, other in enumerate(config.folders):
            if other_index <= index:
                continue
            mine = {"inbox": rule.inbox, "outbox": rule.outbox}
            theirs = {"inbox": other.inbox, "outbox": other.outbox}
            for key, place in mine.items():
                for other_key, other_place in theirs.items():
                    if place == other_place or (
                        "inbox" in (key, other_key) and (_inside(place, other_place) or _inside(other_place, place))
                    ):
                        problems.add(
                            ("folders", other_index, other_key),
                            f"{other_place} overlaps folders[{index}].{key} ({place}); each folder needs its own inbox and outbox",
                        )


# --------------------------------------------------------------------------- secrets


def read_api_key(settings: ClipdropSettings, environ: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Find the API key. Return (key or None, where it came from or why it is missing).

    Order: systemd's $CREDENTIALS_DIRECTORY/clipdrop_api_key, then api_key_file, then the
    environment variable. A key file readable by group or others is refused (raise
    ConfigError), because a shared drop-folder host is exactly where that would leak.
    """
    environ = dict(os.environ) if environ is None else environ
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidate = Path(credentials) / CREDENTIAL_NAME
        if candidate.is_file():
            return _read_key_file(candidate, check_mode=False), f"systemd credential {CREDENTIAL_NAME}"
    if settings.api_key_file is not None:
        return _read_key_file(settings.api_key_file, check_mode=True), f"file {settings.api_key_file}"
    value = environ.get(settings.api_key_env, "").strip()
    if value:
        return value, f"environment variable {settings.api_key_env}"
    return None, f"no API key: set {settings.api_key_env}, clipdrop.api_key_file, or a systemd credential {CREDENTIAL_NAME}"


def _read_key_file(path: Path, *, check_mode: bool) -> str:
    try:
        info = path.stat()
        if check_mode and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                str(path),
                [f"{path}: the API key file is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"],
            )
        value = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(str(path), [f"{path}: cannot read the API key file: {error.strerror or error}"]) from None
    if not value:
        raise ConfigError(str(path), [f"{path}: the API key file is empty"])
    return value


def iter_schema() -> Iterator[tuple[str, str, Option]]:
    """Yield (section, key, option) for every documented key, for docs and tests."""
    for section, keys in (("", GLOBAL_KEYS), ("log", LOG_KEYS), ("clipdrop", CLIPDROP_KEYS), ("folders[]", FOLDER_KEYS)):
        for key, option in keys.items():
            yield section, key, option
