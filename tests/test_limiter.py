"""The rate limiter (GCRA) on a fake clock: bursts, steady spacing, and pausing after a 429."""

from __future__ import annotations

import itertools
import random

import pytest

from folderd import limiter as limiter_module


def RateLimiter(rpm: int, burst: int = 1, clock: object = None) -> limiter_module.RateLimiter:  # noqa: N802
    """The GCRA itself, without the daemon's 2 % safety margin, so spacings are exact here."""
    return limiter_module.RateLimiter(rpm, burst, clock, margin=1.0)  # type: ignore[arg-type]


def test_default_margin_spaces_calls_two_percent_wider() -> None:
    """The daemon's limiter keeps 2 % under the budget: 60 rpm means one call every 1.02 s."""
    clock = FakeClock()
    limiter = limiter_module.RateLimiter(60, 1, clock)
    assert limiter.try_acquire()
    assert limiter.wait_time() == pytest.approx(1.02)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(limiter: RateLimiter, clock: FakeClock, until: float, step: float = 0.001) -> list[float]:
    """Call as often as the limiter allows, checking every `step` seconds, until the clock passes `until`."""
    admitted = []
    start = clock.now
    tick = 0
    while clock.now <= until:
        while limiter.try_acquire():
            admitted.append(clock.now)
        tick += 1
        clock.now = start + tick * step  # no accumulated float error
    return admitted


def first_instant(limiter: RateLimiter, clock: FakeClock) -> int:
    """How many calls go back to back now (within a microsecond: float rounding is no reason to wait)."""
    return len(drain(limiter, clock, clock.now + 1e-6, step=1e-7))


@pytest.mark.parametrize(("rpm", "burst"), [(60, 1), (60, 2), (120, 5), (6000, 10)])
def test_first_instant_admits_at_most_burst_calls(rpm: int, burst: int) -> None:
    """From idle, exactly 1 + (burst - 1) calls go at once; the next has to wait one interval."""
    clock = FakeClock()
    limiter = RateLimiter(rpm, burst, clock)
    assert first_instant(limiter, clock) == burst
    assert limiter.wait_time() == pytest.approx(60.0 / rpm, abs=1e-5)


@pytest.mark.parametrize(("rpm", "burst"), [(60, 1), (60, 3), (600, 4)])
def test_steady_state_is_evenly_spaced(rpm: int, burst: int) -> None:
    """After the initial burst, calls are admitted exactly 60/rpm seconds apart, never closer."""
    interval = 60.0 / rpm
    clock = FakeClock()
    limiter = RateLimiter(rpm, burst, clock)
    admitted = drain(limiter, clock, clock.now + 20 * interval, step=interval / 50)
    assert admitted[burst - 1] - admitted[0] <= interval / 50 + 1e-9  # the burst goes at once (to the next check)
    gaps = [later - earlier for earlier, later in itertools.pairwise(admitted[burst - 1 :])]
    assert len(gaps) >= 18
    for gap in gaps:
        assert gap == pytest.approx(interval, abs=interval / 50 + 1e-9)
    assert len(admitted) == burst + len(gaps)


def test_wait_time_is_exactly_when_the_next_call_may_go() -> None:
    """wait_time() says how long until try_acquire succeeds: before it, refused; at it, admitted."""
    clock = FakeClock()
    limiter = RateLimiter(30, 1, clock)  # one call every 2 s
    assert limiter.wait_time() == 0 and limiter.try_acquire()
    wait = limiter.wait_time()
    assert wait == pytest.approx(2.0)
    clock.advance(wait - 0.01)
    assert not limiter.try_acquire()
    assert limiter.wait_time() == pytest.approx(0.01)
    clock.advance(0.01)
    assert limiter.try_acquire()


def test_an_idle_spell_earns_at_most_one_burst() -> None:
    """However long the limiter was idle, it never lets more than `burst` calls go back to back."""
    clock = FakeClock()
    limiter = RateLimiter(60, 3, clock)
    drain(limiter, clock, clock.now + 5)
    clock.advance(3600)
    assert first_instant(limiter, clock) == 3


def test_no_window_ever_exceeds_the_budget() -> None:
    """Under random demand, any window of W seconds holds at most burst + W x rpm / 60 calls."""
    rng = random.Random(7)
    rpm, burst = 120, 4
    interval = 60.0 / rpm
    clock = FakeClock()
    limiter = RateLimiter(rpm, burst, clock)
    admitted: list[float] = []
    for _ in range(4000):
        clock.advance(rng.choice([0.0, 0.001, 0.05, 0.2, 1.5]))
        for _ in range(rng.randint(0, 3)):
            if limiter.try_acquire():
                admitted.append(clock.now)
    assert len(admitted) > 100
    for window in (0.0, 0.25, 1.0, 5.0, 30.0):
        end = 0
        for start, time_ in enumerate(admitted):
            while end < len(admitted) and admitted[end] <= time_ + window + 1e-9:
                end += 1
            assert end - start <= burst + window / interval + 1e-6, (window, time_)


def test_pause_holds_every_call_then_resumes_at_the_steady_rate() -> None:
    """After pause() (a 429) nothing goes until it ends; then one call, then 60/rpm spacing, not a fresh burst."""
    clock = FakeClock()
    limiter = RateLimiter(60, 5, clock)
    assert limiter.try_acquire()
    start = clock.now
    limiter.pause(10.0)
    held = drain(limiter, clock, start + 10.0 - 0.002)
    assert held == []
    assert limiter.wait_time() == pytest.approx(start + 10.0 - clock.now, abs=1e-9)
    resumed = drain(limiter, clock, start + 14.0 + 0.0005, step=0.001)
    assert resumed[0] == pytest.approx(start + 10.0, abs=0.002)
    assert len(resumed) == 5, resumed  # at 10, 11, 12, 13, 14: one per second, not 5 at once
    for earlier, later in itertools.pairwise(resumed):
        assert later - earlier == pytest.approx(1.0, abs=0.002)


def test_pause_when_idle_also_resumes_without_burst() -> None:
    """A pause that starts after a long idle spell (full burst credit) still resumes one call at a time."""
    clock = FakeClock()
    limiter = RateLimiter(600, 10, clock)  # 0.1 s interval, burst 10
    clock.advance(100)
    limiter.pause(2.0)
    assert not limiter.try_acquire()
    clock.advance(2.0)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    assert limiter.wait_time() == pytest.approx(0.1)


def test_shorter_pause_never_shortens_a_longer_one() -> None:
    """A second, shorter pause() during a pause keeps the later end."""
    clock = FakeClock()
    limiter = RateLimiter(60, 1, clock)
    limiter.pause(30.0)
    clock.advance(1.0)
    limiter.pause(5.0)
    assert limiter.wait_time() == pytest.approx(29.0)
    clock.advance(28.9)
    assert not limiter.try_acquire()
    clock.advance(0.1)
    assert limiter.try_acquire()


def test_uses_the_clock_it_is_given_by_default() -> None:
    """Without an explicit `now`, the limiter reads the clock passed in (so the daemon's clock drives it)."""
    clock = FakeClock(5.0)
    limiter = RateLimiter(60, 1, clock)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    clock.advance(1.0)
    assert limiter.try_acquire()
    assert limiter.wait_time(now=clock.now + 1.0) == 0.0
