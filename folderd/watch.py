"""Watching inboxes: which files are there, and which are complete enough to take.

Each folder has a watcher thread. inotify events (watchdog) are only hints that make it
look sooner; the truth is a full scan at start and every `rescan` seconds (watchdog drops
inotify overflows silently), or every `poll_interval` seconds on network and FUSE mounts,
where another host's writes raise no events at all.

A file is offered to the daemon when its size, mtime and ctime have not changed for
`settle` seconds and it is a whole image (its end marker is there). A file that settles
but is not whole yet (a scanner pausing between pages) is kept waiting; only after
`incomplete_timeout` without any change is it offered as truncated, to fail with a reason.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import heapq
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folderd import logs
from folderd.config import BUILTIN_IGNORES, FolderRule
from folderd.imaging import completeness

log = logs.get("folderd.watch")

WORK_DIR = ".folderd"
NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
    "davfs", "vboxsf", "virtiofs", "ncpfs", "coda", "gpfs", "beegfs",
}
RETRY_EMIT_AFTER = 30.0
Signature = tuple[int, int, int, int]


@dataclass
class Candidate:
    """A file the watcher thinks is ready to be claimed."""

    folder: str
    relpath: str
    signature: Signature
    verdict: str   # complete | invalid | incomplete (gave up waiting)
    reason: str


@dataclass(slots=True)
class _Entry:
    signature: Signature
    stable_since: float
    generation: int = 0
    incomplete_since: float | None = None
    incomplete_reason: str = ""
    emitted: Signature | None = None
    emitted_at: float = 0.0
    verdict: str = ""
    reason: str = ""


def mount_of(path: Path, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str]:
    """Return (mount point, filesystem type) of the mount holding `path`."""
    target = os.path.realpath(path)
    best = ("/", "unknown")
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                point = fields[4].replace("\\040", " ")
                fstype = line.split(" - ", 1)[1].split()[0]
                if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                    best = (point, fstype)
    except OSError:
        pass
    return best


def choose_method(rule: FolderRule) -> tuple[str, str]:
    """Return ("native" | "poll", why) for a folder's inbox."""
    if rule.watch == "native":
        return "native", "watch: native in the config"
    if rule.watch == "poll":
        return "poll", "watch: poll in the config"
    probe_path = rule.inbox if rule.inbox.exists() else rule.inbox.parent
    point, fstype = mount_of(probe_path)
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse") or fstype.startswith("nfs"):
        return "poll", f"{fstype} mount at {point}: another host's writes raise no inotify events"
    return "native", f"{fstype} mount at {point}"


