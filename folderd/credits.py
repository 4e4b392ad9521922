"""Credits: what has been spent per day and month, and whether a job may spend more.

Spending is kept in the ledger's meta facts as {"YYYY-MM-DD": {"*": total, folder: amount}}
(local dates, the last 62 days), so caps survive restarts. A job whose estimate would take
today's or this month's spending (plus what calls in flight may still charge) past a cap
waits: it stays queued, it does not fail, and it goes when the cap resets at midnight or
is raised by a reload.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from folderd.config import Budget

ALL = "*"
KEEP_DAYS = 62


def wall_clock() -> float:
    """The time of day used for caps. FOLDERD_CLOCK_OFFSET_FILE (tests only) shifts it by the
    number of seconds the file holds, so a test can move a running daemon past midnight."""
    offset_file = os.environ.get("FOLDERD_CLOCK_OFFSET_FILE")
    now = time.time()
    if offset_file:
        try:
            with open(offset_file) as handle:
                now += float(handle.read().strip() or 0)
        except (OSError, ValueError):
            pass
    return now


def day_of(moment: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(moment))


class Spending:
    """Credits spent per local day, in total and per folder."""

    def __init__(self, by_day: dict[str, dict[str, str]] | None = None, clock: Callable[[], float] = wall_clock) -> None:
        self.by_day: dict[str, dict[str, str]] = {day: dict(amounts) for day, amounts in (by_day or {}).items()}
        self.clock = clock

    def add(self, folder: str, amount: Decimal) -> None:
        day = day_of(self.clock())
        amounts = self.by_day.setdefault(day, {})
        for key in (ALL, folder):
            amounts[key] = str(Decimal(amounts.get(key, "0")) + amount)
        for old in sorted(self.by_day)[:-KEEP_DAYS]:
            del self.by_day[old]

    def today(self, folder: str = ALL) -> Decimal:
        return Decimal(self.by_day.get(day_of(self.clock()), {}).get(folder, "0"))

    def this_month(self, folder: str = ALL) -> Decimal:
        month = day_of(self.clock())[:7]
        return sum((Decimal(amounts.get(folder, "0")) for day, amounts in self.by_day.items() if day.startswith(month)), Decimal(0))

    def over_cap(self, folder: str, estimate: Decimal, reserved: Decimal, reserved_folder: Decimal, key: Budget, folder_budget: Budget) -> str | None:
        """Return why spending `estimate` now would cross a cap, or None if it may go."""
        checks = (
            ("the daily credit cap", key.daily, self.today(), reserved),
            ("the monthly credit cap", key.monthly, self.this_month(), reserved),
            (f"folder {folder}'s daily credit cap", folder_budget.daily, self.today(folder), reserved_folder),
            (f"folder {folder}'s monthly credit cap", folder_budget.monthly, self.this_month(folder), reserved_folder),
        )
        for what, cap, spent, pending in checks:
            if cap is not None and spent + pending + estimate > cap:
                return f"{what} of {cap} would be crossed ({spent} spent, {pending} in flight, this file ~{estimate})"
        return None

    def as_meta(self) -> dict[str, Any]:
        return self.by_day
