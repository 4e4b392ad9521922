"""`folderd status`: a read-only view of the ledger and the daemon's status file.

Safe while the daemon runs: it takes no lock and writes nothing. The JSON form
(`--json`) is a stable interface, documented in the README:

  {"daemon":  {"running", "pid", "updated", "paused", "line"},
   "credits": {"remaining", "reported_at", "spent", "spent_today", "spent_this_month",
               "queued_estimate"},
   "folders": {NAME: {"queued", "in_flight", "delivered", "failed", "watch", "watch_reason",
                      "last_scan", "unavailable", "waiting_in_inbox", "oldest_pending", "jobs": [
                          {"id", "file", "state", "task_id", "age_seconds", "attempts", "error",
                           "held"}]}}}
"""

from __future__ import annotations

import json
import os
import time
from decimal import Decimal
from typing import Any

from folderd.config import Config
from folderd.credits import Spending
from folderd.ledger import LOCK, read_only

QUEUED = {"claimed", "prepared"}


def _daemon_pid(config: Config, locks: str = "/proc/locks") -> int | None:
    """The pid of the daemon holding the state directory's lock, or None.

    Read from /proc/locks rather than by taking the lock (which could make a daemon that is
    starting at that moment refuse to start) or by trusting the pid written in the file
    (a stale pid may belong to another process by now).
    """
    try:
        info = os.stat(config.state_dir / LOCK)
        with open(locks, encoding="ascii", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (the major:minor are hex)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5].count(":") == 2:
                    major, minor, inode = fields[5].split(":")
                    if int(inode) == info.st_ino and os.makedev(int(major, 16), int(minor, 16)) == info.st_dev:
                        return int(fields[4])
    except (OSError, ValueError):
        return None
    return None


def collect(config: Config, now: float | None = None) -> dict[str, Any]:
    """Return the status document for `config`'s state directory (see the module docstring)."""
    now = time.time() if now is None else now
    ledger = read_only(config.state_dir)
    try:
        runtime = json.loads((config.state_dir / "status.json").read_text())
    except (OSError, ValueError):
        runtime = {}
    pid = _daemon_pid(config)
    held = runtime.get("held", {}) if pid else {}
    queued_estimate = Decimal(0)
    folders: dict[str, dict[str, Any]] = {}
    for rule in config.folders:
        watched = runtime.get("folders", {}).get(rule.name, {}) if pid else {}
        folders[rule.name] = {
            "queued": 0, "in_flight": 0, "delivered": 0, "failed": 0,
            "watch": watched.get("watch"), "watch_reason": watched.get("watch_reason"),
            "last_scan": watched.get("last_scan"), "unavailable": watched.get("unavailable"),
            "waiting_in_inbox": watched.get("waiting_in_inbox", 0),
            "oldest_pending": None, "jobs": [],
        }
    for job in ledger.jobs.values():
        folder = folders.get(job.get("folder", ""))
        if folder is None:
            continue
        state = job.get("state")
        if state == "archived":
            folder["delivered"] += 1
        elif state == "failed":
            folder["failed"] += 1
        else:
            folder["queued" if state in QUEUED else "in_flight"] += 1
            created = job.get("created", now)
            folder["oldest_pending"] = min(folder["oldest_pending"] or created, created)
            if state in ("claimed", "prepared", "submitting"):
                queued_estimate += Decimal(job.get("credits_estimate") or "0")
            folder["jobs"].append({
                "id": job["id"], "file": job.get("source"), "state": state, "task_id": job.get("task_id"),
                "age_seconds": round(now - created, 1), "attempts": job.get("attempts", 0),
                "error": (job.get("error") or {}).get("reason"), "held": held.get(job["id"]),
            })
    for folder in folders.values():
        folder["jobs"].sort(key=lambda item: -item["age_seconds"])
    meta = ledger.meta
    spending = Spending(meta.get("spent_by_day"))
    return {
        "daemon": {
            "running": pid is not None, "pid": pid, "updated": runtime.get("updated") if pid else None,
            "paused": meta.get("paused") if pid else None, "line": runtime.get("line") if pid else None,
        },
        "credits": {
            "remaining": meta.get("credits_remaining"), "reported_at": meta.get("credits_reported_at"),
            "spent": meta.get("credits_spent", "0"), "spent_today": str(spending.today()),
            "spent_this_month": str(spending.this_month()), "queued_estimate": str(queued_estimate),
        },
        "folders": folders,
    }


def _when(value: float | None, now: float) -> str:
    if not value:
        return "never"
    return f"{_age(now - value)} ago"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def render(document: dict[str, Any], now: float | None = None) -> str:
    """The status document as text for people."""
    now = time.time() if now is None else now
    daemon = document["daemon"]
    lines = [f"daemon: running (pid {daemon['pid']})" if daemon["running"] else "daemon: not running"]
    if daemon.get("paused"):
        lines.append(f"API PAUSED: {daemon['paused']}")
    credits = document["credits"]
    remaining = credits["remaining"] if credits["remaining"] is not None else "unknown"
    lines.append(f"credits: {remaining} left (last reported {_when(credits['reported_at'], now)})")
    lines.append(
        f"spent: {credits['spent_today']} today, {credits['spent_this_month']} this month, {credits['spent']} in all; "
        f"queued jobs ~{credits['queued_estimate']}"
    )
    for name, folder in document["folders"].items():
        lines.append("")
        lines.append(f"{name}: {folder['queued']} queued, {folder['in_flight']} in flight, {folder['delivered']} delivered, {folder['failed']} failed")
        if folder["watch"]:
            lines.append(f"  watch: {folder['watch']} ({folder['watch_reason']}); last scan {_when(folder['last_scan'], now)}")
        if folder["unavailable"]:
            lines.append(f"  INBOX UNAVAILABLE: {folder['unavailable']}")
        if folder["oldest_pending"]:
            lines.append(f"  oldest pending: {_age(now - folder['oldest_pending'])}")
        for job in folder["jobs"][:50]:
            task = f" task {job['task_id']}" if job["task_id"] else ""
            error = f" ({job['error']})" if job["error"] else ""
            error += f" [waits: {job['held']}]" if job.get("held") else ""
            lines.append(f"  {job['state']:<10} {job['file']}{task}, {_age(job['age_seconds'])} old, job {job['id']}{error}")
        if len(folder["jobs"]) > 50:
            lines.append(f"  ... and {len(folder['jobs']) - 50} more")
    return "\n".join(lines)


__all__ = ["collect", "render"]
