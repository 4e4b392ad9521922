"""`folderd once`: a progress bar on a terminal, a progress log event per finished file otherwise."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from folderd import logs

log = logs.get("folderd")


class Progress:
    """`folderd once`: a progress bar on a terminal, a plain log line per finished file otherwise."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.total = 0
        self.done = 0
        self.credits = Decimal(0)
        self.started = time.monotonic()
        self._shown = ""

    def finished(self, job: dict[str, Any]) -> None:
        self.done += 1
        self.credits += Decimal(job.get("credits") or "0")
        if not self.tty:
            log.info("progress", done=self.done, total=self.total, credits=str(self.credits), eta_seconds=self.eta())

    def eta(self) -> float | None:
        if not self.done or self.total <= self.done:
            return None
        return round((time.monotonic() - self.started) / self.done * (self.total - self.done), 1)

    def show(self, waiting: int) -> None:
        if not self.tty:
            return
        total = max(self.total + waiting, 1)
        width = 30
        filled = int(width * self.done / total)
        eta = self.eta()
        eta_text = f"ETA {int(eta // 60)}:{int(eta % 60):02d}" if eta is not None else "ETA --:--"
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{total} files, {self.credits} credits, {eta_text}"
        if line != self._shown:
            self._shown = line
            self.stream.write("\r" + line)
            self.stream.flush()

    def close(self) -> None:
        """Leave the final bar on a line of its own, so that what follows (a shell prompt) starts on a new one."""
        if self._shown:
            self.stream.write("\r\x1b[K" + self._shown + "\n")
            self.stream.flush()
