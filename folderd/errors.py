"""Every exception folderd raises on purpose, named for what went wrong."""

from __future__ import annotations


class FolderdError(Exception):
    """Base class of folderd's own errors."""


class ConfigError(FolderdError):
    """The configuration file is invalid.

    Holds the file name and every problem found, so that one run reports all of them.
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{self.path}: {len(self.problems)} configuration error(s):"]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


class StateError(FolderdError):
    """The state directory cannot be used (locked by another daemon, unwritable, corrupt)."""


class DurabilityError(FolderdError):
    """A write or fsync that a durable step depends on failed (disk full, EIO).

    The daemon stops rather than carry on with state it cannot keep.
    """


class ImageError(FolderdError):
    """An input is not an image folderd can take; the message says why, for people."""


class ApiError(FolderdError):
    """A Clipdrop call failed.

    `kind` says what to do about it:
      auth       401/403 — the key is missing, invalid or revoked: pause the backend.
      credits    402 — no credits left: pause the backend.
      rate       429 — the key is over its rate limit: pause all calls of the key.
      transient  5xx, timeouts, resets, truncated bodies: retry with backoff.
      rejected   400/413/other 4xx — this input will never pass: fail the job.
      expired    the signed download URL no longer works: ask /result again.
    `maybe_processed` is true when the request may have reached the API, so that a
    retry of a paid call may pay twice.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        maybe_processed: bool = False,
    ) -> None:
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.maybe_processed = maybe_processed
        super().__init__(message)
