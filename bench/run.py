"""folderd's performance benchmarks (issue 6): one command, a table of targets and results.

    .venv/bin/python bench/run.py            # the full run, a few minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # smaller sizes, about a minute and a half
    .venv/bin/python bench/run.py --only 1,5 # some targets only (3 needs 1 and 2)

Every daemon is the real `python -m folderd run` in its own process, fsync on, against
tests/fake_clipdrop.py on loopback or the local engine. What each figure means is in
bench/README.md. The table is Markdown; all measurements also go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import api, overhead, pickup, scale  # noqa: E402
from bench.common import Row, Section  # noqa: E402

FULL: dict[str, Any] = {
    "budget": {"rpm": 180, "window": 10.0, "jobs": 90, "naive_seconds": 20.0},
    # What-ifs: reruns of target 1 with clipdrop config overrides (e.g. [{"burst": 2}]),
    # reported but not judged. None now: the last ones (burst 1, a 2 % margin) are the
    # defaults (config.py, limiter.RateLimiter.MARGIN).
    "budget_what_if": [],
    "budget_what_if_jobs": 60,
    "polling": {"rpm": 300, "window": 10.0, "jobs": 40, "duration": 6.0},
    "pickup": {"files": 200, "pace": 0.05, "settle": 2.0, "poll_interval": 2.0},
    "overhead": {"files": 2000, "local": True},
    "scale": {"jobs": 100_000, "files": 100_000, "seconds": 60.0, "ledger_sizes": [1000, 10_000, 100_000], "updates": 1000},
}
QUICK: dict[str, Any] = {
    "budget": {"rpm": 180, "window": 10.0, "jobs": 45, "naive_seconds": 8.0},
    "budget_what_if": [],
    "budget_what_if_jobs": 0,
    "polling": {"rpm": 300, "window": 10.0, "jobs": 20, "duration": 6.0},
    "pickup": {"files": 60, "pace": 0.05, "settle": 2.0, "poll_interval": 2.0},
    "overhead": {"files": 500, "local": False},
    "scale": {"jobs": 20_000, "files": 20_000, "seconds": 20.0, "ledger_sizes": [1000, 10_000, 20_000], "updates": 300},
}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(), "kernel": platform.release(), "loadavg_at_start": os.getloadavg()}


def filesystem_of(path: Path) -> str:
    from folderd.watch import mount_of

    point, kind = mount_of(path)
    return f"{kind} at {point}"


def table(rows: list[Row]) -> str:
    header = ["#", "what", "target", "measured", "baseline (same run)", "ratio", "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        verdict = "info" if row.ok is None else ("met" if row.ok else "**MISSED**")
        cells = [row.target_id, row.metric, row.target, row.measured, row.baseline, row.ratio, verdict]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run; the targets are set for the full sizes)")
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated target numbers to run (default: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put folders and state (default: a new temp dir; must not be tmpfs for fsync to count)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, ledgers) afterwards")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here (default: results.json in the work directory)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    arguments = parser.parse_args(argv)

    sizes = QUICK if arguments.quick else FULL
    only = {part.strip() for part in arguments.only.split(",") if part.strip()}
    if arguments.workdir is not None:
        arguments.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="folderd-bench-", dir=arguments.workdir))
    info = {**machine(), "workdir": str(work), "filesystem": filesystem_of(work), "mode": "quick" if arguments.quick else "full"}
    print(f"folderd benchmarks ({info['mode']}): {info['cpus']} CPUs {info['cpu']}, Python {info['python']}, work dir {work} ({info['filesystem']})", flush=True)
    load = info["loadavg_at_start"][0]
    if load > 0.5 * (info["cpus"] or 1):
        print(f"warning: load average {load:.1f} on {info['cpus']} CPUs: other work is running, and the CPU-bound figures (5, 6) will be low", flush=True)
    if info["filesystem"].startswith("tmpfs"):
        print("warning: the work directory is on tmpfs, where fsync costs nothing; pass --workdir on a disk", flush=True)

    sections: list[Section] = []
    spread_runs: list[dict[str, Any]] = []
    started = time.monotonic()

    def step(label: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {label}", flush=True)

    try:
        if "1" in only or "3" in only:
            step("1. budget utilisation: folderd, then the naive client")
            section, spread = api.budget(work, **sizes["budget"])
            sections.append(section)
            spread_runs.append(spread)
            for index, overrides in enumerate(sizes["budget_what_if"] if "1" in only else []):
                step(f"1. budget utilisation, what-if: {overrides}")
                variant, _ = api.budget(
                    work, name=f"budget-what-if-{index}", clipdrop_extra=overrides, naive_seconds=0,
                    rpm=sizes["budget"]["rpm"], window=sizes["budget"]["window"], jobs=sizes["budget_what_if_jobs"],
                )
                sections.append(variant)
        if "2" in only or "3" in only:
            step("2. polling economy: eta given, then no eta")
            section, runs = api.polling(work, **sizes["polling"])
            sections.append(section)
            spread_runs.extend(runs)
        if "3" in only and spread_runs:
            sections.append(api.spread(spread_runs))
        if "4" in only:
            step("4. pick-up latency: native events, then polling")
            sections.append(pickup.pickup(work, **sizes["pickup"]))
        small = None
        if "5" in only:
            step("5. overhead: folderd with the fake API, the naive loop" + (", folderd with the local engine" if sizes["overhead"]["local"] else ""))
            section = overhead.overhead(work, **sizes["overhead"])
            sections.append(section)
            small = section.details["api"]
        if "6" in only:
            step(f"6. scale: {sizes['scale']['jobs']:,} jobs, {sizes['scale']['files']:,} files (ledger updates, READY x3, a {sizes['scale']['seconds']:g}s run)")
            sections.append(scale.scale(work, small=small, **sizes["scale"]))
        step("done")
        info["loadavg_at_end"] = os.getloadavg()
        rows = [row for section in sections for row in section.rows]
        print()
        print(table(rows))
        problems = [f"{section.name}: {problem}" for section in sections for problem in section.problems]
        if problems:
            print("\nproblems during the run:")
            for problem in problems:
                print(f"  - {problem}")
        met = sum(1 for row in rows if row.ok)
        judged = sum(1 for row in rows if row.ok is not None)
        print(f"\nload average {info['loadavg_at_start'][0]:.1f} at the start, {info['loadavg_at_end'][0]:.1f} at the end")
        print(f"{met} of {judged} targets met; details in ", end="")
        destination = arguments.json or work / "results.json"
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(json.dumps(
            {"machine": info, "sizes": sizes, "sections": [{"name": s.name, "rows": [row.__dict__ for row in s.rows], "details": s.details, "problems": s.problems} for s in sections]},
            indent=1, default=str,
        ))
        print(destination)
        if arguments.json is None and not arguments.keep:
            kept = Path(tempfile.gettempdir()) / "folderd-bench-results.json"
            shutil.copyfile(destination, kept)
            print(f"(copied to {kept}, the work directory is removed)")
        return 1 if arguments.strict and met < judged else 0
    finally:
        if not arguments.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
