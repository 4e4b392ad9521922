"""Checks for the systemd units shipped in systemd/ (see docs/systemd.md).

The systemd-analyze tests skip when systemd-analyze is missing (CI installs the
Debian package "systemd"); the directive tests only read the unit files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
MAIN_UNIT = UNIT_DIR / "folderd.service"
TEMPLATE_UNIT = UNIT_DIR / "folderd@.service"
INSTANCE = "folderd@scans.service"
EXEC_BINARY = "/usr/local/bin/folderd"
MAX_EXPOSURE = 1.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _systemd_version() -> int | None:
    if SYSTEMD_ANALYZE is None:
        return None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else None


SYSTEMD_VERSION = _systemd_version()

needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found (install the Debian package 'systemd'); "
    "the unit files were NOT checked",
)
needs_offline_security = pytest.mark.skipif(
    SYSTEMD_VERSION is None or SYSTEMD_VERSION < 250,
    reason=f"systemd-analyze security --offline needs systemd >= 250 "
    f"(found: {SYSTEMD_VERSION or 'none'}); exposure NOT measured",
)


def run_analyze(*args: str) -> tuple[int, str]:
    """Run systemd-analyze; return its exit code and stdout+stderr."""
    result = subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into {section: {key: [values in file order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}: continuation lines unsupported"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: unparsable line {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# --- systemd-analyze verify -------------------------------------------------


@needs_analyze
@pytest.mark.parametrize(
    ("unit_file", "analyzed_name"),
    [(MAIN_UNIT, "folderd.service"), (TEMPLATE_UNIT, INSTANCE)],
    ids=["folderd.service", INSTANCE],
)
def test_verify_reports_no_problem(tmp_path, unit_file, analyzed_name):
    """systemd-analyze verify accepts the unit without any warning or error."""
    # verify fails any unit whose ExecStart= binary is not an executable file,
    # and folderd is not installed at /usr/local/bin on a dev/CI machine. So the
    # unit is copied with ONLY that path replaced by a stub executable; every
    # other line (ExecReload=/bin/kill included) is verified as shipped.
    stub = tmp_path / "bin" / "folderd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit_file.read_text(encoding="utf-8")
    rewritten, count = re.subn(
        rf"^ExecStart={re.escape(EXEC_BINARY)} ",
        f"ExecStart={stub} ",
        text,
        flags=re.MULTILINE,
    )
    assert count == 1, f"expected one 'ExecStart={EXEC_BINARY} ...' line"
    unit_copy = tmp_path / "units" / unit_file.name
    unit_copy.parent.mkdir()
    unit_copy.write_text(rewritten, encoding="utf-8")

    # For the template, a path to the instance name next to folderd@.service
    # makes verify load instance "scans" from the template (%i expanded).
    code, output = run_analyze("verify", str(unit_copy.parent / analyzed_name))
    if output.strip():
        print(output)
    assert code == 0, output
    # Other lines (if any) concern units of the host, not ours.
    about_ours = [line for line in output.splitlines() if "folderd" in line]
    assert about_ours == [], "\n".join(about_ours)


# --- systemd-analyze security --offline -------------------------------------

OVERALL_RE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


@needs_analyze
@needs_offline_security
@pytest.mark.parametrize(
    ("unit_file", "analyzed_name"),
    [(MAIN_UNIT, "folderd.service"), (TEMPLATE_UNIT, INSTANCE)],
    ids=["folderd.service", INSTANCE],
)
def test_security_exposure_at_most_limit(tmp_path, unit_file, analyzed_name):
    """Offline systemd-analyze security rates the unit's exposure at most 1.5."""
    unit_copy = tmp_path / unit_file.name
    shutil.copyfile(unit_file, unit_copy)
    # Offline mode loads units from the directory of each path given. A path to
    # a template file is analyzed as instance "i" (folderd@i.service); a path to
    # folderd@scans.service next to the template loads that instance from
    # folderd@.service. The name in the result line proves which was analyzed.
    code, output = run_analyze(
        "security", "--offline=true", str(tmp_path / analyzed_name)
    )
    match = OVERALL_RE.search(output)
    assert match, f"no overall exposure line (exit {code}):\n{output}"
    name, score = match.group(1), float(match.group(2))
    print(f"\n{name}: overall exposure level {score} (limit {MAX_EXPOSURE})")
    assert name == analyzed_name, output
    assert score <= MAX_EXPOSURE, output


# --- directives in the unit files -------------------------------------------

