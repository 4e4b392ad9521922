"""The configuration: schema errors named by file, line and key path; semantic checks; `folderd check`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from folderd.config import (
    CLIPDROP_KEYS,
    DEFAULT_INCLUDE,
    FOLDER_DEFAULTABLE,
    FOLDER_KEYS,
    GLOBAL_KEYS,
    LOG_KEYS,
    OUTPUT_KEYS,
    TARGET_KEYS,
    Config,
    load,
    loads,
)
from folderd.errors import ConfigError
from tests.harness import ROOT

FILE = "/srv/conf/folderd.yaml"


def problems_of(text: str, file: str = FILE) -> list[str]:
    """The problems loads() reports for `text` (failing the test if it loads)."""
    with pytest.raises(ConfigError) as caught:
        loads(textwrap.dedent(text), file)
    assert caught.value.path == file
    assert str(caught.value).startswith(f"{file}: {len(caught.value.problems)} configuration error(s):")
    return caught.value.problems


def known(keys: object) -> str:
    """The list of keys an error message offers, from the schema itself (so new options do not break these tests)."""
    return ", ".join(sorted(keys))  # type: ignore[call-overload]


def valid(text: str, file: str = FILE) -> Config:
    return loads(textwrap.dedent(text), file)


MINIMAL = """\
state_dir: state
folders:
  - name: scans
    inbox: scans/inbox
    outbox: scans/outbox
