"""What every benchmark needs: configs, test images, the daemon as a real process, its logs.

The daemon always runs as `python -m folderd run` in its own process, with fsync on, so
its CPU time and memory can be read from /proc without the benchmark's own threads (the
fake API server runs in the benchmark process) getting mixed in.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-key-5f3a9c0e7d1b"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
API_ENDPOINTS = ("sync", "submit", "status", "result")


# ------------------------------------------------------------------ images


def jpeg_template(size: tuple[int, int] = (64, 48)) -> bytes:
    """A small, whole JPEG with some structure."""
    width, height = size
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste((200, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def unique_jpeg(template: bytes, index: int) -> bytes:
    """The template with a COM segment naming `index`: a valid JPEG whose hash is unique.

    Unique contents matter: folderd serves identical inputs from an earlier result (dedupe),
    which would skip the API call the benchmark means to measure.
    """
    payload = f"folderd-bench {index}".encode()
    return template[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + template[2:]


def write_images(directory: Path, count: int, *, prefix: str = "img", start: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    template = jpeg_template()
    paths = []
    for index in range(start, start + count):
        path = directory / f"{prefix}{index:06d}.jpg"
        with open(path, "wb") as handle:
            handle.write(unique_jpeg(template, index))
        paths.append(path)
    return paths


# ------------------------------------------------------------------ configs


def write_config(
    root: Path,
    *,
    backend: str,
    base_url: str | None = None,
    folder: dict[str, Any] | None = None,
    clipdrop: dict[str, Any] | None = None,
    level: str = "info",
) -> Path:
    """One folder f0 under `root`; return the config file's path."""
    data: dict[str, Any] = {
        "state_dir": str(root / "state"),
        "log": {"level": level, "format": "json"},
        "clipdrop": {**({"base_url": base_url} if base_url else {}), **(clipdrop or {})},
        "folders": [
            {
                "name": "f0",
                "inbox": str(root / "inbox"),
                "outbox": str(root / "outbox"),
                "done": str(root / "done"),
                "failed": str(root / "failed"),
                "backend": backend,
                **(folder or {}),
            }
        ],
    }
    for name in ("inbox", "outbox", "done", "failed"):
        (root / name).mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def unlimited_api(base_url: str) -> dict[str, Any]:
    """Client settings that never wait for the rate budget (for overhead and latency runs)."""
    return {"base_url": base_url, "requests_per_minute": 100_000, "burst": 1000}


# ------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident set) of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _unit = line.split()
                values[name[:-1]] = int(amount) / 1024
    return values


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# ------------------------------------------------------------------ the daemon


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET.

    It is drained all the time: folderd sends STATUS= on every loop turn that changes the
    status line, and a full socket would block its sendto().
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.2)
        self.ready_at: float | None = None
        self.messages = 0
        self.ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages += 1
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                self.ready_at = time.monotonic()
                self.ready.set()

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.socket.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


@dataclass
class JobEvent:
    time: float     # epoch seconds, from the log line's timestamp
    state: str
    file: str
    job_id: str


class LogReader:
    """Reads the daemon's JSON log lines as they come; keeps job state changes and warnings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.jobs: list[JobEvent] = []
        self.counts: dict[str, int] = {}
        self.warnings: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []
        self._partial = b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("event") == "job" and "state" in event:
                state = event["state"]
                self.jobs.append(JobEvent(parse_time(event.get("timestamp")), state, event.get("file", ""), event.get("job_id", "")))
                self.counts[state] = self.counts.get(state, 0) + 1
            elif event.get("level") in ("warning", "error"):
                self.warnings.append(event)
            elif len(self.other) < 1000:
                self.other.append(event)

    def count(self, state: str) -> int:
        return self.counts.get(state, 0)

    def times(self, state: str) -> list[float]:
        return [event.time for event in self.jobs if event.state == state]

    def first_by_file(self, state: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for event in self.jobs:
            if event.state == state and event.file not in found:
                found[event.file] = event.time
        return found


def parse_time(text: Any) -> float:
    if not isinstance(text, str):
        return float("nan")
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class DaemonProcess:
    """`folderd run -c CONFIG` as a child process with its log in a file and READY on a socket."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None, name: str = "daemon") -> None:
        self.config = config
        self.root = config.parent
        self.log_path = self.root / f"{name}.log"
        self.notify = NotifyListener(self.root / f"{name}.notify")
        self.env = dict(os.environ)
        for variable in ("FOLDERD_UNSAFE_NO_FSYNC", "FOLDERD_CONFIG", "WATCHDOG_USEC", "WATCHDOG_PID"):
            self.env.pop(variable, None)
        self.env.update({"CLIPDROP_API_KEY": API_KEY, "NOTIFY_SOCKET": str(self.notify.path), "PYTHONUNBUFFERED": "1"})
        self.env.update(env or {})
        self.log = LogReader(self.log_path)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.cpu_at_ready: float | None = None
        self.memory_at_ready: dict[str, float] = {}

    def start(self) -> DaemonProcess:
        self._log_file = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "folderd", "run", "-c", str(self.config)],
            env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait for READY=1; return seconds from spawn to READY."""
        deadline = time.monotonic() + timeout
        while not self.notify.ready.wait(0.05):
            if not self.alive():
                raise RuntimeError(f"folderd exited ({self.process.returncode if self.process else '?'}) before READY:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no READY=1 within {timeout:g}s:\n{self.tail()}")
        self.cpu_at_ready = cpu_seconds(self.pid)
        self.memory_at_ready = memory_mb(self.pid)
        assert self.notify.ready_at is not None
        return self.notify.ready_at - self.started_at

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> bool:
        """Poll the log until `predicate()`; return False on timeout (the caller reports it)."""
        deadline = time.monotonic() + timeout
        while True:
            self.log.poll()
            if predicate():
                return True
            if not self.alive():
                raise RuntimeError(f"folderd exited while waiting for {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, float]:
        return memory_mb(self.pid)

    def tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait; return seconds it took to exit."""
        started = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        self.notify.close()
        self.log.poll()
        return time.monotonic() - started


# ------------------------------------------------------------------ statistics


def percentile(values: Iterable[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def max_in_window(times: Iterable[float], window: float) -> int:
    """The largest number of events in any half-open window (t - window, t]."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def steady_rate(times: Iterable[float]) -> float:
    """Events per second between the first and the last event: (n - 1) / span."""
    ordered = sorted(times)
    if len(ordered) < 2 or ordered[-1] <= ordered[0]:
        return float("nan")
    return (len(ordered) - 1) / (ordered[-1] - ordered[0])


# ------------------------------------------------------------------ results


@dataclass
class Row:
    """One line of the results table."""

    target_id: str
    metric: str
    target: str
    measured: str
    baseline: str = ""
    ratio: str = ""
    ok: bool | None = None          # None: information only
    note: str = ""


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"