@functools.lru_cache(maxsize=256)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(pattern.lower())})" for pattern in patterns) or "(?!)")


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Does `name` match any of the shell patterns, case-insensitively? (One compiled regex.)"""
    return _compiled(patterns).match(name.lower()) is not None


class FolderWatcher(threading.Thread):
    """Scans one inbox, tracks files until they settle, and hands complete ones to `emit`."""

    def __init__(
        self,
        rule: FolderRule,
        emit: Callable[[Candidate], None],
        *,
        once: bool = False,
        clock: Callable[[], float] = time.monotonic,
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(name=f"watch-{rule.name}", daemon=True)
        self.rule = rule
        self.emit = emit
        self.once = once
        self.clock = clock
        self.method, self.method_reason = ("poll", "folderd once scans") if once else choose_method(rule)
        self.hints: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.initial_done = threading.Event()
        self.heartbeat = clock()
        self.last_scan: float | None = None      # wall-clock time of the last full scan
        self.unavailable: str | None = None      # why the inbox cannot be read, while it cannot
        self._entries: dict[str, _Entry] = {}
        # Due times in a heap, so a wake-up costs O(log n) with 100,000 files waiting, not O(n).
        # An entry whose due time changes gets a new item; stale items are skipped when popped.
        self._due: list[tuple[float, str]] = []
        self._generation = 0
        # The daemon says whether it has room for more candidates; while it has none, settled
        # files wait here (still in the inbox) and are neither read nor offered.
        self.room = room
        self._no_room_until = 0.0
        self._warned: set[str] = set()
        self._initial: set[str] | None = None
        self._ignores = BUILTIN_IGNORES + rule.ignore
        self._failures = 0
        self.watch_handle: Any = None            # the observer's handle, to unschedule on reload

    # ------------------------------------------------------------------ control

    def hint(self, relpath: str | None = None) -> None:
        """Something happened at `relpath` (or somewhere, with None): look soon."""
        self.hints.put(relpath)

    def stop(self) -> None:
        self.stopping.set()
        self.hints.put(None)

    def fall_back_to_polling(self, reason: str) -> None:
        self.method, self.method_reason = "poll", reason
        self.hint(None)

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        next_scan = self.clock()
        while not self.stopping.is_set():
            now = self.clock()
            self.heartbeat = now
            full = now >= next_scan
            try:
                if full:
                    self._scan()
                    self._failures = 0
                    period = self.rule.poll_interval if self.method == "poll" else self.rule.rescan
                    next_scan = self.clock() + period
                self._check_due()
            except Exception as error:  # the thread must outlive any surprise from the filesystem
                self._failures += 1
                backoff = min(60.0, 0.5 * 2 ** min(self._failures, 7))
                self._report_unavailable(error)
                next_scan = self.clock() + backoff
            timeout = max(0.0, min(next_scan, self._next_due()) - self.clock())
            try:
                relpath = self.hints.get(timeout=min(timeout, 1.0))
            except queue.Empty:
                continue
            paths: set[str | None] = {relpath}
            while True:  # take every hint that is waiting, then act once
                try:
                    paths.add(self.hints.get_nowait())
                except queue.Empty:
                    break
            if None in paths:
                next_scan = min(next_scan, self.clock())
            for path in paths:
                if path is not None and not self.once:
                    self._look_at(path)

    def _report_unavailable(self, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if self.unavailable is None:
            log.error("inbox unavailable; retrying with backoff", folder=self.rule.name, inbox=str(self.rule.inbox), error=reason)
        self.unavailable = reason

    # ------------------------------------------------------------------ scanning

    def _scan(self) -> None:
        inbox = self.rule.inbox
        info = os.stat(inbox)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(inbox))
        # Entries are observed as the scan streams them (no list of 100,000 stat results in
        # memory); those not seen in this scan, by generation, are gone.
        self._generation += 1
        now = self.clock()
        first = self.once and self._initial is None
        initial: set[str] = set()
        for relpath, item in iter_inbox(self.rule, self._acceptable):
            if first:
                initial.add(relpath)
            elif self.once and relpath not in (self._initial or ()):
                continue
            self._observe(relpath, item, now)
        if self.unavailable is not None:
            log.info("inbox available again", folder=self.rule.name, inbox=str(inbox))
            self.unavailable = None
        for relpath in [relpath for relpath, entry in self._entries.items() if entry.generation != self._generation]:
            del self._entries[relpath]
        if first:
            self._initial = initial
        self.last_scan = time.time()
        self._update_initial()

    def _acceptable(self, relpath: str, info: os.stat_result) -> bool:
        """Only regular files with one link: a planted symlink or hard link could expose another file."""
        problem = unsafe_reason(info)
        try:
            relpath.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes (a legacy-encoded name): the ledger is UTF-8 JSON
            problem = problem or "a file name that is not valid UTF-8; rename it to be taken"
        if problem is None:
            self._warned.discard(relpath)
            return True
        if relpath not in self._warned:
            self._warned.add(relpath)
            printable = relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            log.warning("skipping file", folder=self.rule.name, file=printable, reason=problem)
        return False

    def _look_at(self, relpath: str) -> None:
        """An event named this path: stat it now instead of waiting for the next scan."""
        name = relpath.rsplit("/", 1)[-1]
        parts = relpath.split("/")
        if (not self.rule.recursive and len(parts) > 1) or any(matches(part, self._ignores) or part == WORK_DIR for part in parts):
            return
        if not matches(name, self.rule.include):
            return
        try:
            info = os.lstat(self.rule.inbox / relpath)
        except OSError:
            self._entries.pop(relpath, None)
            return
        if stat.S_ISREG(info.st_mode) and self._acceptable(relpath, info):
            self._observe(relpath, info, self.clock())

    def _observe(self, relpath: str, info: os.stat_result, now: float) -> None:
        signature = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
        entry = self._entries.get(relpath)
        if entry is None:
            entry = self._entries[relpath] = _Entry(signature, now, self._generation)
            self._push(relpath, entry)
            return
        entry.generation = self._generation
        if entry.signature != signature:
            entry.signature = signature
            entry.stable_since = now
            entry.incomplete_since = None
            self._push(relpath, entry)

    # ------------------------------------------------------------------ settling

    def _due_time(self, entry: _Entry) -> float:
        if entry.emitted == entry.signature:
            return entry.emitted_at + RETRY_EMIT_AFTER
        if entry.incomplete_since is not None:
            return entry.incomplete_since + self.rule.incomplete_timeout
        return entry.stable_since + self.rule.settle

    def _push(self, relpath: str, entry: _Entry) -> None:
        heapq.heappush(self._due, (self._due_time(entry), relpath))

    def _next_due(self) -> float:
        return max(self._due[0][0], self._no_room_until) if self._due else float("inf")

    def _check_due(self) -> None:
        now = self.clock()
        while self._due and self._due[0][0] <= now:
            if not self.room():
                self._no_room_until = now + 0.25
                break
            _, relpath = heapq.heappop(self._due)
            entry = self._entries.get(relpath)
            if entry is None or self._due_time(entry) > now:
                continue  # gone, or a stale item: a later one is in the heap
            path = self.rule.inbox / relpath
            try:
                info = os.lstat(path)
            except OSError:
                del self._entries[relpath]
                continue
            signature = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
            if signature != entry.signature:
                self._observe(relpath, info, now)
                continue
            if entry.emitted == signature:
                # Offered before and not taken yet (the daemon may be busy): offer it again
                # as it was, without reading the file again.
                self._offer(relpath, entry, entry.verdict, entry.reason, now)
                continue
            if entry.incomplete_since is not None and now - entry.incomplete_since >= self.rule.incomplete_timeout:
                self._offer(relpath, entry, "incomplete", entry.incomplete_reason, now)
                continue
            verdict, reason = completeness(path)
            if verdict == "incomplete":
                if entry.incomplete_since is None:
                    entry.incomplete_since = now
                    entry.incomplete_reason = reason
                    log.info("waiting for the file to be complete", folder=self.rule.name, file=relpath, reason=reason)
                if self.rule.incomplete_timeout <= 0:
                    self._offer(relpath, entry, "incomplete", reason, now)
                else:
                    self._push(relpath, entry)
                continue
            self._offer(relpath, entry, verdict, reason, now)
        self._update_initial()

    def _offer(self, relpath: str, entry: _Entry, verdict: str, reason: str, now: float) -> None:
        entry.emitted = entry.signature
        entry.emitted_at = now
        entry.verdict, entry.reason = verdict, reason
        self._push(relpath, entry)
        if self._initial is not None:
            self._initial.discard(relpath)
        self.emit(Candidate(self.rule.name, relpath, entry.signature, verdict, reason))

    def _update_initial(self) -> None:
        if self.once and self._initial is not None:
            self._initial &= set(self._entries)
            if not self._initial:
                self.initial_done.set()

    def forget(self, relpath: str) -> None:
        """Called from the daemon's thread after a failed claim: offer the file again later."""
        self.hint(relpath)