# [Service] settings both units must carry, with their exact value(s) in file
# order (a later assignment overriding one of these would fail the test).
REQUIRED_SERVICE = {
    "Type": ["notify"],
    "NotifyAccess": ["main"],
    "ExecReload": ["/bin/kill -HUP $MAINPID"],
    "Restart": ["on-failure"],
    "RestartPreventExitStatus": ["2"],
    "User": ["folderd"],
    "Group": ["folderd"],
    "UMask": ["0027"],
    "StateDirectoryMode": ["0700"],
    "ProtectSystem": ["strict"],
    "NoNewPrivileges": ["yes"],
    "PrivateTmp": ["yes"],
    "ProtectHome": ["yes"],
    "PrivateDevices": ["yes"],
    "PrivateUsers": ["yes"],
    "ProtectKernelTunables": ["yes"],
    "ProtectKernelModules": ["yes"],
    "ProtectKernelLogs": ["yes"],
    "ProtectClock": ["yes"],
    "ProtectHostname": ["yes"],
    "ProtectControlGroups": ["yes"],
    "ProtectProc": ["invisible"],
    "ProcSubset": ["pid"],
    "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    "CapabilityBoundingSet": [""],
    "AmbientCapabilities": [""],
    "SystemCallFilter": ["@system-service", "~@privileged @resources"],
    "SystemCallArchitectures": ["native"],
    "MemoryDenyWriteExecute": ["yes"],
    "LockPersonality": ["yes"],
    "RestrictRealtime": ["yes"],
    "RestrictSUIDSGID": ["yes"],
    "RestrictNamespaces": ["yes"],
    "RemoveIPC": ["yes"],
}

# Settings that must be present with a non-empty value (value is the admin's).
REQUIRED_NONEMPTY = ["RestartSec", "WatchdogSec", "ReadWritePaths"]

# Per-unit settings: the template's differ by instance (%i).
PER_UNIT = {
    MAIN_UNIT: {
        "ExecStart": [f"{EXEC_BINARY} run -c /etc/folderd/config.yaml"],
        "StateDirectory": ["folderd"],
        "LoadCredential": ["clipdrop_api_key:/etc/folderd/clipdrop_api_key"],
    },
    TEMPLATE_UNIT: {
        "ExecStart": [f"{EXEC_BINARY} run -c /etc/folderd/%i.yaml"],
        "StateDirectory": ["folderd/%i"],
        "LoadCredential": ["clipdrop_api_key:/etc/folderd/%i.clipdrop_api_key"],
    },
}

UNITS = [MAIN_UNIT, TEMPLATE_UNIT]
UNIT_IDS = [u.name for u in UNITS]


@pytest.mark.parametrize("directive", sorted(REQUIRED_SERVICE))
@pytest.mark.parametrize("unit_file", UNITS, ids=UNIT_IDS)
def test_required_directive_has_value(unit_file, directive):
    """The unit's [Service] section sets the directive to exactly the required value."""
    service = parse_unit(unit_file).get("Service", {})
    assert service.get(directive) == REQUIRED_SERVICE[directive], (
        f"{unit_file.name}: {directive}= is {service.get(directive)!r}, "
        f"expected {REQUIRED_SERVICE[directive]!r}"
    )


@pytest.mark.parametrize("directive", REQUIRED_NONEMPTY)
@pytest.mark.parametrize("unit_file", UNITS, ids=UNIT_IDS)
def test_required_directive_is_set(unit_file, directive):
    """The unit's [Service] section sets the directive once, to a non-empty value."""
    values = parse_unit(unit_file).get("Service", {}).get(directive, [])
    assert len(values) == 1 and values[0], f"{unit_file.name}: {directive}={values!r}"


@pytest.mark.parametrize("unit_file", UNITS, ids=UNIT_IDS)
def test_per_unit_paths(unit_file):
    """ExecStart, StateDirectory and LoadCredential point at the unit's own config, state and key."""
    service = parse_unit(unit_file)["Service"]
    for directive, expected in PER_UNIT[unit_file].items():
        assert service.get(directive) == expected, f"{unit_file.name}: {directive}"


@pytest.mark.parametrize("unit_file", UNITS, ids=UNIT_IDS)
def test_no_dynamic_user_and_installable(unit_file):
    """The unit runs as the static folderd user and is enabled by multi-user.target."""
    unit = parse_unit(unit_file)
    assert "DynamicUser" not in unit["Service"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_template_matches_main_unit():
    """The template's [Service] section equals the main unit's except per-instance paths."""
    main = parse_unit(MAIN_UNIT)["Service"]
    template = parse_unit(TEMPLATE_UNIT)["Service"]
    per_instance = set(PER_UNIT[MAIN_UNIT]) | {"ReadWritePaths"}

    def shared(section: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: v for k, v in section.items() if k not in per_instance}

    assert shared(template) == shared(main)
