"""Logging: structlog, console on a TTY, JSON lines otherwise, the journal under systemd.

Every event passes `redact` last before rendering: registered secrets (the API key) and
the query strings of URLs (signed download URLs carry their signature there) are replaced
in messages, fields and formatted exception texts alike.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"
_URL_QUERY = re.compile(r"(https?://[^\s?#'\"<>]+)\?[^\s#'\"<>]*")
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never let `value` reach a log line."""
    if value and len(value) >= 4:
        _secrets.add(value)


def reset_secrets() -> None:
    _secrets.clear()


def scrub_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _URL_QUERY.sub(lambda match: f"{match.group(1)}?{REDACTED}", text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(item) for item in value)
    if isinstance(value, BaseException):
        return scrub_text(f"{type(value).__name__}: {value}")
    return value


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: scrub every field, including the rendered exception."""
    for key in list(event_dict):
        event_dict[key] = _scrub(event_dict[key])
    return event_dict


class _RedactingFilter(logging.Filter):
    """The same scrubbing for records from other libraries' stdlib loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub_text(record.getMessage())
        record.args = None
        return True


def under_journal() -> bool:
    """True when stderr is systemd's journal stream (JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream or ":" not in stream:
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{info.st_dev}:{info.st_ino}"


class _JournalRenderer:
    """Send events to journald with their fields as journal fields (JOB_ID, FOLDER, TASK_ID, ...)."""

    def __init__(self, send: Any) -> None:
        self._send = send

    def __call__(self, _logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        priority = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}.get(event_dict.pop("level", name), 6)
        message = str(event_dict.pop("event", ""))
        fields = {re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_") or "FIELD": str(value) for key, value in event_dict.items()}
        text = message + "".join(f" {key.lower()}={value}" for key, value in fields.items() if key not in ("TIMESTAMP", "EXCEPTION"))
        self._send(text, PRIORITY=str(priority), SYSLOG_IDENTIFIER="folderd", **fields)
        raise structlog.DropEvent


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog (and the stdlib loggers of libraries) for the daemon and the CLI."""
    stream = stream or sys.stderr
    numeric = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    renderer: Any
    journal_send = None
    if fmt == "auto" and under_journal():
        try:
            from systemd import journal  # type: ignore[import-not-found,attr-defined,unused-ignore]

            journal_send = journal.send
        except ImportError:
            journal_send = None
    if journal_send is not None:
        renderer = _JournalRenderer(journal_send)
    elif fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty()):
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RedactingFilter())
    if journal_send is None:
        # Other libraries' log records are rendered like folderd's own (JSON lines stay JSON).
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processor=renderer,
                foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.INFO))
    # urllib3 logs request lines with full URLs at debug level; keep it quiet.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    # watchdog reports an emitter stopped while an inbox is unscheduled (a reload) as an
    # error; folderd reports real watching failures itself.
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)


def get(name: str = "folderd") -> Any:
    return structlog.get_logger(name)