"""


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_names_file_line_and_key() -> None:
    """An unknown top-level key is an error naming file:line and the key, and listing the known keys."""
    (problem,) = problems_of(MINIMAL + "colour: blue\n")
    assert problem == f"{FILE}:6: colour: unknown key (known: {known(GLOBAL_KEYS)})"
    assert "state_dir" in problem and "folders" in problem


def test_unknown_keys_at_every_level_are_reported_with_their_key_path() -> None:
    """Unknown keys in log, clipdrop, defaults, a folder, its target and its output are each named by key path and line."""
    found = problems_of(
        """\
        state_dir: state
        log:
          level: info
          colour: yes
        clipdrop:
          base_url: https://clipdrop-api.co
          apikey: abc
        defaults:
          name: everyone
        folders:
          - name: a
            inbox: a/inbox
            outbox: a/outbox
          - name: b
            inbox: b/inbox
            outbox: b/outbox
            target:
              scale: 2
              depth: 3
            output:
              format: png
              quality: 80
            colour: red
        """
    )
    assert found == [
        f"{FILE}:4: log.colour: unknown key (known: {known(LOG_KEYS)})",
        f"{FILE}:7: clipdrop.apikey: unknown key (known: {known(CLIPDROP_KEYS)})",
        f"{FILE}:9: defaults.name: not a key that can have a default (allowed: {known(FOLDER_DEFAULTABLE)})",
        f"{FILE}:19: folders[1].target.depth: unknown key (known: {known(TARGET_KEYS)})",
        f"{FILE}:22: folders[1].output.quality: unknown key (known: {known(OUTPUT_KEYS)})",
        f"{FILE}:23: folders[1].colour: unknown key (known: {known(FOLDER_KEYS)})",
    ]
    assert "api_key_env" in CLIPDROP_KEYS and "inbox" in FOLDER_KEYS and "name" not in FOLDER_DEFAULTABLE


def test_several_errors_are_reported_at_once_sorted_by_line() -> None:
    """One load reports every problem in the file, in line order, not just the first one."""
    found = problems_of(
        """\
        state_dir: state
        local_workers: 0
        clipdrop:
          timeout: 5x
          burst: -1
        folders:
          - name: a
            inbox: a/inbox
            outbox: a/outbox
            target: {scale: 0}
            settle: soon
        """
    )
    assert found == [
        f"{FILE}:2: local_workers: must be between 1 and 64, not 0",
        f"{FILE}:4: clipdrop.timeout: must be a duration such as 5s, 500ms or 2m, not '5x'",
        f"{FILE}:5: clipdrop.burst: must be between 1 and 1000, not -1",
        f"{FILE}:10: folders[0].target.scale: must be > 0, not 0",
        f"{FILE}:11: folders[0].settle: must be a duration such as 5s, 500ms or 2m, not 'soon'",
    ]


def test_target_scale_error_example_from_the_docs() -> None:
    """A non-positive scale in the second folder reads `folders[1].target.scale: must be > 0`."""
    found = problems_of(
        """\
        state_dir: state
        folders:
          - {name: a, inbox: a/inbox, outbox: a/outbox}
          - name: b
            inbox: b/inbox
            outbox: b/outbox
            target:
              scale: -1.5
        """
    )
    assert found == [f"{FILE}:8: folders[1].target.scale: must be > 0, not -1.5"]


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("settle", "5x", "must be a duration such as 5s, 500ms or 2m, not '5x'"),
        ("settle", "-2s", "must be a duration such as 5s, 500ms or 2m, not '-2s'"),
        ("settle", -2, "must not be negative"),
        ("settle", "true", "must be a duration such as 5s, 500ms or 2m"),
        ("incomplete_timeout", "[1, 2]", "must be a duration"),
        ("poll_interval", "1ms", "must be at least 0.05s"),
        ("rescan", 0, "must be at least 0.05s"),
        ("recursive", "'yes'", "must be true or false, not 'yes'"),
        ("recursive", 1, "must be true or false, not 1"),
        ("backend", "gpu", "must be one of clipdrop, local, not 'gpu'"),
        ("strategy", "fast", "must be one of smooth, detailed, not 'fast'"),
        ("mode", "turbo", "must be one of auto, sync, async, not 'turbo'"),
        ("on_success", "keep", "must be one of archive, delete, not 'keep'"),
        ("watch", "magic", "must be one of auto, native, poll, not 'magic'"),
        ("include", "'*.jpg'", "must be a list of file name patterns"),
        ("ignore", "[1]", "must be a list of file name patterns"),
        ("inbox", 5, "must be a path"),
        ("name", "''", "must be a non-empty string"),
        ("target", 3, "must be a mapping such as {scale: 2}"),
        ("output", 5, "must be a mapping such as {format: auto}"),
    ],
)
def test_bad_folder_value_is_named_with_its_line(key: str, value: object, message: str) -> None:
    """A wrong type, bad enum, bad duration or negative value of a folder key is one error on that key's line."""
    fields = {"name": "a", "inbox": "a/inbox", "outbox": "a/outbox"}
    fields.pop(key, None)
    text = (
        "state_dir: state\nfolders:\n  - x: 1\n"
        + "".join(f"    {name}: {text}\n" for name, text in fields.items())
        + f"    {key}: {value}\n"
    )
    text = text.replace("  - x: 1\n    ", "  - ")
    found = problems_of(text)
    assert len(found) == 1, found
    line = text.count("\n")  # the key under test is on the last line
    assert found[0].startswith(f"{FILE}:{line}: folders[0].{key}: {message}"), found


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("base_url", "ftp://clipdrop-api.co", "must be an http(s) URL without query"),
        ("base_url", "https://clipdrop-api.co/?key=1", "must be an http(s) URL without query"),
        ("base_url", "clipdrop-api.co", "must be an http(s) URL without query"),
        ("requests_per_minute", 1.5, "must be a whole number, not 1.5"),
        ("requests_per_minute", 0, "must be between 1 and 100000, not 0"),
        ("max_attempts", "'3'", "must be a whole number, not '3'"),
        ("concurrency", "true", "must be a whole number, not True"),
        ("timeout", "2 weeks", "must be a duration"),
        ("pause_retry", "10ms", "must be at least 0.05s"),
    ],
)
def test_bad_clipdrop_value_is_named_with_its_line(key: str, value: object, message: str) -> None:
    """Bad URLs, non-integers, out-of-range numbers and bad durations under clipdrop are errors on their line."""
    found = problems_of(MINIMAL + f"clipdrop:\n  {key}: {value}\n")
    assert len(found) == 1, found
    assert found[0].startswith(f"{FILE}:7: clipdrop.{key}: {message}"), found


