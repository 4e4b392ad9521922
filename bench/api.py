"""Targets 1-3: spending the API's rate budget, polling economy, even spread.

All against tests/fake_clipdrop.py over loopback, with a sliding-window rate limiter.

1. Budget: sync jobs with 1 s server latency. folderd keeps several calls in flight, so it
   is bound by the budget (requests_per_minute); the naive client of the API document (one
   requests.post after another) is bound by the latency.
2. Polling: async jobs (submit, status..., result). Calls per delivered job with a usable
   eta and without one, beside a fixed poller that asks every poll_interval (simulated on
   the same task durations the fake drew).
3. Spread: the fake enforces the limit over a 10-second window; every 429 folderd receives
   in runs 1 and 2 counts, and the densest 10 s of accepted calls is reported.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    API_ENDPOINTS,
    API_KEY,
    DaemonProcess,
    Row,
    Section,
    fmt,
    jpeg_template,
    max_in_window,
    mean,
    percentile,
    steady_rate,
    unique_jpeg,
    write_config,
    write_images,
)
from tests.fake_clipdrop import SYNC_PATH, FakeClipdrop

UTILISATION_TARGET = 0.95
CALLS_PER_ASYNC_TARGET = 3.3
CALLS_PER_ASYNC_NO_ETA_BOUND = 4.0   # "sane": at most two status calls per job on average


class JitteredFake(FakeClipdrop):
    """A fake whose async tasks take async_duration x uniform(1 - jitter, 1 + jitter).

    The fake reads `async_duration` once per submit, so a property varies it per task: a
    learned estimate must cope with a spread of durations, as against the real service.
    """

    def __init__(self, *, jitter: float = 0.25, seed: int = 7, **options: Any) -> None:
        self._jitter = jitter
        self._random = random.Random(seed)
        self._base_duration = 1.0
        super().__init__(**options)

    @property  # type: ignore[override]
    def async_duration(self) -> float:
        return self._base_duration * self._random.uniform(1 - self._jitter, 1 + self._jitter)

    @async_duration.setter
    def async_duration(self, value: float) -> None:
        self._base_duration = value


def _api_calls(fake: FakeClipdrop) -> list[Any]:
    return [record for record in fake.records if record.endpoint in API_ENDPOINTS]


# ------------------------------------------------------------------ 1. budget


def naive_sync_client(base_url: str, duration: float, width: int = 128, height: int = 96) -> dict[str, Any]:
    """The API document's Python example in a loop: one requests.post after another."""
    template = jpeg_template()
    started = time.monotonic()
    done = 0
    statuses: dict[int, int] = {}
    index = 0
    while time.monotonic() - started < duration:
        index += 1
        response = requests.post(
            base_url + SYNC_PATH,
            files={"image_file": (f"n{index}.jpg", unique_jpeg(template, 10_000_000 + index), "image/jpeg")},
            data={"target_width": width, "target_height": height},
            headers={"x-api-key": API_KEY},
            timeout=60,
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.ok:
            done += 1
    elapsed = time.monotonic() - started
    return {"delivered": done, "seconds": elapsed, "per_minute": done / elapsed * 60, "statuses": statuses}


def budget(
    work: Path, *, rpm: int, window: float, jobs: int, naive_seconds: float, name: str = "budget", clipdrop_extra: dict[str, Any] | None = None,
) -> tuple[Section, dict[str, Any]]:
    """Sync jobs through folderd against a rate-limited fake with 1 s latency, then the naive client.

    With `clipdrop_extra` (config overrides) the run is a what-if: reported, not judged.
    """
    what_if = bool(clipdrop_extra)
    section = Section("1. budget utilisation (sync, 1 s latency)" + (f" with {clipdrop_extra}" if what_if else ""))
    root = work / name
    fake = FakeClipdrop(keys={API_KEY: 10**9}, rpm=rpm, window=window, sync_latency=1.0).start()
    try:
        write_images(root / "inbox", jobs)
        config = write_config(
            root, backend="clipdrop", folder={"mode": "sync", "settle": "200ms"},
            clipdrop={"base_url": fake.base_url, "requests_per_minute": rpm, **(clipdrop_extra or {})},
        )
        daemon = DaemonProcess(config).start()
        try:
            daemon.wait_ready()
            limit = jobs * 60 / rpm * 2 + 60
            finished = daemon.wait_for(lambda: daemon.log.count("archived") + daemon.log.count("failed") >= jobs, limit, "all jobs")
        finally:
            daemon.stop()
        calls = _api_calls(fake)
    finally:
        fake.stop()
    accepted = [record.time for record in calls if record.status != 429]
    n429 = sum(1 for record in calls if record.status == 429)
    archived = daemon.log.times("archived")
    delivered_rate = steady_rate(archived) * 60
    call_rate = steady_rate(accepted) * 60
    utilisation = delivered_rate / rpm

    naive: dict[str, Any] = {}
    if naive_seconds > 0:
        # The naive client against a fresh fake with the same limits.
        naive_fake = FakeClipdrop(keys={API_KEY: 10**9}, rpm=rpm, window=window, sync_latency=1.0).start()
        try:
            naive = naive_sync_client(naive_fake.base_url, naive_seconds)
        finally:
            naive_fake.stop()

    ok = finished and utilisation >= UTILISATION_TARGET and n429 == 0
    section.rows.append(Row(
        "1" if not what_if else "1 (what-if)",
        f"delivered sync jobs/min (rpm {rpm}, window {window:g}s, 1 s latency)" + (f", config {_describe(clipdrop_extra)}" if what_if else ", default config"),
        f">= {UTILISATION_TARGET:.0%} of rpm, 0 x 429",
        f"{fmt(delivered_rate)}/min = {utilisation:.1%}, {n429} x 429",
        f"naive {fmt(naive['per_minute'])}/min = {naive['per_minute'] / rpm:.1%}" if naive else "",
        f"{delivered_rate / naive['per_minute']:.2f}x" if naive.get("per_minute") else "",
        ok if not what_if else None,
    ))
    section.details = {
        "rpm": rpm, "window": window, "jobs": jobs, "finished": finished,
        "archived": len(archived), "failed": daemon.log.count("failed"),
        "delivered_per_minute_steady": delivered_rate, "accepted_calls_per_minute_steady": call_rate,
        "utilisation": utilisation, "responses_429": n429,
        "end_to_end_per_minute": len(archived) / (max(archived) - daemon_first_claim(daemon)) * 60 if archived else float("nan"),
        "naive": naive,
    }
    if not finished:
        section.problems.append(f"only {len(archived)} of {jobs} jobs were delivered in time")
    spread = {"run": "budget", "window": window, "rpm": rpm, "responses_429": n429,
              "max_accepted_in_window": max_in_window(accepted, window), "allowed_in_window": math.floor(rpm * window / 60),
              "max_accepted_in_1s": max_in_window(accepted, 1.0), "first_429_after": _first_429_after(calls)}
    return section, spread


def _describe(overrides: dict[str, Any] | None) -> str:
    return ", ".join(f"clipdrop.{key}: {value}" for key, value in (overrides or {}).items())


def daemon_first_claim(daemon: DaemonProcess) -> float:
    claimed = daemon.log.times("claimed")
    return min(claimed) if claimed else float("nan")


def _first_429_after(calls: list[Any]) -> float | None:
    if not calls:
        return None
    first = calls[0].time
    for record in calls:
        if record.status == 429:
            return round(record.time - first, 2)
    return None


# ------------------------------------------------------------------ 2. polling


def async_run(work: Path, name: str, *, eta: bool, rpm: int, window: float, jobs: int, duration: float) -> dict[str, Any]:
    root = work / name
    fake = JitteredFake(keys={API_KEY: 10**9}, rpm=rpm, window=window, async_duration=duration, eta=eta).start()
    try:
        write_images(root / "inbox", jobs)
        config = write_config(
            root, backend="clipdrop", folder={"mode": "async", "strategy": "smooth", "settle": "200ms"},
            clipdrop={"base_url": fake.base_url, "requests_per_minute": rpm},
        )
        daemon = DaemonProcess(config).start()
        try:
            daemon.wait_ready()
            limit = jobs * 4 * 60 / rpm + duration * 4 + 60
            finished = daemon.wait_for(lambda: daemon.log.count("archived") + daemon.log.count("failed") >= jobs, limit, "all jobs")
        finally:
            daemon.stop()
        calls = _api_calls(fake)
        tasks = fake.tasks()
    finally:
        fake.stop()
    archived = daemon.log.count("archived")
    by_endpoint: dict[str, int] = {}
    for record in calls:
        by_endpoint[record.endpoint] = by_endpoint.get(record.endpoint, 0) + 1
    n429 = sum(1 for record in calls if record.status == 429)
    # How long each finished task waited for folderd to notice: first successful result call - ready.
    result_at: dict[str, float] = {}
    for record in calls:
        if record.endpoint == "result" and record.status == 200 and record.task_id and record.task_id not in result_at:
            result_at[record.task_id] = record.time
    durations = [task.ready_at - task.created for task in tasks]
    noticed = [result_at[task.id] - task.ready_at for task in tasks if task.id in result_at]
    status_per_task: dict[str, int] = {}
    for record in calls:
        if record.endpoint == "status" and record.task_id:
            status_per_task[record.task_id] = status_per_task.get(record.task_id, 0) + 1
    histogram: dict[int, int] = {}
    for task in tasks:
        count = status_per_task.get(task.id, 0)
        histogram[count] = histogram.get(count, 0) + 1
    accepted = [record.time for record in calls if record.status != 429]
    return {
        "eta": eta, "jobs": jobs, "finished": finished, "archived": archived, "failed": daemon.log.count("failed"),
        "calls": len(calls), "calls_by_endpoint": by_endpoint, "responses_429": n429,
        "calls_per_job": len(calls) / archived if archived else float("nan"),
        "status_calls_histogram": dict(sorted(histogram.items())),
        "task_duration_mean": mean(durations), "task_durations": durations,
        "noticed_after_ready_mean": mean(noticed), "noticed_after_ready_p90": percentile(noticed, 0.9),
        "max_accepted_in_window": max_in_window(accepted, window), "allowed_in_window": math.floor(rpm * window / 60),
        "max_accepted_in_1s": max_in_window(accepted, 1.0), "first_429_after": _first_429_after(calls),
    }


def fixed_poller(durations: list[float], interval: float) -> dict[str, float]:
    """A client that asks about each task every `interval` seconds after submitting it.

    It calls status at interval, 2*interval, ... until the task is done, then result once.
    """
    status_calls = [max(1, math.ceil(duration / interval)) for duration in durations]
    waits = [count * interval - duration for count, duration in zip(status_calls, durations)]
    return {"calls_per_job": 2 + mean(status_calls), "noticed_after_ready_mean": mean(waits)}


def polling(work: Path, *, rpm: int, window: float, jobs: int, duration: float, poll_interval: float = 5.0) -> tuple[Section, list[dict[str, Any]]]:
    section = Section("2. polling economy (async)")
    with_eta = async_run(work, "async-eta", eta=True, rpm=rpm, window=window, jobs=jobs, duration=duration)
    without = async_run(work, "async-noeta", eta=False, rpm=rpm, window=window, jobs=jobs, duration=duration)
    for run, target, bound in ((with_eta, "eta given", CALLS_PER_ASYNC_TARGET), (without, "no eta", CALLS_PER_ASYNC_NO_ETA_BOUND)):
        baseline = fixed_poller(run["task_durations"], poll_interval)
        run["fixed_poller"] = baseline
        per_job = run["calls_per_job"]
        section.rows.append(Row(
            "2", f"API calls per delivered async job, {target} (tasks {duration:g}s +-25%)",
            f"<= {bound:g}",
            f"{fmt(per_job, 2)} (noticed {fmt(run['noticed_after_ready_mean'], 2)}s after ready)",
            f"fixed {poll_interval:g}s poller {fmt(baseline['calls_per_job'], 2)} (noticed {fmt(baseline['noticed_after_ready_mean'], 2)}s after)",
            f"{per_job / baseline['calls_per_job']:.2f}x",
            run["finished"] and per_job <= bound,
        ))
        if not run["finished"]:
            section.problems.append(f"{target}: only {run['archived']} of {jobs} async jobs were delivered in time")
        del run["task_durations"]
    section.details = {"eta": with_eta, "no_eta": without, "poll_interval": poll_interval}
    return section, [dict(run="async eta", window=window, rpm=rpm, **{k: with_eta[k] for k in ("responses_429", "max_accepted_in_window", "allowed_in_window", "max_accepted_in_1s", "first_429_after")}),
                     dict(run="async no eta", window=window, rpm=rpm, **{k: without[k] for k in ("responses_429", "max_accepted_in_window", "allowed_in_window", "max_accepted_in_1s", "first_429_after")})]


# ------------------------------------------------------------------ 3. spread


def spread(runs: list[dict[str, Any]]) -> Section:
    section = Section("3. even spread (10 s window)")
    total = sum(run["responses_429"] for run in runs)
    densest = max(runs, key=lambda run: run["max_accepted_in_window"] / run["allowed_in_window"])
    section.rows.append(Row(
        "3", "429 responses to folderd, server window 10 s (runs 1 + 2)",
        "0",
        f"{total} (" + ", ".join(f"{run['run']}: {run['responses_429']}" for run in runs) + ")",
        f"densest 10 s: {densest['max_accepted_in_window']} accepted of {densest['allowed_in_window']} allowed",
        "",
        total == 0,
    ))
    section.details = {"runs": runs}
    return section
