"""Target 4: pick-up latency, from a writer closing a file to folderd claiming it.

A writer thread writes files one at a time into the inbox of a running daemon (write,
close, note the time) at a steady pace. The daemon logs every job state change with a
timestamp: "claimed" (the file is moved into the work area and recorded) minus the close
time is the pick-up latency; "submitting" (the call is about to go, intent recorded) minus
the close time is close-to-submit. The settle time is a deliberate wait (the file must be
quiet that long), so the figure to judge is latency - settle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import API_KEY, DaemonProcess, Row, Section, fmt, jpeg_template, percentile, unique_jpeg, unlimited_api, write_config
from tests.fake_clipdrop import FakeClipdrop

NATIVE_MARGIN = 0.100   # native target: settle + under 100 ms; polling gets the same margin on top of its interval


def _write_paced(inbox: Path, count: int, pace: float, offset: int) -> dict[str, float]:
    template = jpeg_template()
    closed: dict[str, float] = {}
    next_at = time.monotonic()
    for index in range(count):
        name = f"p{offset + index:06d}.jpg"
        with open(inbox / name, "wb") as handle:
            handle.write(unique_jpeg(template, offset + index))
        closed[name] = time.time()
        next_at += pace
        time.sleep(max(0.0, next_at - time.monotonic()))
    return closed


def measure(work: Path, name: str, *, watch: str, files: int, pace: float, settle: float, poll_interval: float) -> dict[str, Any]:
    root = work / name
    fake = FakeClipdrop(keys={API_KEY: 10**9}, rpm=10**9, window=1.0).start()
    try:
        config = write_config(
            root, backend="clipdrop",
            folder={"mode": "sync", "watch": watch, "settle": settle, "poll_interval": poll_interval},
            clipdrop=unlimited_api(fake.base_url),
        )
        daemon = DaemonProcess(config).start()
        try:
            daemon.wait_ready()
            time.sleep(0.5)   # the watcher's first scan of the empty inbox
            closed = _write_paced(root / "inbox", files, pace, 0)
            finished = daemon.wait_for(lambda: daemon.log.count("archived") >= files, 60 + settle + poll_interval, "all files")
        finally:
            daemon.stop()
    finally:
        fake.stop()
    claimed = daemon.log.first_by_file("claimed")
    submitting = daemon.log.first_by_file("submitting")
    to_claim = [claimed[file] - closed[file] for file in closed if file in claimed]
    to_submit = [submitting[file] - closed[file] for file in closed if file in submitting]
    return {
        "watch": watch, "files": files, "pace": pace, "settle": settle, "poll_interval": poll_interval,
        "finished": finished, "claimed": len(to_claim),
        "claim_p50": percentile(to_claim, 0.5), "claim_p99": percentile(to_claim, 0.99), "claim_max": max(to_claim, default=float("nan")),
        "submit_p50": percentile(to_submit, 0.5), "submit_p99": percentile(to_submit, 0.99),
    }


def pickup(work: Path, *, files: int, pace: float, settle: float = 2.0, poll_interval: float = 2.0) -> Section:
    section = Section("4. pick-up latency")
    native = measure(work, "pickup-native", watch="native", files=files, pace=pace, settle=settle, poll_interval=poll_interval)
    polled = measure(work, "pickup-poll", watch="poll", files=files, pace=pace, settle=settle, poll_interval=poll_interval)
    for run, target, bound in (
        (native, f"settle + < {NATIVE_MARGIN * 1000:.0f} ms", settle + NATIVE_MARGIN),
        (polled, f"settle + poll interval + 100 ms ({settle:g}s + {poll_interval:g}s + 0.1s)", settle + poll_interval + NATIVE_MARGIN),
    ):
        section.rows.append(Row(
            "4", f"close -> claimed, {run['watch']} (settle {settle:g}s, {files} files, 1 every {pace * 1000:.0f} ms)",
            f"p99 <= {target}",
            f"p50 {fmt(run['claim_p50'], 3)}s, p99 {fmt(run['claim_p99'], 3)}s (= settle + {fmt((run['claim_p99'] - settle) * 1000, 0)} ms)",
            f"to submit: p50 {fmt(run['submit_p50'], 3)}s, p99 {fmt(run['submit_p99'], 3)}s",
            "",
            run["finished"] and run["claim_p99"] <= bound,
        ))
        if not run["finished"]:
            section.problems.append(f"{run['watch']}: only {run['claimed']} of {files} files were claimed in time")
    section.details = {"native": native, "poll": polled}
    return section
