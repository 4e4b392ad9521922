"""`folderd plan`: what would happen to each file in the inboxes now, and what it would cost.

A dry run: reads headers only, calls no API, moves nothing.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from folderd.config import Config
from folderd.errors import ImageError
from folderd.imaging import completeness, probe
from folderd.routing import route
from folderd.watch import walk_inbox


def plan(config: Config) -> list[dict[str, Any]]:
    """One entry per file now in an inbox: folder, file, and either the route or why it would be refused."""
    entries: list[dict[str, Any]] = []
    for rule in config.folders:
        try:
            found = walk_inbox(rule)
        except OSError as error:
            entries.append({"folder": rule.name, "file": None, "refused": f"inbox unreadable: {error.strerror or error}"})
            continue
        for relpath in sorted(found):
            path = rule.inbox / relpath
            entry: dict[str, Any] = {"folder": rule.name, "file": relpath, "backend": rule.backend}
            verdict, reason = completeness(path)
            if verdict != "complete":
                entry["refused"] = reason if verdict == "invalid" else f"not complete yet: {reason}"
                entries.append(entry)
                continue
            try:
                info = probe(path)
                decision = route(rule, info)
            except ImageError as error:
                entry["refused"] = str(error)
            else:
                entry.update(
                    input=f"{info.width}x{info.height} {info.format}",
                    mode=decision.mode,
                    strategy=decision.strategy,
                    target=f"{decision.width}x{decision.height}",
                    credits=decision.credits_estimate,
                    converted=decision.convert,
                    clamped=decision.clamped,
                )
            entries.append(entry)
    return entries


def render(entries: list[dict[str, Any]]) -> str:
    lines = []
    total = Decimal(0)
    refused = 0
    for entry in entries:
        name = f"{entry['folder']}/{entry['file']}" if entry["file"] else entry["folder"]
        if "refused" in entry:
            refused += 1
            lines.append(f"{name}: REFUSED: {entry['refused']}")
            continue
        total += Decimal(entry["credits"])
        notes = [note for note, flag in (("converted first", entry["converted"]), ("shrunk to the endpoint's limit", entry["clamped"])) if flag]
        extra = f" ({', '.join(notes)})" if notes else ""
        lines.append(
            f"{name}: {entry['input']} -> {entry['target']} {entry['backend']} {entry['mode']}/{entry['strategy']}, "
            f"~{entry['credits']} credits{extra}"
        )
    files = len(entries) - refused
    lines.append(f"total: {files} file(s) to upscale, ~{total} credits estimated; {refused} would be refused")
    return "\n".join(lines)
