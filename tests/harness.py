"""Helpers for tests that drive the real folderd: folders, configs, images, daemon processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CANARY_KEY = "canary-KEY-5f3a9c0e7d1b"

# Sub-second timings so end-to-end tests stay fast; each test can override any key.
FAST_FOLDER = {"dedupe": False, "settle": "150ms", "poll_interval": "100ms", "rescan": "1s", "incomplete_timeout": "3s"}
FAST_CLIPDROP = {"retry_backoff": "50ms", "poll_interval": "200ms", "timeout": "5s", "pause_retry": "500ms", "max_attempts": 4, "requests_per_minute": 6000, "burst": 10}


def make_image(path: Path, size: tuple[int, int] = (64, 48), *, fmt: str | None = None, mode: str = "RGB", **save: Any) -> Path:
    """Write a small image with some structure (a gradient and a block) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste((200, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, fmt, **save)
    return path


def image_bytes(size: tuple[int, int] = (64, 48), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.linear_gradient("L").resize(size).convert(mode)
    image.save(buffer, fmt)
    return buffer.getvalue()


class Setup:
    """A folder layout under one tmp dir and a config file that points at it."""

    def __init__(self, root: Path, *, backend: str = "local", folders: int = 1, base_url: str | None = None, **overrides: Any) -> None:
        self.root = root
        self.state = root / "state"
        self.env = dict(os.environ)
        self.env.pop("FOLDERD_CONFIG", None)
        self.env.pop("CLIPDROP_API_KEY", None)
        self.env["FOLDERD_RETRY_BASE"] = "0.05"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.names = [f"f{index}" for index in range(folders)]
        folder_overrides = overrides.pop("folder", {})
        clipdrop_overrides = overrides.pop("clipdrop", {})
        self.data: dict[str, Any] = {
            "state_dir": str(self.state),
            "log": {"level": "debug", "format": "json"},
            "clipdrop": {**FAST_CLIPDROP, **({"base_url": base_url} if base_url else {}), **clipdrop_overrides},
            "folders": [
                {
                    "name": name,
                    "inbox": str(root / name / "inbox"),
                    "outbox": str(root / name / "outbox"),
                    "backend": backend,
                    **FAST_FOLDER,
                    **folder_overrides,
                }
                for name in self.names
            ],
            **overrides,
        }
        self.config = root / "config.yaml"
        self.write()

    def write(self) -> Path:
        self.config.write_text(yaml.safe_dump(self.data, sort_keys=False))
        return self.config

    def folder(self, index: int = 0) -> dict[str, Any]:
        return self.data["folders"][index]

    def path(self, kind: str, index: int = 0) -> Path:
        folder = self.folder(index)
        if kind in folder:
            return Path(folder[kind])
        return self.root / self.names[index] / kind

    @property
    def inbox(self) -> Path:
        return self.path("inbox")

    @property
    def outbox(self) -> Path:
        return self.path("outbox")

    @property
    def done(self) -> Path:
        return self.path("done")

    @property
    def failed(self) -> Path:
        return self.path("failed")

    def with_key(self, key: str = CANARY_KEY) -> Setup:
        self.env["CLIPDROP_API_KEY"] = key
        return self

    def ledger_jobs(self) -> dict[str, dict[str, Any]]:
        from folderd.ledger import read_only

        return read_only(self.state).jobs

    # ------------------------------------------------------------------ running

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "folderd", *args]

    def once(self, timeout: float = 60, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command("once", "-c", str(self.config), *extra), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args, "-c", str(self.config)), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def start(self) -> DaemonProcess:
        return DaemonProcess(self)


class DaemonProcess:
    """`folderd run` as a real child process, its log in a file."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.log_path = setup.root / f"daemon-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            setup.command("run", "-c", str(setup.config)), env=setup.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.process.poll() is not None:
                raise AssertionError(f"folderd exited with {self.process.returncode} while waiting for {what}:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()


def files(directory: Path) -> list[str]:
    """Visible files (not dot-files) in a directory, recursively, as sorted relative paths."""
    if not directory.exists():
        return []
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found.append(str(relative))
    return sorted(found)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def terminate(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