def test_bad_target_shapes() -> None:
    """Zero sizes, an unknown fit, two shapes at once and fit without both sides are each reported."""
    found = problems_of(
        """\
        state_dir: state
        folders:
          - {name: a, inbox: a/in, outbox: a/out, target: {width: 0, height: 10, fit: squash}}
          - {name: b, inbox: b/in, outbox: b/out, target: {scale: 2, long_edge: 3000}}
          - {name: c, inbox: c/in, outbox: c/out, target: {width: 1000, fit: exact}}
          - {name: d, inbox: d/in, outbox: d/out, target: {}}
        """
    )
    assert found == [
        f"{FILE}:3: folders[0].target.width: must be > 0, not 0",
        f"{FILE}:3: folders[0].target.fit: must be contain or exact, not 'squash'",
        f"{FILE}:4: folders[1].target: give exactly one of scale, long_edge, or width and/or height",
        f"{FILE}:5: folders[2].target.fit: only applies when both width and height are given",
        f"{FILE}:6: folders[3].target: give exactly one of scale, long_edge, or width and/or height",
    ]


def test_sections_of_the_wrong_type_are_errors_not_crashes() -> None:
    """`log: 3`, `clipdrop: [1]`, `defaults: 5` and a folder that is a number are reported, never a Python exception."""
    found = problems_of(
        """\
        state_dir: state
        log: 3
        clipdrop: [1]
        defaults: 5
        folders:
          - 7
          - {name: a, inbox: a/in, outbox: a/out}
        """
    )
    assert found == [
        f"{FILE}:2: log: must be a mapping",
        f"{FILE}:3: clipdrop: must be a mapping",
        f"{FILE}:4: defaults: must be a mapping of folder keys",
        f"{FILE}:6: folders[0]: must be a mapping",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "(top level): the file must be a mapping with state_dir and folders"),
        ("- a\n- b\n", "(top level): the file must be a mapping with state_dir and folders"),
        ("folders:\n  - {name: a, inbox: a/in, outbox: a/out}\n", "(top level): missing required key 'state_dir'"),
        ("state_dir: s\n", "(top level): missing required key 'folders'"),
        ("state_dir: s\nfolders: []\n", "folders: at least one folder is needed"),
        ("state_dir: s\nfolders: {a: 1}\n", "folders: must be a list of folders"),
    ],
)
def test_missing_or_malformed_structure(text: str, message: str) -> None:
    """An empty file, a list, a missing state_dir or folders, or no folder at all are errors, not crashes."""
    found = problems_of(text)
    assert len(found) == 1 and found[0].split(": ", 1)[1] == message, found


def test_missing_required_folder_keys_are_all_named() -> None:
    """A folder without inbox and outbox gets one error per missing key, on the folder's line."""
    found = problems_of("state_dir: s\nfolders:\n  - name: a\n")
    assert found == [f"{FILE}:3: folders[0]: missing required key 'inbox'", f"{FILE}:3: folders[0]: missing required key 'outbox'"]


# --------------------------------------------------------------------------- YAML


def test_yaml_syntax_error_names_line_and_column() -> None:
    """Broken YAML is one error giving file:line:column, not a traceback."""
    found = problems_of("state_dir: s\nfolders:\n  - name: a\n    inbox: [x, y\n    outbox: o\n")
    assert len(found) == 1
    assert found[0].startswith(f"{FILE}:5:11: YAML syntax error:"), found


def test_yaml_tab_indentation_names_line_and_column() -> None:
    """A tab used for indentation is reported at its line and column."""
    (problem,) = problems_of("state_dir: s\nfolders:\n\t- a\n")
    assert problem.startswith(f"{FILE}:3:1: YAML syntax error:") and "\\t" in problem


def test_yaml_python_tags_are_refused() -> None:
    """The loader is safe: a python/object tag is a syntax error, never executed."""
    (problem,) = problems_of("state_dir: !!python/object/apply:os.system ['true']\nfolders: []\n")
    assert problem.startswith(f"{FILE}:1:") and "YAML syntax error" in problem


