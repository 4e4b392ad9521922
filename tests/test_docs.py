"""The documentation stays true to the code."""

from __future__ import annotations

from pathlib import Path

from folderd.config import iter_schema, load

ROOT = Path(__file__).resolve().parent.parent


def test_every_config_key_is_in_the_readme_reference() -> None:
    """Each key of the config schema appears in the README's configuration reference."""
    readme = (ROOT / "README.md").read_text()
    reference = readme[readme.index("## Configuration reference"):]
    missing = [
        key for section, key, _option in iter_schema()
        if f"`{key}" not in reference and f"`{section}.{key}" not in reference
    ]
    assert missing == []


def test_config_example_validates() -> None:
    """config.example.yaml is a valid configuration that uses the local engine only."""
    config = load(ROOT / "config.example.yaml")
    assert [rule.backend for rule in config.folders] == ["local"]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs scripts/test, the test command the README gives."""
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in (ROOT / "README.md").read_text()