def unsafe_reason(info: os.stat_result) -> str | None:
    """Why a directory entry must not be taken: only regular files with one link are safe,
    because a planted symlink or hard link could expose a file from elsewhere."""
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link; folderd only takes regular files"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    if info.st_nlink > 1:
        return f"a file with {info.st_nlink} hard links; folderd only takes files with one link"
    return None


def walk_inbox(rule: FolderRule, accept: Callable[[str, os.stat_result], bool] | None = None) -> dict[str, os.stat_result]:
    """Every file of the inbox that the rule includes and does not ignore: {relpath: lstat}."""
    return dict(iter_inbox(rule, accept))


def iter_inbox(
    rule: FolderRule,
    accept: Callable[[str, os.stat_result], bool] | None = None,
    directory: Path | None = None,
    prefix: str = "",
) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (relpath, lstat) for every file of the inbox that the rule includes and does not ignore.

    `accept(relpath, info)` filters further (default: only safe regular files).
    """
    ignores = BUILTIN_IGNORES + rule.ignore
    accept = accept or (lambda _relpath, info: unsafe_reason(info) is None)
    with os.scandir(directory or rule.inbox) as entries:
        for entry in entries:
            name = entry.name
            if name == WORK_DIR or matches(name, ignores):
                continue
            relpath = prefix + name
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                if rule.recursive:
                    yield from iter_inbox(rule, accept, Path(entry.path), relpath + "/")
                continue
            if matches(name, rule.include) and accept(relpath, info):
                yield relpath, info


def make_handler(watcher: FolderWatcher) -> Any:
    """A watchdog event handler that turns every event under the inbox into a hint."""
    from watchdog.events import FileSystemEventHandler

    inbox = os.fspath(watcher.rule.inbox)

    class Handler(FileSystemEventHandler):  # type: ignore[misc]
        def on_any_event(self, event: Any) -> None:
            if event.event_type in ("opened", "closed_no_write"):
                return
            for path in (getattr(event, "src_path", ""), getattr(event, "dest_path", "")):
                path = os.fsdecode(path)
                if path and path.startswith(inbox + os.sep):
                    watcher.hint(os.path.relpath(path, inbox).replace(os.sep, "/"))

    return Handler()