def test_duplicate_keys_are_errors_at_every_level() -> None:
    """A key given twice (YAML would silently keep the last) is an error on the second occurrence's line."""
    found = problems_of(
        """\
        state_dir: s
        folders:
          - name: a
            inbox: a/in
            outbox: a/out
            inbox: b/in
            target: {scale: 2, scale: 3}
        state_dir: t
        """
    )
    assert found == [
        f"{FILE}:6: folders[0].inbox: key given twice",
        f"{FILE}:7: folders[0].target.scale: key given twice",
        f"{FILE}:8: state_dir: key given twice",
    ]


def test_yaml_anchors_and_merge_keys_are_not_duplicates() -> None:
    """A folder built from another with `<<: *anchor` loads, its own keys winning, with no duplicate-key error."""
    config = valid(
        """\
        state_dir: s
        folders:
          - &base {name: a, inbox: a/in, outbox: a/out, settle: 1s, backend: local}
          - <<: *base
            name: b
            inbox: b/in
            outbox: b/out
            settle: 3s
        """
    )
    a, b = config.folders
    assert (a.name, a.settle, a.backend) == ("a", 1.0, "local")
    assert (b.name, b.settle, b.backend, b.inbox) == ("b", 3.0, "local", Path("/srv/conf/b/in"))


# --------------------------------------------------------------------------- defaults and paths


def test_defaults_apply_to_every_folder_and_a_folders_own_keys_win() -> None:
    """`defaults` fills in folder keys; a folder's own value overrides it; built-in defaults fill the rest."""
    config = valid(
        """\
        state_dir: state
        defaults:
          settle: 500ms
          backend: local
          target: {long_edge: 3000}
          output: {format: png}
          include: ['*.jpg']
        folders:
          - {name: a, inbox: a/in, outbox: a/out}
          - {name: b, inbox: b/in, outbox: b/out, settle: 2m, backend: clipdrop, target: {scale: 4},
             output: {format: webp, jpeg_quality: 70}}
        """
    )
    a, b = config.folders
    assert (a.settle, a.backend, a.target.long_edge, a.target.scale, a.output_format, a.include) == (
        0.5,
        "local",
        3000,
        None,
        "png",
        ("*.jpg",),
    )
    assert (b.settle, b.backend, b.target.scale, b.target.long_edge, b.output_format, b.jpeg_quality, b.include) == (
        120.0,
        "clipdrop",
        4.0,
        None,
        "webp",
        70,
        ("*.jpg",),
    )
    # Built-in defaults for everything nobody set.
    for key in ("on_success", "strategy", "mode", "recursive", "watch", "incomplete_timeout", "rescan", "poll_interval"):
        assert getattr(a, key) == getattr(b, key) == FOLDER_KEYS[key].default, key
    assert (a.on_success, a.strategy, a.recursive) == ("archive", "smooth", False)
    assert a.jpeg_quality == 92
    assert valid(MINIMAL).folders[0].include == DEFAULT_INCLUDE
    assert valid(MINIMAL).folders[0].target.scale == 2


