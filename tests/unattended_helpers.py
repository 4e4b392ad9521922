"""Helpers for tests/test_unattended.py: a notify-socket listener, FUSE (bindfs) mounts, stubs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket.

    `address` is a path or, starting with '@', an abstract name (the form $NOTIFY_SOCKET uses).
    Every datagram is kept with the monotonic time it arrived; `on_message(text)` runs in the
    receiving thread the moment it arrives (before the next datagram is read).
    """

    def __init__(self, address: str, on_message: Callable[[str], None] | None = None) -> None:
        self.address = address
        self.on_message = on_message
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            if self.on_message is not None:
                self.on_message(text)
            with self._lock:
                self.messages.append((time.monotonic(), text))

    def texts(self) -> list[str]:
        with self._lock:
            return [text for _, text in self.messages]

    def fields(self) -> list[dict[str, str]]:
        """Each datagram as {NAME: value} (a datagram holds newline-separated NAME=value lines)."""
        return [dict(line.split("=", 1) for line in text.split("\n") if "=" in line) for text in self.texts()]

    def index(self, predicate: Callable[[dict[str, str]], bool], start: int = 0) -> int | None:
        for position, fields in enumerate(self.fields()):
            if position >= start and predicate(fields):
                return position
        return None

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 15.0, start: int = 0, what: str = "message") -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.index(predicate, start)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no notify {what} within {timeout}s; got {self.texts()!r}")

    def times_of(self, predicate: Callable[[dict[str, str]], bool]) -> list[float]:
        with self._lock:
            messages = list(self.messages)
        out = []
        for when, text in messages:
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            if predicate(fields):
                out.append(when)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


# ---------------------------------------------------------------------------------- FUSE


def fuse_problem() -> str | None:
    """Why a bindfs FUSE mount cannot be made here, or None."""
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (apt-get install bindfs fuse3)"
    if not (shutil.which("fusermount3") or shutil.which("fusermount") or os.geteuid() == 0):
        return "no fusermount3 to unmount a FUSE mount as this user"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this container)"
    return None


def is_mounted(point: Path) -> bool:
    target = os.path.realpath(point)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            return any(line.split()[4].replace("\\040", " ") == target for line in handle if len(line.split()) > 4)
    except OSError:
        return False


class BindMount:
    """`bindfs -f BACKING POINT` as a child process (foreground, so it can be paused and resumed)."""

    def __init__(self, backing: Path, point: Path) -> None:
        self.backing = backing
        self.point = point
        backing.mkdir(parents=True, exist_ok=True)
        point.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["bindfs", "-f", "--no-allow-other", str(backing), str(point)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while not is_mounted(point):
            if self.process.poll() is not None or time.monotonic() > deadline:
                error = self.process.stderr.read().decode(errors="replace") if self.process.stderr and self.process.poll() is not None else "timed out"
                self.process.kill() if self.process.poll() is None else None
                self.process = None
                raise OSError(f"bindfs could not mount {point}: {error.strip()}")
            time.sleep(0.05)

    def freeze(self) -> None:
        """SIGSTOP bindfs: every access to the mount now blocks, like a hung NAS."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def unmount(self) -> None:
        self.thaw()
        if is_mounted(self.point):
            tool = shutil.which("fusermount3") or shutil.which("fusermount")
            command = [tool, "-u", str(self.point)] if tool else ["umount", str(self.point)]
            if subprocess.run(command, capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.point)], capture_output=True)
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


# ---------------------------------------------------------------------------------- stubs


def hide_systemd_python(directory: Path) -> str:
    """A PYTHONPATH entry whose `systemd` package refuses to import: folderd's fallback paths run."""
    package = directory / "systemd"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('raise ImportError("systemd-python hidden by the test")\n')
    return str(directory)


JOURNAL_STUB = '''
import json, os

def send(MESSAGE, **fields):
    """Stand-in for systemd.journal.send: one JSON line per call in $FOLDERD_TEST_JOURNAL."""
    with open(os.environ["FOLDERD_TEST_JOURNAL"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"MESSAGE": MESSAGE, **{key: str(value) for key, value in fields.items()}}) + "\\n")
'''


def journal_stub(directory: Path) -> str:
    """A PYTHONPATH entry with a `systemd.journal.send` that records calls to $FOLDERD_TEST_JOURNAL."""
    package = directory / "systemd"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "journal.py").write_text(JOURNAL_STUB)
    return str(directory)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def journald_running() -> bool:
    return os.path.exists("/run/systemd/journal/socket") and shutil.which("journalctl") is not None


def json_lines(text: str) -> list[dict[str, Any]]:
    import json

    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out
