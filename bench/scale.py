"""Target 6: 100,000 files in an inbox and 100,000 jobs in the ledger.

a. Ledger update cost (Ledger.put + flush, fsync on) at 1k, 10k and 100k jobs, in this
   process: median and p99 of one update, and the compaction that comes whenever the
   journal outgrows max(MIN_COMPACT_BYTES = 4 MiB, the snapshot's size), spread over the
   updates that fill the journal that far (amortised).
b. Time to READY=1 (spawn of `folderd run` to the datagram on $NOTIFY_SOCKET) with
   - an empty state directory (interpreter and imports: the floor),
   - a snapshot.jsonl of N jobs,
   - a snapshot plus the longest journal the ledger lets grow (just under
     max(4 MiB, snapshot bytes), so neither the last flush nor the start compacts): the
     worst case after a crash,
   with peak RSS (VmHWM) at READY.
c. The daemon started with the N-job ledger and N files already in the inbox (fake API,
   no latency, no limit), run for a while: time to the first claim, files archived per
   second (beside the small-inbox rate of target 5), peak RSS, CPU.
d. Per-wake-up cost of the watcher with N tracked files (FolderWatcher._check_due and
   _next_due, a heap), of a full scan, of the first offer of every tracked file (lstat +
   completeness() each) and of re-offering every one (what happens RETRY_EMIT_AFTER
   seconds after a file was offered and not yet taken: lstat, the verdict is kept),
   measured in this process on the same inbox.

Job records are cloned from a real job that the daemon ran at the start, so their shape
follows the code as it is.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import (
    API_KEY,
    CLOCK_TICKS,
    DaemonProcess,
    Row,
    Section,
    fmt,
    percentile,
    steady_rate,
    unlimited_api,
    write_config,
    write_images,
)
from folderd import config as folderd_config
from folderd.ledger import JOURNAL, MIN_COMPACT_BYTES, SNAPSHOT, Ledger, decode_lines, encode_line
from folderd.watch import RETRY_EMIT_AFTER, FolderWatcher
from tests.fake_clipdrop import FakeClipdrop

READY_TARGET = 5.0
RSS_TARGET_MB = 200.0
FLAT_FACTOR = 2.0   # "flat": the 100k median within 2x of the 1k median


# ------------------------------------------------------------------ job records


def template_history(work: Path) -> list[dict[str, Any]]:
    """Run the daemon on one file (fake API) and return that job's ledger records, in order."""
    root = work / "template"
    fake = FakeClipdrop(keys={API_KEY: 10**9}, rpm=10**9, window=1.0).start()
    try:
        write_images(root / "inbox", 1, prefix="template")
        config = write_config(root, backend="clipdrop", folder={"mode": "sync", "settle": "100ms"}, clipdrop=unlimited_api(fake.base_url))
        daemon = DaemonProcess(config).start()
        try:
            daemon.wait_ready()
            if not daemon.wait_for(lambda: daemon.log.count("archived") >= 1, 30, "the template job"):
                raise RuntimeError(f"the template job did not finish:\n{daemon.tail()}")
        finally:
            daemon.stop()
    finally:
        fake.stop()
    records, _good, _dropped = decode_lines((root / "state" / JOURNAL).read_bytes())
    history = [record["job"] for record in records if "job" in record]
    if not history or history[-1].get("state") != "archived":
        raise RuntimeError("the template run left no archived job in the journal")
    return history


class Cloner:
    """Makes job records like the template's, each with its own id, name and hashes."""

    def __init__(self, history: list[dict[str, Any]]) -> None:
        self.history = history
        final = history[-1]
        self.job_id = final["id"]
        self.stem = Path(final["source"]).stem

    def clone(self, record: dict[str, Any], index: int) -> dict[str, Any]:
        new_id = f"{index:08x}b{index % 997:03x}"
        stem = f"img{index:06d}"
        digest = hashlib.sha256(str(index).encode()).hexdigest()

        def convert(value: Any) -> Any:
            if isinstance(value, str):
                if len(value) == 64 and all(character in "0123456789abcdef" for character in value):
                    return digest
                return value.replace(self.job_id, new_id).replace(self.stem, stem)
            if isinstance(value, dict):
                return {key: convert(item) for key, item in value.items()}
            if isinstance(value, list):
                return [convert(item) for item in value]
            return value

        return convert(record)

    def final(self, index: int) -> dict[str, Any]:
        return self.clone(self.history[-1], index)