def test_a_bad_default_is_reported_once_at_the_defaults_line() -> None:
    """A bad value under `defaults` is reported once, at its own line, however many folders inherit it."""
    found = problems_of(
        """\
        state_dir: state
        defaults:
          settle: 5x
          target: {scale: 2, bogus: 1}
        folders:
          - {name: a, inbox: a/in, outbox: a/out}
          - {name: b, inbox: b/in, outbox: b/out}
          - {name: c, inbox: c/in, outbox: c/out}
        """
    )
    assert found == [
        f"{FILE}:3: defaults.settle: must be a duration such as 5s, 500ms or 2m, not '5x'",
        f"{FILE}:4: defaults.target.bogus: unknown key (known: {known(TARGET_KEYS)})",
    ]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5.0), ("2.5", 2.5), ("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0), ("'0'", 0.0), ("' 3 s '", 3.0)],
)
def test_duration_forms(value: str, seconds: float) -> None:
    """Durations are numbers of seconds or a number with ms/s/m/h/d."""
    config = valid(MINIMAL + f"defaults:\n  settle: {value}\n")
    assert config.folders[0].settle == seconds


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths (state_dir, inbox, outbox, failed, done, api_key_file) are relative to the config file, not the cwd."""
    conf_dir = tmp_path / "etc" / "folderd"
    conf_dir.mkdir(parents=True)
    config_file = conf_dir / "config.yaml"
    config_file.write_text(
        textwrap.dedent(
            """\
            state_dir: ./state
            clipdrop: {api_key_file: ../secret/key}
            folders:
              - {name: a, inbox: a/in, outbox: ../out/a, failed: ./a/bad/}
              - {name: b, inbox: /abs/b/in, outbox: /abs/b/out, done: ~/done-b}
            """
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load(config_file)
    a, b = config.folders
    assert config.path == config_file
    assert config.state_dir == conf_dir / "state"
    assert config.clipdrop.api_key_file == tmp_path / "etc" / "secret" / "key"
    assert a.inbox == conf_dir / "a" / "in"
    assert a.outbox == tmp_path / "etc" / "out" / "a"
    assert a.failed == conf_dir / "a" / "bad"
    assert a.done == conf_dir / "a" / "done"  # default: next to the inbox
    assert (b.inbox, b.outbox, b.failed) == (Path("/abs/b/in"), Path("/abs/b/out"), Path("/abs/b/failed"))
    assert b.done == tmp_path / "home" / "done-b"


def test_load_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming it, not a traceback."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load(missing)
    assert caught.value.problems == [f"{missing}: cannot read: No such file or directory"]


def test_load_of_a_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is reported as such."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert "not UTF-8 text" in caught.value.problems[0]


# --------------------------------------------------------------------------- semantic checks


def test_inbox_equal_to_outbox() -> None:
    """An outbox that is the inbox is refused (results would be taken again)."""
    found = problems_of("state_dir: s\nfolders:\n  - {name: a, inbox: a/in, outbox: ./a/in/}\n")
    assert found == [f"{FILE}:3: folders[0].outbox: must not be the inbox itself (/srv/conf/a/in)"]


@pytest.mark.parametrize("key", ["outbox", "done", "failed"])
def test_folder_inside_the_inbox(key: str) -> None:
    """An outbox, done or failed folder inside the inbox is refused, naming both paths."""
    extra = "" if key == "outbox" else ", outbox: a/out"
    found = problems_of(f"state_dir: s\nfolders:\n  - {{name: a, inbox: a/in, {key}: a/in/sub/x{extra}}}\n")
    assert found == [f"{FILE}:3: folders[0].{key}: /srv/conf/a/in/sub/x is inside the inbox /srv/conf/a/in; results would be taken again"]


def test_inbox_inside_outbox() -> None:
    """An inbox inside its own outbox is refused too."""
    found = problems_of("state_dir: s\nfolders:\n  - {name: a, inbox: a/out/in, outbox: a/out}\n")
    assert found == [f"{FILE}:3: folders[0].outbox: the inbox /srv/conf/a/out/in is inside /srv/conf/a/out"]


def test_outbox_shared_with_done() -> None:
    """Results and originals never share a folder: outbox == done is refused."""
    found = problems_of("state_dir: s\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out, done: a/out}\n")
    assert found == [f"{FILE}:3: folders[0].outbox: must differ from failed and done, so results and originals never mix"]


def test_state_dir_inside_an_inbox() -> None:
    """The state directory must not be inside an inbox."""
    found = problems_of("state_dir: a/in/.state\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out}\n")
    assert found == [f"{FILE}:1: state_dir: /srv/conf/a/in/.state is inside the inbox of folder 'a'"]


def test_overlapping_folders_between_rules() -> None:
    """Two rules sharing an inbox, nesting inboxes, sharing an outbox or one's outbox in another's inbox are refused."""
    found = problems_of(
        """\
        state_dir: s
        folders:
          - {name: a, inbox: a/in, outbox: a/out}
          - {name: b, inbox: a/in, outbox: b/out}
          - {name: c, inbox: a/in/nested, outbox: c/out}
          - {name: d, inbox: d/in, outbox: a/out}
          - {name: e, inbox: e/in, outbox: a/in/results}
        """
    )
    joined = "\n".join(found)
    assert f"{FILE}:4: folders[1].inbox: /srv/conf/a/in overlaps folders[0].inbox (/srv/conf/a/in)" in joined
    assert f"{FILE}:5: folders[2].inbox: /srv/conf/a/in/nested overlaps folders[0].inbox (/srv/conf/a/in)" in joined
    assert f"{FILE}:6: folders[3].outbox: /srv/conf/a/out overlaps folders[0].outbox (/srv/conf/a/out)" in joined
    assert f"{FILE}:7: folders[4].outbox: /srv/conf/a/in/results overlaps folders[0].inbox (/srv/conf/a/in)" in joined
    assert all("each folder needs its own inbox and outbox" in problem for problem in found)


def test_separate_folders_under_one_parent_are_fine() -> None:
    """Sibling folders (in, in2, out) with similar names do not count as overlapping."""
    config = valid(
        "state_dir: s\nfolders:\n  - {name: a, inbox: x/in, outbox: x/out, done: x/done-a, failed: x/failed-a}\n"
        "  - {name: b, inbox: x/in2, outbox: x/out2, done: x/done-b, failed: x/failed-b}\n"
    )
    assert [rule.name for rule in config.folders] == ["a", "b"]


def test_duplicate_folder_names() -> None:
    """Two folders with one name are refused, naming the first one."""
    found = problems_of("state_dir: s\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out}\n  - {name: a, inbox: b/in, outbox: b/out}\n")
    assert found == [f"{FILE}:4: folders[1].name: 'a' is already the name of folders[0]"]


def test_sync_mode_with_detailed_strategy() -> None:
    """mode sync + strategy detailed is refused (detailed only exists on the async endpoint), also via defaults."""
    found = problems_of("state_dir: s\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out, mode: sync, strategy: detailed}\n")
    assert found == [f"{FILE}:3: folders[0].mode: the detailed strategy is only offered by the async endpoint; use mode auto or async"]
    found = problems_of("state_dir: s\ndefaults: {strategy: detailed}\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out, mode: sync}\n")
    assert len(found) == 1 and "folders[0].mode: the detailed strategy" in found[0]
    assert valid("state_dir: s\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out, mode: async, strategy: detailed}\n")


def test_example_config_at_the_repo_root_validates() -> None:
    """config.example.yaml loads without problems, with its paths under the repo's example/ folder."""
    config = load(ROOT / "config.example.yaml")
    assert config.state_dir == ROOT / "example" / "state"
    (rule,) = config.folders
    assert rule.inbox == ROOT / "example" / "inbox" and rule.backend == "local"
    assert rule.settle == 2.0


