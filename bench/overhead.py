"""Target 5: folderd's own cost per file, with an API that costs nothing.

N small JPEGs (64x48, unique contents) are in the inbox when the daemon starts; the fake
answers at once with no rate limit. Every file goes the whole way: detect (initial scan),
settle, claim (rename + 2 fsyncs + sha256), ledger (one fsync per loop turn), prepare,
the sync call, deliver (fsynced result, atomic rename), archive (move to done, fsync).

files/s = N / (last "archived" - first "claimed"), from the daemon's own log timestamps:
the pipeline's throughput, without interpreter start-up and the settle wait.
CPU s/file = the daemon process's user+system CPU from READY to the end / N (from /proc);
the fake server runs in the benchmark process and is not counted.

Baselines in the same run: the loop a user would write (for each file: requests.post as
in the API document, write the result, rename the original to done; no fsync, no ledger,
one call at a time), and folderd with the local engine instead of the API.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import API_KEY, DaemonProcess, Row, Section, fmt, steady_rate, unlimited_api, write_config, write_images
from tests.fake_clipdrop import SYNC_PATH, FakeClipdrop

FILES_PER_SECOND_TARGET = 100.0


def daemon_run(work: Path, name: str, *, backend: str, files: int) -> dict[str, Any]:
    root = work / name
    fake = FakeClipdrop(keys={API_KEY: 10**9}, rpm=10**9, window=1.0).start() if backend == "clipdrop" else None
    try:
        write_images(root / "inbox", files)
        config = write_config(
            root, backend=backend, folder={"settle": "200ms", **({"mode": "sync"} if backend == "clipdrop" else {})},
            clipdrop=unlimited_api(fake.base_url) if fake else None,
        )
        daemon = DaemonProcess(config).start()
        try:
            daemon.wait_ready()
            finished = daemon.wait_for(lambda: daemon.log.count("archived") + daemon.log.count("failed") >= files, 60 + files / 10, "all files", interval=0.25)
            cpu = daemon.cpu() - (daemon.cpu_at_ready or 0.0)
            memory = daemon.memory()
        finally:
            daemon.stop()
    finally:
        if fake is not None:
            fake.stop()
    claimed = daemon.log.times("claimed")
    archived = daemon.log.times("archived")
    span = max(archived) - min(claimed) if archived and claimed else float("nan")
    return {
        "backend": backend, "files": files, "finished": finished,
        "archived": len(archived), "failed": daemon.log.count("failed"),
        "seconds": span, "files_per_second": len(archived) / span if span else float("nan"),
        "claimed_per_s": steady_rate(claimed),
        "first_archive_after_first_claim_s": min(archived) - min(claimed) if archived and claimed else float("nan"),
        "cpu_seconds": cpu, "cpu_ms_per_file": cpu / max(1, len(archived)) * 1000,
        "rss_mb": memory.get("VmRSS"), "peak_rss_mb": memory.get("VmHWM"),
        "warnings": len(daemon.log.warnings),
    }


def naive_loop(work: Path, files: int) -> dict[str, Any]:
    """The user's loop: list the folder, post each file, write the result, move the original."""
    root = work / "naive-loop"
    inbox, outbox, done = root / "inbox", root / "outbox", root / "done"
    write_images(inbox, files)
    outbox.mkdir(parents=True, exist_ok=True)
    done.mkdir(parents=True, exist_ok=True)
    fake = FakeClipdrop(keys={API_KEY: 10**9}, rpm=10**9, window=1.0).start()
    try:
        started = time.monotonic()
        delivered = 0
        for name in sorted(os.listdir(inbox)):
            with open(inbox / name, "rb") as handle:
                response = requests.post(
                    fake.base_url + SYNC_PATH,
                    files={"image_file": (name, handle, "image/jpeg")},
                    data={"target_width": 128, "target_height": 96},
                    headers={"x-api-key": API_KEY},
                    timeout=60,
                )
            if response.ok:
                (outbox / name).write_bytes(response.content)
                os.rename(inbox / name, done / name)
                delivered += 1
        elapsed = time.monotonic() - started
    finally:
        fake.stop()
    return {"files": files, "delivered": delivered, "seconds": elapsed, "files_per_second": delivered / elapsed}


def overhead(work: Path, *, files: int, local: bool = True) -> Section:
    section = Section("5. overhead")
    api = daemon_run(work, "overhead-api", backend="clipdrop", files=files)
    naive = naive_loop(work, files)
    section.rows.append(Row(
        "5", f"files/s end to end, {files} small files, fake API (0 latency, no limit), fsync on",
        f">= {FILES_PER_SECOND_TARGET:.0f} files/s",
        f"{fmt(api['files_per_second'])} files/s, {fmt(api['cpu_ms_per_file'], 2)} ms CPU/file",
        f"naive loop {fmt(naive['files_per_second'])} files/s (no fsync)",
        f"{api['files_per_second'] / naive['files_per_second']:.2f}x",
        api["finished"] and api["files_per_second"] >= FILES_PER_SECOND_TARGET,
    ))
    details: dict[str, Any] = {"api": api, "naive_loop": naive}
    if not api["finished"]:
        section.problems.append(f"fake API: only {api['archived']} of {files} files were archived in time")
    if local:
        engine = daemon_run(work, "overhead-local", backend="local", files=files)
        details["local"] = engine
        section.rows.append(Row(
            "5", f"files/s end to end, {files} small files, local engine, fsync on",
            f">= {FILES_PER_SECOND_TARGET:.0f} files/s",
            f"{fmt(engine['files_per_second'])} files/s, {fmt(engine['cpu_ms_per_file'], 2)} ms CPU/file",
            "", "",
            engine["finished"] and engine["files_per_second"] >= FILES_PER_SECOND_TARGET,
        ))
        if not engine["finished"]:
            section.problems.append(f"local engine: only {engine['archived']} of {files} files were archived in time")
    section.details = details
    return section