def _compaction_threshold(ledger: Ledger) -> int:
    """Journal bytes past which Ledger.flush() (and a start) compacts: max(4 MiB, snapshot bytes)."""
    return max(MIN_COMPACT_BYTES, ledger._snapshot_bytes)  # noqa: SLF001


def _history_bytes(cloner: Cloner, index: int, seq: int) -> int:
    """Journal bytes of one job's whole history (one line per record, as Ledger.put writes them)."""
    return sum(len(encode_line({"seq": seq + offset, "job": cloner.clone(record, index)})) for offset, record in enumerate(cloner.history))


def build_ledger(state_dir: Path, cloner: Cloner, jobs: int, *, journal: bool) -> dict[str, Any]:
    """A state directory with `jobs` finished jobs: all in the snapshot, or split so that the
    journal holds the histories of as many jobs as fit just under the compaction threshold,
    max(MIN_COMPACT_BYTES, snapshot bytes): the longest journal a daemon can leave behind."""
    ledger = Ledger(state_dir, fsync=False, keep_finished_encoded=True)
    ledger.acquire_lock()
    ledger.load()
    ledger.open_for_writing()
    in_snapshot = jobs
    if journal:
        # Sizes of one job's line in the snapshot and of its history in the journal (the
        # clones differ only in equal-width ids, names and hashes; seq numbers of 5 digits).
        probe = Ledger(state_dir / "probe", fsync=False, keep_finished_encoded=True)
        probe._keep(cloner.final(jobs), None)  # noqa: SLF001 - bench setup: the encoded form
        snapshot_line = len(next(iter(probe.finished.values()))) + 1
        history = _history_bytes(cloner, jobs, 10**4)
        # Snapshot bytes >= journal bytes: in_snapshot x line >= (jobs - in_snapshot) x history.
        by_snapshot = -(-jobs * history // (snapshot_line + history))
        # Or, for a small ledger, the 4 MiB floor holds more: whichever leaves more to the journal.
        in_snapshot = min(by_snapshot, max(0, jobs - MIN_COMPACT_BYTES // history))
    for index in range(in_snapshot):
        ledger._keep(cloner.final(index), None)  # noqa: SLF001 - bench setup: straight into the snapshot
    ledger.compact()
    threshold = _compaction_threshold(ledger)
    journal_jobs = 0
    pending_bytes = 0
    for index in range(in_snapshot, jobs):
        size = _history_bytes(cloner, index, ledger.seq + 1)
        if ledger._journal_bytes + pending_bytes + size > threshold:  # noqa: SLF001
            break   # one more history would make the daemon compact: stop just under
        for record in cloner.history:
            ledger.put(cloner.clone(record, index))
        pending_bytes += size
        journal_jobs += 1
        if pending_bytes >= 8 * 1024 * 1024:
            ledger.flush()
            pending_bytes = 0
    ledger.flush()
    journal_bytes = ledger._journal_bytes  # noqa: SLF001
    ledger.close()
    if journal and journal_bytes == 0 and journal_jobs:
        raise RuntimeError("the bench's journal was compacted away while it was built")
    sizes = {path.name: path.stat().st_size for path in state_dir.iterdir() if path.is_file()}
    shutil.rmtree(state_dir / "probe", ignore_errors=True)
    journal_lines = journal_jobs * len(cloner.history)
    return {
        "jobs": in_snapshot + journal_jobs, "in_snapshot": in_snapshot, "in_journal": journal_jobs,
        "journal_lines": journal_lines, "journal_bytes": journal_bytes, "compaction_threshold_bytes": threshold,
        "journal_fill": journal_bytes / threshold, "bytes": sizes,
    }


# ------------------------------------------------------------------ a. ledger updates


def ledger_updates(work: Path, cloner: Cloner, sizes: list[int], updates: int) -> dict[int, dict[str, float]]:
    """Time put + flush at each size, the sizes interleaved so that the disk's moods hit all alike.

    Twice: with fsync (what the daemon does), and without (the CPU part, which is what
    must not grow with the number of jobs; fsync time is the disk's).
    """
    states = {size: work / f"ledger-{size}" for size in sizes}
    for size, state in states.items():
        build_ledger(state, cloner, size, journal=False)
    results: dict[int, dict[str, float]] = {size: {} for size in sizes}
    for fsync in (True, False):
        ledgers = {}
        for size, state in states.items():
            ledger = Ledger(state, fsync=fsync, keep_finished_encoded=True)   # as the daemon keeps it
            ledger.acquire_lock()
            ledger.load()
            ledger.open_for_writing()
            ledgers[size] = ledger
        job = cloner.clone(cloner.history[len(cloner.history) // 2], 10**7)   # an in-flight record
        timings: dict[int, list[float]] = {size: [] for size in sizes}
        written = {size: ledger._journal_bytes for size, ledger in ledgers.items()}  # noqa: SLF001
        for index in range(-updates // 5, updates):   # the first fifth warms up and is not counted
            job["state"] = ("prepared", "submitting", "fetched", "delivered")[index % 4]
            job["updated"] = time.time()
            for size, ledger in ledgers.items():
                started = time.perf_counter()
                ledger.put(job)
                ledger.flush()
                if index >= 0:
                    timings[size].append(time.perf_counter() - started)
        for size, ledger in ledgers.items():
            key = "fsync" if fsync else "cpu"
            values = timings[size]
            results[size][f"{key}_median_ms"] = statistics.median(values) * 1000
            results[size][f"{key}_p99_ms"] = percentile(values, 0.99) * 1000
            results[size][f"{key}_mean_ms"] = statistics.fmean(values) * 1000
            if fsync:
                # Bytes one update appends; the journal compacts past max(4 MiB, snapshot bytes).
                line_bytes = (ledger._journal_bytes - written[size]) / (updates + updates // 5)  # noqa: SLF001
                threshold = _compaction_threshold(ledger)
                started = time.perf_counter()
                ledger.compact()
                compaction = time.perf_counter() - started
                period = threshold / line_bytes
                results[size]["compaction_s"] = compaction
                results[size]["compaction_threshold_bytes"] = threshold
                results[size]["update_line_bytes"] = line_bytes
                results[size]["compaction_every_lines"] = period
                results[size]["amortised_ms"] = (statistics.fmean(values) + compaction / period) * 1000
            ledger.close()
    return results


def load_breakdown(state_dir: Path) -> dict[str, float]:
    """In this process, on a copy of the state, loaded as the daemon loads it (finished jobs
    kept encoded): Ledger.load() and compact() times, and a full GC pass with the jobs
    loaded. (A copy: compacting would spoil the worst case for the daemon.)"""
    import gc

    copy = state_dir.parent / (state_dir.name + "-copy")
    shutil.copytree(state_dir, copy, ignore=shutil.ignore_patterns("lock"))
    ledger = Ledger(copy, fsync=True, keep_finished_encoded=True)
    started = time.perf_counter()
    ledger.load()
    load = time.perf_counter() - started
    started = time.perf_counter()
    gc.collect()
    collect = time.perf_counter() - started
    ledger.acquire_lock()
    started = time.perf_counter()
    ledger.compact()   # what a flush does once the journal outgrows max(4 MiB, the snapshot)
    compaction = time.perf_counter() - started
    objects = len(gc.get_objects())
    ledger.close()
    del ledger
    shutil.rmtree(copy, ignore_errors=True)
    return {"load_s": load, "compact_s": compaction, "full_gc_s": collect, "objects_tracked": objects, "snapshot_bytes": (state_dir / SNAPSHOT).stat().st_size}


# ------------------------------------------------------------------ b. READY


def ready_time(work: Path, name: str, cloner: Cloner | None, jobs: int, *, journal: bool) -> dict[str, Any]:
    root = work / name
    built = build_ledger(root / "state", cloner, jobs, journal=journal) if cloner and jobs else {"jobs": 0}
    breakdown = load_breakdown(root / "state") if cloner and jobs else {}
    config = write_config(root, backend="local", folder={"settle": "1s"})
    daemon = DaemonProcess(config).start()
    try:
        seconds = daemon.wait_ready(timeout=300)
        memory = daemon.memory_at_ready
    finally:
        daemon.stop()
    return {"ledger": built, "in_process": breakdown, "ready_s": seconds, "rss_at_ready_mb": memory.get("VmRSS"), "peak_rss_at_ready_mb": memory.get("VmHWM")}


# ------------------------------------------------------------------ c. the big run


def big_run(root: Path, cloner: Cloner, jobs: int, files: int, seconds: float) -> dict[str, Any]:
    """The daemon on `root`, whose inbox already holds `files` files."""
    built = build_ledger(root / "state", cloner, jobs, journal=False)
    started = time.monotonic()
    fake = FakeClipdrop(keys={API_KEY: 10**9}, rpm=10**9, window=1.0).start()
    samples: list[tuple[float, int, float, float]] = []
    try:
        config = write_config(root, backend="clipdrop", folder={"mode": "sync", "settle": "1s"}, clipdrop=unlimited_api(fake.base_url))
        daemon = DaemonProcess(config).start()
        try:
            ready = daemon.wait_ready(timeout=300)
            ready_wall = time.time()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(1.0)
                daemon.log.poll()
                memory = daemon.memory()
                samples.append((time.monotonic() - started, daemon.log.count("archived"), daemon.cpu(), memory.get("VmRSS", 0.0)))
            memory = daemon.memory()
            cpu = daemon.cpu() - (daemon.cpu_at_ready or 0.0)
            threads = _thread_cpu(daemon.pid)
        finally:
            stop_seconds = daemon.stop(timeout=60)
    finally:
        fake.stop()
    claimed = daemon.log.times("claimed")
    archived = daemon.log.times("archived")
    first_claim = min(claimed) - ready_wall if claimed else float("nan")
    first_archive = min(archived) - ready_wall if archived else float("nan")
    end = ready_wall + seconds
    return {
        "ledger": built, "files": files,
        "ready_s": ready, "first_claim_after_ready_s": first_claim, "first_archive_after_ready_s": first_archive,
        "claimed_per_s": steady_rate(claimed),
        "archived": len(archived), "claimed": len(claimed), "failed": daemon.log.count("failed"),
        "archived_per_s": steady_rate(archived),
        "claimed_per_s_by_5s_after_ready": _per_second_buckets(claimed, ready_wall, end),
        "archived_per_s_by_5s_after_ready": _per_second_buckets(archived, ready_wall, end),
        "cpu_percent_by_5s": _cpu_percent(samples),
        "cpu_s": cpu, "cpu_ms_per_archived": cpu / max(1, len(archived)) * 1000,
        # Linux thread ids in creation order: the main loop is the process id; with one folder
        # the watcher is the last thread folderd starts (after the pools and watchdog's observer).
        "thread_cpu_s": threads,
        "rss_mb": memory.get("VmRSS"), "peak_rss_mb": memory.get("VmHWM"), "stop_s": stop_seconds,
        "rss_samples_mb": [round(sample[3]) for sample in samples][:: max(1, len(samples) // 20)],
        "warnings": [warning.get("event") for warning in daemon.log.warnings][:10],
        "config": str(config),
    }


def _thread_cpu(pid: int) -> dict[str, float]:
    found = {}
    for tid in sorted(int(name) for name in os.listdir(f"/proc/{pid}/task")):
        try:
            found[str(tid)] = cpu_seconds_of_task(pid, tid)
        except OSError:
            continue
    labelled = {}
    last = max((int(tid) for tid in found), default=0)
    for thread_id, value in found.items():
        label = "main loop" if int(thread_id) == pid else ("watcher (last thread)" if int(thread_id) == last else f"thread {thread_id}")
        labelled[label] = value
    return dict(sorted(labelled.items(), key=lambda item: -item[1])[:6])


def cpu_seconds_of_task(pid: int, tid: int) -> float:
    with open(f"/proc/{pid}/task/{tid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _per_second_buckets(times: list[float], origin: float, end: float, width: float = 5.0) -> list[float]:
    buckets = [0] * max(1, int((end - origin) // width))
    for moment in times:
        index = int((moment - origin) // width)
        if 0 <= index < len(buckets):
            buckets[index] += 1
    return [round(count / width) for count in buckets]


def _cpu_percent(samples: list[tuple[float, int, float, float]], every: int = 5) -> list[int]:
    picked = samples[::every]
    return [round((later[2] - earlier[2]) / (later[0] - earlier[0]) * 100) for earlier, later in zip(picked, picked[1:])]


# ------------------------------------------------------------------ d. watcher costs


def watcher_costs(config_path: Path, sample: int) -> dict[str, Any]:
    rule = folderd_config.load(config_path).folders[0]
    offered: list[Any] = []
    watcher = FolderWatcher(rule, offered.append, clock=time.monotonic)
    started = time.perf_counter()
    watcher._scan()  # noqa: SLF001 - the benchmark times the watcher's own steps
    first_scan = time.perf_counter() - started
    tracked = len(watcher._entries)  # noqa: SLF001
    started = time.perf_counter()
    watcher._scan()  # noqa: SLF001
    rescan = time.perf_counter() - started
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        watcher._check_due()  # noqa: SLF001 - nothing is due: pure bookkeeping
        watcher._next_due()  # noqa: SLF001
        timings.append(time.perf_counter() - started)
    wake = statistics.median(timings)
    # Offering: every entry due at once (the clock moved on), on a sample of entries. First
    # offers read each file (completeness); RETRY_EMIT_AFTER later the same files are offered
    # again without reading them.
    entries = watcher._entries  # noqa: SLF001
    for relpath in list(entries)[sample:]:
        del entries[relpath]
    if isinstance(getattr(watcher, "_due", None), list):   # the due-time heap: drop the removed entries' items
        watcher._due = [item for item in watcher._due if item[1] in entries]  # noqa: SLF001
        heapq.heapify(watcher._due)  # noqa: SLF001
    watcher.clock = lambda: time.monotonic() + 100_000.0
    offered.clear()
    started = time.perf_counter()
    watcher._check_due()  # noqa: SLF001
    first_offer = time.perf_counter() - started
    first_count = len(offered)
    watcher.clock = lambda: time.monotonic() + 100_000.0 + 2 * RETRY_EMIT_AFTER
    offered.clear()
    started = time.perf_counter()
    watcher._check_due()  # noqa: SLF001
    reoffer = time.perf_counter() - started
    return {
        "tracked": tracked, "first_scan_s": first_scan, "rescan_s": rescan,
        "wake_ms": wake * 1000, "wake_us_per_entry": wake / max(1, tracked) * 1e6,
        "offer_sample": first_count, "offer_s_all": first_offer / max(1, first_count) * tracked,
        "reoffer_sample": len(offered), "reoffer_s_per_1000": reoffer / max(1, len(offered)) * 1000,
        "reoffer_s_all": reoffer / max(1, len(offered)) * tracked,
    }


# ------------------------------------------------------------------ the section


def scale(work: Path, *, jobs: int, files: int, seconds: float, ledger_sizes: list[int], updates: int, small: dict[str, Any] | None) -> Section:
    section = Section("6. scale")
    cloner = Cloner(template_history(work))
    updates_by_size = ledger_updates(work, cloner, ledger_sizes, updates)
    floor = ready_time(work, "ready-empty", None, 0, journal=False)
    snapshot = ready_time(work, "ready-snapshot", cloner, jobs, journal=False)
    worst = ready_time(work, "ready-journal", cloner, jobs, journal=True)
    inbox_root = work / "scale-run"
    write_started = time.monotonic()
    write_images(inbox_root / "inbox", files)
    write_seconds = time.monotonic() - write_started
    # settle 1h: nothing falls due while the bookkeeping is timed
    costs = watcher_costs(write_config(inbox_root, backend="local", folder={"settle": "1h"}), sample=min(5000, files))
    run = big_run(inbox_root, cloner, jobs, files, seconds)
    run["write_files_s"] = write_seconds

    built = worst["ledger"]
    journal_label = (
        f"{built['jobs']:,} jobs, snapshot of {built['in_snapshot']:,} + journal of {built['in_journal']:,} jobs' histories "
        f"({built['journal_bytes'] / 1e6:,.1f} MB, {built['journal_lines']:,} lines = {built['journal_fill']:.1%} of the compaction threshold)"
    )
    for label, result in ((f"{jobs:,} jobs in the snapshot", snapshot), (journal_label, worst)):
        load = result["ready_s"] - floor["ready_s"]
        section.rows.append(Row(
            "6", f"time to READY=1, {label}",
            f"ledger load <= {READY_TARGET:g}s",
            f"{fmt(result['ready_s'], 2)}s from spawn ({fmt(load, 2)}s over the empty-state {fmt(floor['ready_s'], 2)}s)",
            "", "",
            load <= READY_TARGET,
        ))
        section.rows.append(Row(
            "6", f"peak RSS at READY, {label}",
            f"<= {RSS_TARGET_MB:g} MB",
            f"{fmt(result['peak_rss_at_ready_mb'], 0)} MB (empty state {fmt(floor['peak_rss_at_ready_mb'], 0)} MB)",
            "", "",
            result["peak_rss_at_ready_mb"] <= RSS_TARGET_MB,
        ))
    section.rows.append(Row(
        "6", f"peak RSS running, {jobs:,}-job ledger + {files:,} files in the inbox ({seconds:g}s)",
        f"<= {RSS_TARGET_MB:g} MB",
        f"{fmt(run['peak_rss_mb'], 0)} MB",
        "", "",
        run["peak_rss_mb"] <= RSS_TARGET_MB,
    ))
    rate = run["archived_per_s"] if run["archived"] >= 2 else 0.0
    small_files = (small or {}).get("files_per_second")
    small_claims = (small or {}).get("claimed_per_s")
    section.rows.append(Row(
        "6", f"throughput with {files:,} files waiting ({seconds:g}s run)",
        "stays near the small-inbox rate (target 5)",
        (f"delivered {fmt(rate)} files/s ({run['archived']:,} in the run, first {fmt(run['first_archive_after_ready_s'], 1)}s after READY); "
         if run["archived"] else "delivered none in the run; ")
        + f"claimed {fmt(run['claimed_per_s'])}/s (first {fmt(run['first_claim_after_ready_s'], 1)}s after READY)",
        f"small inbox: delivered {fmt(small_files)}/s, claimed {fmt(small_claims)}/s" if small else "",
        f"{rate / small_files:.2f}x" if small_files else "",
        None if not small_files else rate >= 0.5 * small_files,
    ))
    small_ledger, large_ledger = updates_by_size[min(updates_by_size)], updates_by_size[max(updates_by_size)]
    section.rows.append(Row(
        "6", "one ledger update (put + flush), median with fsync / p99 with fsync / amortised incl. compaction / CPU only (no fsync)",
        "flat from 1k to 100k jobs",
        "; ".join(
            f"{size // 1000}k: {fmt(value['fsync_median_ms'], 3)} / {fmt(value['fsync_p99_ms'], 2)} / {fmt(value['amortised_ms'], 3)} / {fmt(value['cpu_median_ms'], 3)} ms"
            for size, value in updates_by_size.items()
        ),
        "", f"{large_ledger['amortised_ms'] / small_ledger['amortised_ms']:.2f}x amortised, {large_ledger['cpu_median_ms'] / small_ledger['cpu_median_ms']:.2f}x CPU",
        large_ledger["cpu_median_ms"] <= FLAT_FACTOR * small_ledger["cpu_median_ms"] and large_ledger["amortised_ms"] <= FLAT_FACTOR * small_ledger["amortised_ms"],
    ))
    section.rows.append(Row(
        "6", f"watcher wake-up with {costs['tracked']:,} tracked files (_check_due + _next_due)",
        "O(1) per wake-up",
        f"{fmt(costs['wake_ms'] * 1000, 1)} us per wake-up; full scan {fmt(costs['rescan_s'], 2)}s",
        "", "",
        costs["wake_ms"] <= 5.0,
    ))
    section.rows.append(Row(
        "6", f"offering every one of {costs['tracked']:,} tracked files: first offer / re-offer {RETRY_EMIT_AFTER:g}s later",
        "information",
        f"{fmt(costs['offer_s_all'], 1)}s (lstat + completeness each) / {fmt(costs['reoffer_s_all'], 2)}s (lstat only, verdict kept) of watcher time",
        "", "", None,
    ))
    threads = run.get("thread_cpu_s", {})
    section.rows.append(Row(
        "6", f"daemon CPU by thread in the {seconds:g}s run with {files:,} files waiting",
        "information",
        ", ".join(f"{name} {fmt(value, 1)}s" for name, value in list(threads.items())[:4]) + f" (total {fmt(run['cpu_s'], 1)}s)",
        "", "", None,
    ))
    collect = snapshot.get("in_process", {}).get("full_gc_s")
    section.rows.append(Row(
        "6", f"one full garbage collection with {jobs:,} jobs loaded (in process)",
        "information",
        f"{fmt((collect or float('nan')) * 1000, 0)} ms ({snapshot.get('in_process', {}).get('objects_tracked', 0):,} objects tracked); "
        f"Ledger.load {fmt(snapshot.get('in_process', {}).get('load_s'), 2)}s, one compaction {fmt(snapshot.get('in_process', {}).get('compact_s'), 2)}s "
        f"(journal case: {fmt(worst.get('in_process', {}).get('load_s'), 2)}s + {fmt(worst.get('in_process', {}).get('compact_s'), 2)}s)",
        "", "", None,
    ))
    section.details = {
        "ledger_updates": updates_by_size, "ready_empty": floor, "ready_snapshot": snapshot, "ready_journal": worst,
        "run": run, "watcher": costs,
    }
    if run["failed"]:
        section.problems.append(f"{run['failed']} files failed in the scale run")
    return section