# --------------------------------------------------------------------------- folderd check


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CLIPDROP_API_KEY", "FOLDERD_CONFIG", "CREDENTIALS_DIRECTORY")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "folderd", "check", "-c", str(config)],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_check_exits_2_and_prints_every_problem(tmp_path: Path) -> None:
    """`folderd check` on a broken config exits 2 and prints each problem with file:line on stderr."""
    config = _write(
        tmp_path,
        """\
        state_dir: state
        bogus: 1
        folders:
          - name: a
            inbox: a/in
            outbox: a/in
            target: {scale: 0}
        """,
    )
    result = _check(config)
    assert result.returncode == 2, result
    assert f"{config}: 2 configuration error(s):" in result.stderr
    assert f"{config}:2: bogus: unknown key" in result.stderr
    assert f"{config}:7: folders[0].target.scale: must be > 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert "configuration valid" not in result.stdout


def test_check_exits_2_on_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    """`folderd check` exits 2 for a YAML syntax error (line:column) and for a config file that does not exist."""
    config = _write(tmp_path, "state_dir: s\nfolders: [\n")
    result = _check(config)
    assert result.returncode == 2 and f"{config}:3:1: YAML syntax error" in result.stderr, result
    result = _check(tmp_path / "missing.yaml")
    assert result.returncode == 2 and "cannot read" in result.stderr, result


