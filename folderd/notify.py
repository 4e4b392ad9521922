"""systemd's notify protocol: READY=1, STATUS=, WATCHDOG=1, STOPPING=1, RELOADING=1.

systemd-python's `daemon.notify` is used when installed; otherwise the protocol itself,
which is one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (an abstract socket
when the name starts with '@').
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends notify messages when running under systemd; does nothing otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET") or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the deadline, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(usec) / 1_000_000 / 2
        self._socket: socket.socket | None = None
        self._last_status = ""
        self._systemd_notify = None
        if self.address:
            try:
                from systemd import daemon  # type: ignore[import-not-found,attr-defined,unused-ignore]

                self._systemd_notify = daemon.notify
            except ImportError:
                self._systemd_notify = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        message = "\n".join(lines)
        if self._systemd_notify is not None:
            self._systemd_notify(message)
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode("utf-8"), address)
        except OSError:
            pass  # systemd gone or the socket full: the daemon's work matters more

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 match RELOADING=1 with the following READY=1.
        self.send("RELOADING=1", f"MONOTONIC_USEC={int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
