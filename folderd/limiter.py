"""One rate budget per API key, spent evenly.

The API allows `requests_per_minute` calls and does not say over which window, so calls
are spread: a GCRA (generic cell rate algorithm, a leaky bucket kept as one timestamp)
admits a call at most every 60/rpm seconds, letting `burst` calls go back to back after an
idle spell. It never sleeps: the supervisor asks `wait_time()` and dispatches when it is 0,
so waiting for the budget blocks nothing else.
"""

from __future__ import annotations

from collections.abc import Callable


class RateLimiter:
    """GCRA over a clock that is passed in (tests use a fake one)."""

    # Spaced 2 % wider than the budget: arrival jitter on the way to the API (a few ms) must
    # never tip a call over a window it counts exactly; the budget is still 98 % used.
    MARGIN = 1.02

    def __init__(
        self, requests_per_minute: int, burst: int = 1, clock: Callable[[], float] | None = None, *, margin: float = MARGIN
    ) -> None:
        import time

        self.interval = 60.0 / requests_per_minute * margin
        self.tolerance = self.interval * (max(1, burst) - 1)
        self.clock = clock or time.monotonic
        # Theoretical arrival time of the next call; admitting a call moves it one interval on.
        self.tat = 0.0
        self.paused_until = 0.0

    def wait_time(self, now: float | None = None) -> float:
        """Seconds until a call may go (0 when one may go now)."""
        now = self.clock() if now is None else now
        earliest = max(self.tat - self.tolerance, self.paused_until)
        return max(0.0, earliest - now)

    def try_acquire(self, now: float | None = None) -> bool:
        """Spend one call of the budget if it is available now."""
        now = self.clock() if now is None else now
        if self.wait_time(now) > 0:
            return False
        self.tat = max(self.tat, now) + self.interval
        return True

    def pause(self, seconds: float, now: float | None = None) -> None:
        """The API said 429: no call of this key goes for `seconds`, then the budget starts afresh."""
        now = self.clock() if now is None else now
        self.paused_until = max(self.paused_until, now + seconds)
        # After the pause, calls resume at the steady rate, not in a burst.
        self.tat = max(self.tat, self.paused_until + self.tolerance)