def test_check_valid_local_config_exits_0(tmp_path: Path) -> None:
    """A valid local-backend config passes `folderd check` with exit 0 and names each folder's watch method."""
    config = _write(tmp_path, "state_dir: state\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out, backend: local}\n")
    result = _check(config)
    assert result.returncode == 0, result
    assert "configuration valid, 1 folder(s)" in result.stdout
    assert "folder a: local, watch" in result.stdout
    assert "no problems found" in result.stdout


def test_check_clipdrop_folder_without_api_key_fails(tmp_path: Path) -> None:
    """A clipdrop folder with no key in the environment, file or credentials makes `check` exit non-zero, saying so."""
    config = _write(tmp_path, "state_dir: state\nfolders:\n  - {name: api, inbox: a/in, outbox: a/out, backend: clipdrop}\n")
    result = _check(config)
    assert result.returncode != 0, result
    assert "folders api use clipdrop but there is no API key" in result.stderr
    assert "CLIPDROP_API_KEY" in result.stderr
    env = _env()
    env["CLIPDROP_API_KEY"] = "k-from-env"
    result = _check(config, env)
    assert result.returncode == 0, result
    assert "API key: from environment variable CLIPDROP_API_KEY" in result.stdout
    assert "k-from-env" not in result.stdout + result.stderr


def test_check_refuses_an_api_key_file_readable_by_others(tmp_path: Path) -> None:
    """An api_key_file with mode 0644 is refused with a clear message (chmod 600); with 0600 it is accepted."""
    key_file = tmp_path / "key"
    key_file.write_text("secret-key-value\n")
    key_file.chmod(0o644)
    config = _write(
        tmp_path,
        "state_dir: state\nclipdrop: {api_key_file: key}\nfolders:\n  - {name: api, inbox: a/in, outbox: a/out, backend: clipdrop}\n",
    )
    result = _check(config)
    assert result.returncode != 0, result
    assert f"{key_file}: the API key file is readable by group or others (mode 0644); run: chmod 600 {key_file}" in result.stderr
    assert "secret-key-value" not in result.stdout + result.stderr
    key_file.chmod(0o600)
    result = _check(config)
    assert result.returncode == 0, result
    assert f"API key: from file {key_file}" in result.stdout
    assert "secret-key-value" not in result.stdout + result.stderr


def test_check_reports_an_empty_or_missing_key_file(tmp_path: Path) -> None:
    """An empty api_key_file, or one that does not exist, is a problem, not a crash."""
    config = _write(
        tmp_path,
        "state_dir: state\nclipdrop: {api_key_file: key}\nfolders:\n  - {name: api, inbox: a/in, outbox: a/out, backend: clipdrop}\n",
    )
    result = _check(config)
    assert result.returncode == 1 and "cannot read the API key file" in result.stderr and "Traceback" not in result.stderr, result
    (tmp_path / "key").write_text("\n")
    (tmp_path / "key").chmod(0o600)
    result = _check(config)
    assert result.returncode == 1 and "the API key file is empty" in result.stderr, result


def test_check_and_run_agree_on_a_config_error(tmp_path: Path) -> None:
    """`folderd run` and `folderd once` also exit 2 on a config error, before touching any folder."""
    config = _write(tmp_path, "state_dir: state\nfolders:\n  - {name: a, inbox: a/in, outbox: a/out, settle: 5x}\n")
    for command in ("run", "once"):
        result = subprocess.run(
            [sys.executable, "-m", "folderd", command, "-c", str(config)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == 2, result
        assert f"{config}:3: folders[0].settle: must be a duration" in result.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "a").exists()
