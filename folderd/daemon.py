"""The supervisor: one loop that owns every job and the ledger.

Watcher threads only report candidate files; worker threads only run a step (claim,
prepare, an API call, local upscaling, a filesystem move) and report its outcome. The loop
applies outcomes, writes the ledger (one fsync per loop turn: group commit), and only then
starts the steps that depend on what it wrote: the intent to submit is durable before the
POST, a task id is durable before anything else happens to the job.

Recovery is the same code as normal running: a job restarts from its durable state (see
`_recover`), so every state has exactly one next step.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from folderd import logs, steps
from folderd.claim import ClaimRefused, adopt_orphan, claim, ensure_work_root, find_orphans
from folderd.clipdrop import Client
from folderd.config import Config, FolderRule, load, read_api_key
from folderd.credits import Spending
from folderd.deliver import archive, deliver, fail, write_status_file
from folderd.errors import ApiError, ConfigError, DurabilityError, ImageError
from folderd.fsutil import DURABILITY_ERRNOS, TEMP_PREFIX
from folderd.ledger import TERMINAL_STATES, Ledger
from folderd.limiter import RateLimiter
from folderd.notify import Notifier
from folderd.progress import Progress
from folderd.watch import Candidate, FolderWatcher, make_handler
from folderd.workers import WorkerPool

log = logs.get("folderd")

# API calls that finish paid work go before new submits.
FETCH, POLL, SUBMIT = 0, 1, 2
QUEUED_STATES = {"claimed", "prepared"}
STATUS_FILE = "status.json"
STOP_GRACE = 4.0
IO_RETRIES = 5

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_PAUSED, EXIT_FATAL = 0, 1, 2, 3, 4


class Daemon:
    """folderd's daemon; `run()` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        *,
        once: bool = False,
        notifier: Notifier | None = None,
        environ: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.once = once
        self.environ = dict(os.environ) if environ is None else environ
        self.notifier = notifier or Notifier(self.environ)
        self.clock = clock
        self.rules: dict[str, FolderRule] = {rule.name: rule for rule in config.folders}
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        fsync = self.environ.get("FOLDERD_UNSAFE_NO_FSYNC") != "1"
        self.ledger = Ledger(config.state_dir, fsync=fsync, keep_finished_encoded=True)
        self.scratch = config.state_dir / "tmp"
        self.limiter = RateLimiter(config.clipdrop.requests_per_minute, config.clipdrop.burst, clock)
        self.client: Client | None = None
        self.api_key_source = ""
        self.pause_reason: str | None = None
        self.pause_until = 0.0
        self.stopping = False
        self.exit_code = EXIT_OK
        self.watchers: dict[str, FolderWatcher] = {}
        self.observer: Any = None
        self.timers: list[tuple[float, int, str]] = []
        self.sequence = itertools.count()
        self.queue_io: deque[str] = deque()          # prepare
        self.queue_io_finish: deque[str] = deque()   # copy, deliver, archive, fail
        self.queue_local: deque[str] = deque()
        self.queue_api: list[deque[str]] = [deque(), deque(), deque()]
        self.claims: deque[Candidate] = deque()
        self.claiming: set[tuple[str, str]] = set()
        self.deferred: dict[tuple[str, str], Candidate] = {}
        self.in_flight: set[str] = set()
        self.scheduled: set[str] = set()
        self.failed_this_run = 0
        self.state_counts: dict[str, int] = {}
        self.task_estimate: float | None = None
        self.task_durations: deque[float] = deque(maxlen=50)
        self.next_status_write = 0.0
        self.next_watchdog = 0.0
        self.status_dirty = True
        self.status_watch: dict[str, Any] = {}  # what status.json last said of the watchers
        self.pools: dict[str, WorkerPool] = {}
        # Jobs claimed but not yet with a backend at most: enough to keep every worker busy.
        self.claim_window = max(16, 4 * (config.clipdrop.concurrency + config.local_workers))
        self.spending = Spending()
        self.held: dict[str, str] = {}          # job id -> why a credit cap holds it
        self.next_held_check = 0.0
        self.low_balance_warned = False
        # hash((input sha256, recipe)) -> id of a delivered job with that result. Kept small (an
        # int and a str per finished job): the job itself is read from the ledger on a hit.
        self.results: dict[int, str] = {}
        self.progress = Progress(sys.stderr) if once else None
        # Fault injection for the crash tests: FOLDERD_CRASH_AFTER=STATE:N kills the process
        # with SIGKILL right after the N-th entry into STATE has been made durable.
        crash = self.environ.get("FOLDERD_CRASH_AFTER", "")
        self.crash_state, _, count = crash.partition(":")
        self.crash_countdown = int(count or 1) if crash else 0
        self.crash_armed = False

    # ------------------------------------------------------------------ life cycle

    def request_stop(self, *_: Any) -> None:
        """Signal-safe: only wakes the loop."""
        self.events.put(("stop",))

    def run(self) -> int:
        try:
            self._start()
        except ConfigError as error:
            log.error("cannot start", error=str(error))
            return EXIT_CONFIG
        except (DurabilityError, OSError, Exception) as error:
            log.error("cannot start", error=f"{type(error).__name__}: {error}")
            self._shutdown_quietly()
            return EXIT_FATAL
        try:
            self._loop()
        except DurabilityError as error:
            log.error("stopping: the state or a folder cannot be written; nothing further will be done until it can", error=str(error))
            self.exit_code = EXIT_FATAL
        finally:
            self._shutdown()
        return self.exit_code

    def _start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # First of all: a SIGHUP during start-up (a reload, logrotate) must not kill the
            # daemon by its default action; the reload is applied once the loop runs.
            signal.signal(signal.SIGHUP, lambda *_: self.events.put(("reload",)))
        self.ledger.acquire_lock()
        self.ledger.load()
        if self.ledger.dropped_lines:
            log.warning("dropped a torn record at the end of the ledger journal (an interrupted write)", lines=self.ledger.dropped_lines)
        self.ledger.open_for_writing()
        self.scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.daemon_id = self.ledger.meta["daemon_id"]
        self.spending = Spending(self.ledger.meta.get("spent_by_day"))
        if self.config.uses_clipdrop():
            self._connect()
        self.backoff_base = self.config.clipdrop.retry_backoff
        self.pools = {
            "io": WorkerPool("io", 4, self.events),
            "local": WorkerPool("local", self.config.local_workers, self.events),
            "api": WorkerPool("api", self.config.clipdrop.concurrency, self.events),
        }
        for rule in self.config.folders:
            for path in (rule.inbox, rule.outbox, rule.done, rule.failed):
                path.mkdir(parents=True, exist_ok=True)
            ensure_work_root(rule.inbox, self.daemon_id)
        self._recover()
        self.ledger.flush()
        self._start_watchers()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        log.info(
            "folderd started",
            mode="once" if self.once else "run",
            folders=[rule.name for rule in self.config.folders],
            state_dir=str(self.config.state_dir),
            jobs_resumed=sum(1 for _ in self.ledger.unfinished()),
            api_key=self.api_key_source or None,
        )
        self.notifier.ready(self._status_line())

    def _start_watchers(self) -> None:
        for rule in self.config.folders:
            self._start_watcher(rule)

    @staticmethod
    def _no_move_delay() -> None:
        """watchdog holds an unpaired IN_MOVED_FROM for 0.5 s to pair it with a move-to, and
        events queue behind it; every claim (a rename out of the watched inbox) makes one.
        folderd uses events only as hints, so pairing is worthless here: no delay."""
        try:
            from watchdog.observers import inotify_move_event_grouper

            inotify_move_event_grouper.InotifyMoveEventGrouper.delay = 0  # type: ignore[misc]
        except (ImportError, AttributeError):  # older watchdog: the buffer had the delay
            try:
                from watchdog.observers import inotify_buffer

                inotify_buffer.InotifyBuffer.delay = 0  # type: ignore[attr-defined,misc]
            except (ImportError, AttributeError):
                pass

    def _start_watcher(self, rule: FolderRule) -> None:
        watcher = FolderWatcher(
            rule,
            lambda candidate: self.events.put(("candidate", candidate)),
            once=self.once,
            clock=self.clock,
            room=lambda: len(self.claims) + len(self.deferred) < 2 * self.claim_window,
        )
        self.watchers[rule.name] = watcher
        if watcher.method == "native":
            try:
                if self.observer is None:
                    from watchdog.observers import Observer

                    self._no_move_delay()

                    self.observer = Observer()
                    self.observer.start()
                watcher.watch_handle = self.observer.schedule(make_handler(watcher), os.fspath(rule.inbox), recursive=rule.recursive)
            except OSError as error:
                reason = _inotify_advice(error)
                log.warning("native watching failed; polling instead", folder=rule.name, reason=reason)
                watcher.fall_back_to_polling(reason)
        log.info("watching", folder=rule.name, inbox=str(rule.inbox), method=watcher.method, why=watcher.method_reason)
        watcher.start()

    def _stop_watcher(self, name: str) -> None:
        watcher = self.watchers.pop(name, None)
        if watcher is None:
            return
        watcher.stop()
        handle = getattr(watcher, "watch_handle", None)
        if handle is not None and self.observer is not None:
            try:
                self.observer.unschedule(handle)
            except (KeyError, OSError):
                pass

    def _reload(self) -> None:
        """SIGHUP: apply a new configuration without a restart; keep the old one if it is invalid.

        Jobs in flight go on; jobs of a removed folder still finish under its old rule.
        """
        self.notifier.reloading()
        try:
            new = load(self.config.path)
        except ConfigError as error:
            log.error("reload rejected: the configuration has errors; the old one stays in force", errors=error.problems)
            self.notifier.ready(self._status_line())
            return
        if new.state_dir != self.config.state_dir:
            log.error("reload rejected: state_dir cannot change while running; restart folderd to move it", old=str(self.config.state_dir), new=str(new.state_dir))
            self.notifier.ready(self._status_line())
            return
        old_rules = {rule.name: rule for rule in self.config.folders}
        new_rules = {rule.name: rule for rule in new.folders}
        added = [name for name in new_rules if name not in old_rules]
        removed = [name for name in old_rules if name not in new_rules]
        changed = [name for name in new_rules if name in old_rules and new_rules[name] != old_rules[name]]
        for name in removed + changed:
            self._stop_watcher(name)
        self.config = new
        self.rules.update(new_rules)
        for name in added + changed:
            rule = new_rules[name]
            for path in (rule.inbox, rule.outbox, rule.done, rule.failed):
                path.mkdir(parents=True, exist_ok=True)
            ensure_work_root(rule.inbox, self.daemon_id)
            self._start_watcher(rule)
        settings = new.clipdrop
        self.limiter.interval = 60.0 / settings.requests_per_minute * RateLimiter.MARGIN
        self.limiter.tolerance = self.limiter.interval * (max(1, settings.burst) - 1)
        self.backoff_base = settings.retry_backoff
        if new.uses_clipdrop():
            self._connect()
        self._release_held()
        log.info("configuration reloaded", added=added, removed=removed, changed=changed)
        self.status_dirty = True
        self.notifier.ready(self._status_line())

    def _connect(self) -> None:
        """(Re)read the API key and build the client; pause the backend if there is no key."""
        key, source = read_api_key(self.config.clipdrop, self.environ)
        self.api_key_source = source
        if key is None:
            self.client = None
            self._pause(f"{source}; folders using clipdrop wait", forever=True)
            return
        logs.register_secret(key)
        settings = self.config.clipdrop
        self.client = Client(settings.base_url, key, settings.timeout, pool_size=settings.concurrency)
        if self._pause_forever:
            self._unpause()

    def _recover(self) -> None:
        """Bring every unfinished job back into the schedule from its durable state."""
        known = {job.get("work") for job in self.ledger.jobs.values()}
        for rule in self.config.folders:
            for path, relpath in find_orphans(rule.inbox, self.daemon_id, {path for path in known if path}):
                job = adopt_orphan(path, relpath, rule.name)
                log.warning("found a claimed file the ledger did not record (a crash mid-claim); taking it up", folder=rule.name, file=relpath)
                self.ledger.put(job)
        self._remove_stale_temp_files()
        for job in self.ledger.all_jobs():
            self._count(None, job["state"])
            if job["state"] == "archived":
                self._remember_result(job)
            if job["state"] in TERMINAL_STATES:
                continue
            if job["folder"] not in self.rules:
                log.warning("job of a folder no longer configured is left as it is", job_id=job["id"], folder=job["folder"], state=job["state"])
                continue
            if job["state"] == "submitting" and job.get("mode") in ("sync", "async"):
                # The POST may or may not have reached the API before the crash; with no
                # idempotency key the only way on is to send it again.
                job["maybe_paid_twice"] = True
                log.warning("resubmitting a job interrupted mid-submit; it may be charged twice", job_id=job["id"], folder=job["folder"], file=job["source"])
                self.ledger.put(job)
            if job["state"] == "claimed" and not Path(job["work"]).exists():
                log.error("a claimed file is missing from the work area", job_id=job["id"], file=job["source"], work=job["work"])
                self._set_state(job, "failed", error={"reason": "the claimed file disappeared from the work area", "stage": "claimed"})
                continue
            if self.progress is not None:
                self.progress.total += 1
            self._schedule(job)

    def _remove_stale_temp_files(self) -> None:
        """Hidden temp files a crash left in outbox, done and failed: none is a user's file
        (all start with the temp prefix), and only a fetched job's result is still needed."""
        keep = {job.get("output_tmp") for job in self.ledger.jobs.values() if job.get("state") == "fetched"}
        for rule in self.config.folders:
            for top in (rule.outbox, rule.done, rule.failed):
                walk = os.walk(top) if rule.recursive else [(str(top), [], os.listdir(top) if top.is_dir() else [])]
                for directory, _subdirs, names in walk:
                    for name in names:
                        path = os.path.join(directory, name)
                        if name.startswith(TEMP_PREFIX) and path not in keep:
                            try:
                                os.unlink(path)
                                log.info("removed a temporary file left by an interrupted step", path=path)
                            except OSError:
                                pass

    def _shutdown(self) -> None:
        self.notifier.stopping()
        if self.progress is not None:
            self.progress.close()
        for watcher in self.watchers.values():
            watcher.stop()
        if self.observer is not None:
            try:
                self.observer.stop()
            except Exception:
                pass
        try:
            self._write_status(force=True)
        except Exception:
            pass
        self._shutdown_quietly()
        log.info("folderd stopped", exit_code=self.exit_code)

    def _shutdown_quietly(self) -> None:
        try:
            self.ledger.close()
        except Exception as error:
            log.error("could not close the ledger cleanly", error=str(error))
            self.exit_code = EXIT_FATAL
        if self.client is not None:
            self.client.close()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        stop_deadline: float | None = None
        while True:
            timeout = self._next_wakeup()
            try:
                event = self.events.get(timeout=timeout)
                self._handle(event)
                while True:
                    self._handle(self.events.get_nowait())
            except queue.Empty:
                pass
            if self.stopping:
                if stop_deadline is None:
                    stop_deadline = self.clock() + STOP_GRACE
                    for watcher in self.watchers.values():
                        watcher.stop()
                self._flush()
                if not self.in_flight or self.clock() >= stop_deadline:
                    if self.in_flight:
                        log.warning("stopping with calls still in flight; they resume from the ledger at the next start", jobs=len(self.in_flight))
                    return
                continue
            self._dispatch()
            self._housekeeping()
            if self.once:
                self._check_once_finished()

    def _next_wakeup(self) -> float:
        now = self.clock()
        wake = now + 1.0
        if self.timers:
            wake = min(wake, self.timers[0][0])
        if any(self.queue_api) and self.pools["api"].free and not self._paused(now):
            wake = min(wake, now + self.limiter.wait_time(now))
        if self.notifier.watchdog_interval:
            wake = min(wake, self.next_watchdog)
        return max(0.0, min(1.0, wake - now))

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "stop":
            if not self.stopping:
                log.info("stopping: no new files are taken")
            self.stopping = True
        elif kind == "reload":
            if not self.stopping:
                try:
                    self._reload()
                except ConfigError as error:  # an unreadable new key file
                    log.error("reload failed", errors=error.problems)
        elif kind == "candidate":
            self._on_candidate(event[1])
        elif kind == "done":
            _, pool_name, step, key, outcome, failure = event
            self.pools[pool_name].busy -= 1
            if step == "claim":
                self._on_claimed(key, outcome, failure)
            else:
                self._on_step_done(step, key, outcome, failure)

    # ------------------------------------------------------------------ claiming

    def _on_candidate(self, candidate: Candidate) -> None:
        key = (candidate.folder, candidate.relpath)
        if self.stopping or key in self.claiming or candidate.folder not in self.rules:
            return
        rule = self.rules[candidate.folder]
        if rule.backend == "clipdrop" and self._paused(self.clock()):
            if key not in self.deferred:
                log.info("file waits in the inbox while the API is paused", folder=rule.name, file=candidate.relpath, reason=self.pause_reason)
                self.status_dirty = True  # status shows it waiting_in_inbox
            self.deferred[key] = candidate
            return
        self.claiming.add(key)
        self.claims.append(candidate)

    def _on_claimed(self, key: tuple[str, str], job: dict[str, Any] | None, error: BaseException | None) -> None:
        self.claiming.discard(key)
        self.status_dirty = True
        if error is not None:
            if isinstance(error, OSError) and error.errno in DURABILITY_ERRNOS:
                raise DurabilityError(f"cannot claim {key[1]}: {error}") from error
            level = log.debug if isinstance(error, ClaimRefused) else log.warning
            level("file not claimed", folder=key[0], file=key[1], reason=str(error))
            watcher = self.watchers.get(key[0])
            if watcher is not None:
                watcher.forget(key[1])
            return
        assert job is not None
        if self.progress is not None:
            self.progress.total += 1
        self.ledger.put(job)
        self._count(None, job["state"])
        self._crash_point("claimed")
        self._log_job(job)
        self._schedule(job)

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, job: dict[str, Any], delay: float = 0.0) -> None:
        job_id = job["id"]
        if job["state"] in TERMINAL_STATES or job_id in self.scheduled:
            return
        self.scheduled.add(job_id)
        if delay > 0:
            heapq.heappush(self.timers, (self.clock() + delay, next(self.sequence), job_id))
            return
        self._enqueue(job)

    def _enqueue(self, job: dict[str, Any]) -> None:
        pool, priority = self._route_of(job)
        if pool == "io":
            (self.queue_io if job["state"] == "claimed" else self.queue_io_finish).append(job["id"])
        elif pool == "local":
            self.queue_local.append(job["id"])
        else:
            self.queue_api[priority].append(job["id"])

    def _route_of(self, job: dict[str, Any]) -> tuple[str, int]:
        state = job["state"]
        if state == "prepared" and job.get("dedupe_from"):
            return "io", 0
        if state in ("prepared", "submitting"):
            return ("local", 0) if job.get("mode") == "local" else ("api", SUBMIT)
        if state == "submitted":
            return "api", POLL
        if state == "ready":
            return "api", FETCH
        return "io", 0

    def _step_of(self, job: dict[str, Any]) -> tuple[str, Callable[[steps.Context, dict[str, Any]], dict[str, Any]]]:
        state = job["state"]
        if state == "claimed":
            return "prepare", steps.prepare
        if state == "prepared" and job.get("dedupe_from"):
            earlier = self._earlier_result(job) or {}
            output, output_sha256 = earlier.get("output"), earlier.get("output_sha256")
            return "copy", lambda context, job: steps.copy_result(context, job, output, output_sha256)
        if state in ("prepared", "submitting"):
            if job.get("mode") == "local":
                return "local", steps.run_local
            return ("submit", steps.submit_sync) if job.get("mode") == "sync" else ("submit", steps.submit_async)
        if state == "submitted":
            return "poll", steps.poll
        if state == "ready":
            return "fetch", steps.fetch
        if state == "fetched":
            return "deliver", lambda context, job: deliver(context.rule, job)
        if state == "delivered":
            return "archive", lambda context, job: archive(context.rule, job)
        if state == "failing":
            return "fail", lambda context, job: fail(context.rule, job)
        raise AssertionError(f"no step for state {state}")

    def _crash_point(self, state: str) -> None:
        if self.crash_countdown and state == self.crash_state:
            self.crash_countdown -= 1
            self.crash_armed = self.crash_countdown == 0

    def _flush(self) -> None:
        self.ledger.flush()
        if self.crash_armed:
            os.kill(os.getpid(), signal.SIGKILL)

    def _dispatch(self) -> None:
        now = self.clock()
        while self.timers and self.timers[0][0] <= now:
            _, _, job_id = heapq.heappop(self.timers)
            job = self.ledger.jobs.get(job_id)
            if job is not None:
                self._enqueue(job)
            else:
                self.scheduled.discard(job_id)
        launches: list[tuple[str, str, Callable[[], Any], Any]] = []
        # Later stages first: finishing a job (deliver, archive, fail) frees its place before
        # a new one is prepared, and a new file is claimed only while few jobs wait for a
        # backend. The rest stay in their inbox, visible, and the ledger stays small.
        free_io = self.pools["io"].free
        for pending in (self.queue_io_finish, self.queue_io):
            while pending and free_io > 0:
                launches.append(self._launch("io", self.ledger.jobs[pending.popleft()]))
                free_io -= 1
        free_local = self.pools["local"].free
        while self.queue_local and free_local > 0:
            launches.append(self._launch("local", self.ledger.jobs[self.queue_local.popleft()]))
            free_local -= 1
        waiting = len(self.queue_io) + len(self.queue_local) + len(self.queue_api[SUBMIT]) + len(self.claiming) - len(self.claims)
        room = self.claim_window - waiting
        while self.claims and free_io > 0 and room > 0:
            candidate = self.claims.popleft()
            rule = self.rules[candidate.folder]
            launches.append(("io", "claim", _bind_claim(rule, candidate, self.daemon_id), (candidate.folder, candidate.relpath)))
            free_io -= 1
            room -= 1
        if self.client is not None and not self._paused(now):
            free_api = self.pools["api"].free
            if self.pause_reason is not None:
                # The pause is over but the key is not proven yet: one call probes it.
                free_api = 0 if self.pools["api"].busy else 1
            while free_api > 0:
                queue_index = next((index for index, pending in enumerate(self.queue_api) if pending), None)
                if queue_index == SUBMIT and self._hold_if_capped(self.ledger.jobs[self.queue_api[SUBMIT][0]]):
                    self.queue_api[SUBMIT].popleft()
                    continue
                if queue_index is None or not self.limiter.try_acquire(now):
                    break
                job = self.ledger.jobs[self.queue_api[queue_index].popleft()]
                if queue_index == SUBMIT:
                    # Intent before the POST: durable (flush below) before any byte is sent.
                    job["submits"] = job.get("submits", 0) + 1
                    if job["state"] != "submitting":
                        self._set_state(job, "submitting")
                    else:
                        self.ledger.put(job)
                launches.append(self._launch("api", job))
                free_api -= 1
        self._flush()
        for pool_name, step, function, key in launches:
            self.pools[pool_name].submit(function, (pool_name, step, key))

    def _launch(self, pool_name: str, job: dict[str, Any]) -> tuple[str, str, Callable[[], Any], str]:
        job_id = job["id"]
        self.scheduled.discard(job_id)
        self.in_flight.add(job_id)
        step, function = self._step_of(job)
        context = steps.Context(self.rules[job["folder"]], self.client, self.scratch)
        snapshot = dict(job)
        return pool_name, step, lambda: function(context, snapshot), job_id

    # ------------------------------------------------------------------ outcomes

    def _on_step_done(self, step: str, job_id: str, updates: dict[str, Any] | None, error: BaseException | None) -> None:
        self.in_flight.discard(job_id)
        job = self.ledger.jobs.get(job_id)
        if job is None:
            return
        self.status_dirty = True
        if error is None:
            assert updates is not None
            self._apply(step, job, updates)
            return
        if isinstance(error, DurabilityError):
            raise error
        if isinstance(error, OSError) and error.errno in DURABILITY_ERRNOS:
            raise DurabilityError(f"{step} of {job['source']} in folder {job['folder']}: {error}") from error
        if isinstance(error, ImageError):
            self._fail(job, str(error), stage=job["state"])
        elif isinstance(error, ApiError):
            self._on_api_error(step, job, error)
        elif isinstance(error, FileNotFoundError) and step == "deliver":
            back = "ready" if job.get("mode") == "async" else "prepared"
            log.warning("the fetched result is gone; fetching it again", job_id=job_id, file=job["source"], state=back)
            self._set_state(job, back)
            self._schedule(job)
        else:
            log.error("step failed", step=step, job_id=job_id, folder=job["folder"], file=job["source"], error=f"{type(error).__name__}: {error}")
            self._retry(job, f"{step}: {type(error).__name__}: {error}", IO_RETRIES)

    def _apply(self, step: str, job: dict[str, Any], updates: dict[str, Any]) -> None:
        remaining = updates.pop("_remaining", None)
        if remaining is not None:
            # Answers to concurrent calls arrive in any order, and the balance only goes down
            # between top-ups: a higher figure replaces the last one only once that is a minute old.
            last = self.ledger.meta.get("credits_remaining")
            if last is None or Decimal(remaining) <= Decimal(last) or time.time() - self.ledger.meta.get("credits_reported_at", 0) > 60:
                self.ledger.put_meta(credits_remaining=remaining, credits_reported_at=time.time())
            else:
                remaining = None
        if step == "submit" and "credits" not in updates:
            # The API said nothing of the cost: count the estimate rather than nothing.
            updates["credits"] = job.get("credits_estimate", "1")
            updates["credits_reported"] = False
        if "credits" in updates:
            charge = Decimal(updates["credits"])
            spent = Decimal(self.ledger.meta.get("credits_spent", "0")) + charge
            previous = job.get("credits")
            if previous is not None:  # a resubmit: both charges count
                updates["credits"] = str(Decimal(previous) + charge)
            self.spending.add(job["folder"], charge)
            self.ledger.put_meta(credits_spent=str(spent), spent_by_day=self.spending.as_meta())
        if remaining is not None:
            self._check_low_balance(Decimal(remaining))
        # A free call (poll, fetch) that works proves the key again, but not that credits are
        # back after a 402: only a paid submit does; else every poll would unpause, let the
        # waiting files in, and their submits would meet 402 again.
        credits_pause = self.pause_reason is not None and self.pause_reason.startswith("the account has no credits left")
        if self.pause_reason is not None and (step == "submit" or (step in ("poll", "fetch") and not credits_pause)) and not self._pause_forever:
            log.info("the API accepts the key again; resuming", was=self.pause_reason)
            self._unpause()
        status = updates.pop("_status", None)
        if status is not None:
            self._on_status(job, status)
            return
        new_state = updates.pop("state")
        if new_state == "submitted":
            updates["submitted_at"] = time.time()
        job.update(updates)
        if step == "prepare" and self.rules[job["folder"]].dedupe:
            earlier = self._earlier_result(job)
            if earlier is not None:
                job["dedupe_from"] = earlier["id"]
        if step == "copy" and job.get("dedupe_from") and "output_tmp" not in updates:
            # The earlier result is gone or changed: make it afresh.
            log.info("earlier identical result is gone; upscaling again", job_id=job["id"], file=job["source"])
            self.results.pop(hash((job["sha256"], self._recipe(job))), None)
            job.pop("dedupe_from", None)
        self._set_state(job, new_state)
        if new_state == "submitted":
            self._schedule(job, self._first_poll_delay())
        elif new_state in ("archived", "failed"):
            steps.remove_upload(job)
            if new_state == "archived":
                self._remember_result(job)
        else:
            self._schedule(job)

    def _recipe(self, job: dict[str, Any]) -> str:
        width, height = job.get("target") or (0, 0)
        return self.rules[job["folder"]].recipe(width, height, job.get("strategy", "smooth")) if job["folder"] in self.rules else ""

    def _remember_result(self, job: dict[str, Any]) -> None:
        if job.get("output") and job.get("output_sha256") and job.get("sha256") and job.get("target") and job["folder"] in self.rules:
            self.results[hash((job["sha256"], self._recipe(job)))] = job["id"]

    def _earlier_result(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """A delivered job with the same input and recipe as `job` (checked in full), or None."""
        job_id = self.results.get(hash((job["sha256"], self._recipe(job))))
        earlier = self.ledger.get(job_id) if job_id and job_id != job["id"] else None
        if earlier is None or earlier.get("sha256") != job["sha256"] or self._recipe(earlier) != self._recipe(job):
            return None
        return earlier

    def _hold_if_capped(self, job: dict[str, Any]) -> bool:
        """Keep a submit back while it would cross a credit cap; say so once per job."""
        rule = self.rules[job["folder"]]
        budget = self.config.clipdrop.budget
        if all(cap is None for cap in (budget.daily, budget.monthly, rule.budget.daily, rule.budget.monthly)):
            return False
        reserved = Decimal(0)
        reserved_folder = Decimal(0)
        for job_id in self.in_flight:
            other = self.ledger.jobs.get(job_id)
            if other is not None and other["state"] == "submitting":
                estimate = Decimal(other.get("credits_estimate", "1"))
                reserved += estimate
                if other["folder"] == job["folder"]:
                    reserved_folder += estimate
        reason = self.spending.over_cap(job["folder"], Decimal(job.get("credits_estimate", "1")), reserved, reserved_folder, budget, rule.budget)
        if reason is None:
            if self.held.pop(job["id"], None) is not None:
                log.info("job goes: within the credit caps again", job_id=job["id"], folder=job["folder"], file=job["source"])
            return False
        if self.held.get(job["id"]) != reason:
            log.warning("job waits: credit cap", job_id=job["id"], folder=job["folder"], file=job["source"], reason=reason)
        self.held[job["id"]] = reason
        self.scheduled.discard(job["id"])
        self.status_dirty = True
        return True

    def _release_held(self) -> None:
        """Give held jobs another look (a new day, a raised cap after a reload)."""
        for job_id in list(self.held):
            job = self.ledger.jobs.get(job_id)
            if job is not None and job["state"] not in TERMINAL_STATES:
                self._schedule(job)

    def _check_low_balance(self, remaining: Decimal) -> None:
        threshold = self.config.clipdrop.budget.low_balance
        if threshold is None:
            return
        if remaining < threshold and not self.low_balance_warned:
            log.warning("credit balance is low", remaining=str(remaining), threshold=str(threshold))
            self.low_balance_warned = True
        elif remaining >= threshold:
            self.low_balance_warned = False

    def _on_status(self, job: dict[str, Any], status: Any) -> None:
        now_wall = time.time()
        elapsed = now_wall - job.get("submitted_at", now_wall)
        job["polls"] = job.get("polls", 0) + 1
        poll_interval = self.config.clipdrop.poll_interval
        if status.state == "completed":
            if job["polls"] == 1:
                self._learn(elapsed, completed=True, eta_duration=None)
            self._set_state(job, "ready")
            self._schedule(job)
        elif status.state in ("failed", "error", "canceled", "cancelled"):
            self._fail(job, f"the API reports the task {job.get('task_id')} {status.state}", stage="submitted")
        elif status.state == "unknown":
            self._retry(job, f"the API does not know task {job.get('task_id')}", self.config.clipdrop.max_attempts)
        else:
            if job["polls"] == 1:
                eta_duration = status.eta - job["submitted_at"] if status.eta is not None and "submitted_at" in job else None
                self._learn(elapsed, completed=False, eta_duration=eta_duration)
            if status.eta is not None and status.eta > now_wall:
                delay = status.eta - now_wall + min(0.5, 0.05 * poll_interval + 0.05)
            else:
                delay = min(max(poll_interval, 60.0 if poll_interval < 60 else poll_interval), poll_interval * 1.5 ** max(0, job["polls"] - 1))
            self._schedule(job, max(0.05, delay))

    def _first_poll_delay(self) -> float:
        """Ask when the task is likely done: learned from earlier tasks, else the poll interval."""
        if self.task_estimate is None:
            return self.config.clipdrop.poll_interval
        return max(0.05, self.task_estimate)

    def _learn(self, elapsed: float, *, completed: bool, eta_duration: float | None) -> None:
        """Tune when to ask first about a new task, from how the first poll of this one went.

        Each first poll gives a sample of how long tasks take: the eta's duration when the API
        gives one; else a bound (done: at most the time waited; queued: more than it). The
        first poll of a new task goes at the 90th percentile of the last 50 samples, so most
        tasks cost one status call and few are asked about too early.
        """
        if eta_duration is not None and eta_duration > 0:
            sample = eta_duration  # the API said how long the task takes
        elif completed:
            # Done by the time we asked: the task took at most this long. Counted a little
            # shorter, so the estimate can follow tasks that get faster.
            sample = elapsed * 0.95
        else:
            sample = elapsed * 1.5  # still queued, no eta: it takes longer than we waited
        self.task_durations.append(sample)
        ordered = sorted(self.task_durations)
        # Ask at the 90th percentile of recent durations: most tasks are done by then.
        self.task_estimate = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] + 0.05

    def _on_api_error(self, step: str, job: dict[str, Any], error: ApiError) -> None:
        settings = self.config.clipdrop
        if error.kind in ("auth", "credits", "rate") and job["state"] == "submitting":
            # The API refused the POST before doing any work: nothing was charged, so the
            # job is not "interrupted mid-submit" (a restart must not flag a double charge).
            self._set_state(job, "prepared")
        if error.kind in ("auth", "credits"):
            what = "the API key was refused" if error.kind == "auth" else "the account has no credits left"
            self._pause(f"{what} (HTTP {error.status}): {error}")
            self._schedule(job)
        elif error.kind == "rate":
            job["rate_limited"] = job.get("rate_limited", 0) + 1
            wait = error.retry_after if error.retry_after is not None else self._backoff(job["rate_limited"])
            self.limiter.pause(wait)
            log.warning("rate limited by the API; all calls of the key pause", seconds=round(wait, 2), retry_after=error.retry_after is not None)
            if job["rate_limited"] > 10 * settings.max_attempts:
                self._fail(job, f"rate limited {job['rate_limited']} times in a row", stage=job["state"], status=429)
            else:
                self._schedule(job)
        elif error.kind == "rejected":
            self._fail(job, str(error), stage=job["state"], status=error.status)
        elif error.kind == "expired":
            self._retry(job, str(error), settings.max_attempts, delay=0.0)
        else:
            if step == "submit" and error.maybe_processed:
                # No idempotency key: sending it again may pay twice, so only a bounded number of times.
                job["ambiguous"] = job.get("ambiguous", 0) + 1
                if job["ambiguous"] > settings.ambiguous_retries:
                    self._fail(
                        job,
                        f"the upload may have been charged but its answer was lost ({error}); not sent again to avoid paying "
                        f"twice (clipdrop.ambiguous_retries: {settings.ambiguous_retries}); `folderd retry` sends it again",
                        stage=job["state"], status=error.status,
                    )
                    return
                job["maybe_paid_twice"] = True
                log.warning("a submit failed after it was sent; sending it again may pay twice", job_id=job["id"], file=job["source"], error=str(error))
            self._retry(job, str(error), settings.max_attempts, status=error.status)

    def _retry(self, job: dict[str, Any], reason: str, limit: int, *, delay: float | None = None, status: int | None = None) -> None:
        job["tries"] = job.get("tries", 0) + 1
        job["attempts"] = job.get("attempts", 0) + 1
        # A job already failing has nowhere further to go: it keeps retrying with backoff
        # (failing it again would re-run the same step at once, in a tight loop).
        if job["tries"] >= limit and job["state"] != "failing":
            self._fail(job, f"gave up after {job['tries']} attempts: {reason}", stage=job["state"], status=status)
            return
        wait = self._backoff(job["tries"]) if delay is None else delay
        log.info("will retry", job_id=job["id"], folder=job["folder"], file=job["source"], state=job["state"], attempt=job["tries"], in_seconds=round(wait, 2), reason=reason)
        self.ledger.put(job)
        self._schedule(job, wait)

    def _backoff(self, tries: int) -> float:
        return min(300.0, self.backoff_base * 2 ** (tries - 1)) * random.uniform(0.5, 1.5)

    def _fail(self, job: dict[str, Any], reason: str, *, stage: str, status: int | None = None) -> None:
        job["error"] = {"reason": reason, "stage": stage, "status": status, "message": reason}
        self._set_state(job, "failing")
        self._schedule(job)

    def _set_state(self, job: dict[str, Any], state: str, **fields: Any) -> None:
        old = job["state"]
        job.update(fields)
        job["state"] = state
        job["updated"] = time.time()
        if state != old:
            job["tries"] = 0
            self._crash_point(state)
            self._count(old, state)
            if state == "failed":
                self.failed_this_run += 1
            if self.progress is not None and state in TERMINAL_STATES:
                self.progress.finished(job)
        self.ledger.put(job)
        self._log_job(job)
        self.status_dirty = True

    def _count(self, old: str | None, new: str) -> None:
        if old is not None:
            self.state_counts[old] = self.state_counts.get(old, 0) - 1
        self.state_counts[new] = self.state_counts.get(new, 0) + 1

    def _log_job(self, job: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"folder": job["folder"], "file": job["source"], "job_id": job["id"], "state": job["state"]}
        for key in ("task_id", "credits", "mode", "output", "archived_to", "failed_to"):
            if job.get(key):
                fields[key] = job[key]
        if job["state"] in ("archived", "failed"):
            fields["duration"] = round(job["updated"] - job["created"], 3)
        if job["state"] in ("failing", "failed") and job.get("error"):
            fields["reason"] = job["error"].get("reason")
            log.warning("job", **fields)
        else:
            log.info("job", **fields)

    # ------------------------------------------------------------------ pausing

    _pause_forever = False
    _next_probe_release = 0.0

    def _pause(self, reason: str, *, forever: bool = False) -> None:
        if self.pause_reason != reason:
            log.error("API backend paused: files wait in their folders, nothing is moved to failed", reason=reason, retry_in=None if forever else self.config.clipdrop.pause_retry)
        self.pause_reason = reason
        self._pause_forever = forever
        self.pause_until = float("inf") if forever else self.clock() + self.config.clipdrop.pause_retry
        self.ledger.put_meta(paused=reason)

    def _unpause(self) -> None:
        self._pause_forever = False
        self.pause_reason = None
        self.pause_until = 0.0
        self.ledger.put_meta(paused=None)
        for key, candidate in list(self.deferred.items()):
            del self.deferred[key]
            self._on_candidate(candidate)

    def _paused(self, now: float) -> bool:
        if self.pause_reason is None:
            return False
        if now < self.pause_until:
            return True
        # Time to try again: the queued calls go, the first answer probes the key (a refusal
        # pauses again, from then). pause_until is left alone here, so that whichever caller
        # asks first, _dispatch too sees the pause over. For when no job is waiting on the
        # API, one deferred file is let in per pause_retry to probe with; the others stay in
        # the inbox until the key works (_unpause lets them all in).
        if self.deferred and now >= self._next_probe_release:
            self._next_probe_release = now + self.config.clipdrop.pause_retry
            key, candidate = next(iter(self.deferred.items()))
            del self.deferred[key]
            if key not in self.claiming:
                self.claiming.add(key)
                self.claims.append(candidate)
        return False

    # ------------------------------------------------------------------ status

    def _status_line(self) -> str:
        counts = self.state_counts
        queued = sum(counts.get(state, 0) for state in QUEUED_STATES) + len(self.claiming) + len(self.deferred)
        in_flight = sum(value for state, value in counts.items() if state not in QUEUED_STATES and state not in TERMINAL_STATES)
        parts = [f"{queued} queued", f"{in_flight} in flight", f"{counts.get('archived', 0):,} delivered", f"{counts.get('failed', 0):,} failed"]
        remaining = self.ledger.meta.get("credits_remaining")
        if remaining is not None:
            parts.append(f"{_format_credits(remaining)} credits left")
        if self.held:
            parts.append(f"{len(self.held)} held by a credit cap")
        if self.low_balance_warned:
            parts.append("LOW BALANCE")
        if self.pause_reason:
            parts.append(f"PAUSED: {self.pause_reason[:80]}")
        return ", ".join(parts)

    def _housekeeping(self) -> None:
        now = self.clock()
        if now >= self.next_held_check:
            self.next_held_check = now + 5.0
            self._revive_watchers()
            if self.held:
                self._release_held()
        self.notifier.status(self._status_line())
        if self.progress is not None:
            self.progress.show(len(self.claiming) + len(self.claims))
        if self.notifier.watchdog_interval and now >= self.next_watchdog:
            if self._healthy(now):
                self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval
        self._write_status()

    def _revive_watchers(self) -> None:
        """A watcher thread or the inotify observer that died is started again."""
        if self.observer is not None and not self.observer.is_alive():
            log.error("the inotify observer thread died; starting a new one")
            self.observer = None
            for name in [name for name, watcher in self.watchers.items() if watcher.method == "native"]:
                self._stop_watcher(name)
                self._start_watcher(self.rules[name])
        for name, watcher in list(self.watchers.items()):
            if not watcher.is_alive() and not watcher.stopping.is_set():
                log.error("a folder watcher thread died; starting a new one", folder=name)
                self._stop_watcher(name)
                self._start_watcher(self.rules[name])

    def _healthy(self, now: float) -> bool:
        """Watchdog pings only while every watcher thread is alive and turning."""
        for watcher in self.watchers.values():
            if not watcher.is_alive() or now - watcher.heartbeat > max(30.0, 3 * watcher.rule.poll_interval):
                log.error("a folder watcher is stuck; withholding the watchdog ping so systemd restarts folderd", folder=watcher.rule.name)
                return False
        return True

    def _write_status(self, force: bool = False) -> None:
        now = self.clock()
        # A watcher's method or availability changing, and its last scan (at 30 s granularity, to
        # spare an idle disk), also make status.json stale, not only job changes.
        watch = {name: (watcher.method, watcher.unavailable, (watcher.last_scan or 0) // 30) for name, watcher in self.watchers.items()}
        if watch != self.status_watch:
            self.status_watch = watch
            self.status_dirty = True
        if not force and (now < self.next_status_write or not self.status_dirty):
            return
        self.next_status_write = now + 1.0
        self.status_dirty = False
        folders = {}
        for name, watcher in self.watchers.items():
            folders[name] = {
                "watch": watcher.method,
                "watch_reason": watcher.method_reason,
                "last_scan": watcher.last_scan,
                "unavailable": watcher.unavailable,
                "waiting_in_inbox": sum(1 for key in self.deferred if key[0] == name),
            }
        status = {
            "pid": os.getpid(),
            "updated": time.time(),
            "line": self._status_line(),
            "paused": self.pause_reason,
            "folders": folders,
            "in_flight": len(self.in_flight),
            "held": dict(self.held),
        }
        try:
            write_status_file(self.config.state_dir / STATUS_FILE, status)
        except OSError as error:
            # A full or failing state disk stops the daemon (exit 4) like a ledger write would,
            # rather than escaping the loop as a traceback; anything else only costs the view.
            if error.errno in DURABILITY_ERRNOS:
                raise DurabilityError(f"cannot write {STATUS_FILE} in {self.config.state_dir}: {os.strerror(error.errno or 0)}") from error
            log.warning("cannot write the status file", error=str(error))

    def _check_once_finished(self) -> None:
        if not all(watcher.initial_done.is_set() for watcher in self.watchers.values()):
            return
        if self.claims or self.claiming or self.in_flight:
            return
        unfinished = [job for job in self.ledger.unfinished() if job["folder"] in self.rules]
        waiting_on_credits = all(job["id"] in self.held or (self.pause_reason and self._route_of(job)[0] == "api") for job in unfinished)
        if unfinished and not waiting_on_credits:
            return
        if (self.pause_reason and (unfinished or self.deferred)) or (unfinished and self.held):
            self.exit_code = EXIT_PAUSED
        elif self.failed_this_run:
            self.exit_code = EXIT_FAILED
        self.events.put(("stop",))


def _bind_claim(rule: FolderRule, candidate: Candidate, daemon_id: str) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        job = claim(rule.inbox, candidate.relpath, candidate.signature, daemon_id, rule.name)
        if candidate.verdict == "incomplete":
            job["incomplete"] = f"the file never became a whole image: {candidate.reason}"
        return job

    return run


def _format_credits(value: str) -> str:
    try:
        number = Decimal(value)
    except ArithmeticError:
        return value
    return f"{number:,.0f}" if number == number.to_integral_value() else f"{number:,.2f}"


def _inotify_advice(error: OSError) -> str:
    import errno

    if error.errno == errno.ENOSPC:
        return "inotify watch limit reached: raise it with sysctl fs.inotify.max_user_watches=524288"
    if error.errno == errno.EMFILE:
        return "inotify instance limit reached: raise it with sysctl fs.inotify.max_user_instances=512"
    return f"{type(error).__name__}: {error}"
