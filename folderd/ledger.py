"""The persistent record of every job: a JSON snapshot plus an append-only JSON-lines journal.

Files in the state directory:
  ledger.json     snapshot: {"version", "seq", "meta", "jobs": {id: record}}, rewritten atomically.
  journal.jsonl   one line per change since the snapshot: `<json>\t<crc32 hex>\n`, where the
                  JSON is {"seq": N, "job": {...}} (a job's whole record after the change) or
                  {"seq": N, "meta": {...}} (daemon-wide facts such as the last credit balance).
  lock            flock'd by the daemon that owns the directory.

Why a journal: a change costs one appended line, whatever the number of jobs, and
`flush()` gives changes made together one fsync (group commit). The snapshot is rewritten
only when the journal has grown past the number of jobs, so the cost stays amortised O(1).

Crash safety: a line is valid only if it is complete and its CRC matches; a torn last line
(power cut mid-write) is dropped. Each line carries a sequence number and the snapshot
records the last one it contains, so a crash between writing a new snapshot and emptying
the journal replays nothing twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from folderd.errors import DurabilityError, StateError
from folderd.fsutil import atomic_write, check_durable, fsync_dir

SNAPSHOT = "ledger.json"
JOURNAL = "journal.jsonl"
LOCK = "lock"
VERSION = 1
MIN_COMPACT_LINES = 2000

# Only what a finished job needs for status, history and dedupe is kept after compaction.
_TERMINAL_FIELDS = (
    "id", "folder", "source", "state", "size", "sha256", "created", "updated", "output",
    "output_sha256", "archived_to", "failed_to", "error", "task_id", "mode", "strategy",
    "target", "credits", "credits_estimate", "backend", "attempts", "charged_twice", "maybe_paid_twice",
)
TERMINAL_STATES = {"archived", "failed"}


def encode_line(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    payload = text.encode("utf-8")
    return payload + b"\t" + f"{zlib.crc32(payload):08x}".encode() + b"\n"


def decode_lines(data: bytes) -> tuple[list[dict[str, Any]], int, int]:
    """Given journal bytes, return (valid records, bytes that were valid, lines dropped).

    Reading stops at the first line that is torn or fails its CRC: only the tail can be
    torn in an append-only file, and nothing after a bad line can be trusted to follow it.
    """
    records: list[dict[str, Any]] = []
    good = 0
    position = 0
    while position < len(data):
        end = data.find(b"\n", position)
        if end < 0:
            break
        line = data[position:end]
        payload, tab, checksum = line.rpartition(b"\t")
        try:
            if not tab or int(checksum, 16) != zlib.crc32(payload):
                break
            records.append(json.loads(payload))
        except ValueError:
            break
        position = end + 1
        good = position
    dropped = data[good:].count(b"\n") + (1 if data[good:] and not data.endswith(b"\n") else 0)
    return records, good, dropped


class Ledger:
    """Jobs by id, daemon-wide meta facts, and the files that keep them.

    One writer: only the daemon's supervisor loop calls put/put_meta/flush.
    """

    def __init__(self, state_dir: Path, *, fsync: bool = True) -> None:
        self.state_dir = state_dir
        self.jobs: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] = {}
        self.seq = 0
        self.dropped_lines = 0
        self._pending: list[bytes] = []
        self._journal_fd: int | None = None
        self._journal_lines = 0
        self._lock_fd: int | None = None
        self._fsync = fsync

    # ------------------------------------------------------------------ opening

    def acquire_lock(self) -> None:
        """Take the state directory for this process; raise StateError if another daemon has it."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateError(
                f"another folderd (pid {holder}) is using the state directory {self.state_dir}; "
                "two daemons on one ledger would each take the other's jobs"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> None:
        """Read the snapshot and replay the journal (read-only; safe while a daemon runs)."""
        snapshot_path = self.state_dir / SNAPSHOT
        try:
            snapshot = json.loads(snapshot_path.read_bytes())
        except FileNotFoundError:
            snapshot = {"version": VERSION, "seq": 0, "meta": {}, "jobs": {}}
        except (ValueError, OSError) as error:
            # The snapshot is only ever replaced by rename, so it is never torn by a crash;
            # a broken one was damaged from outside, and guessing would risk paying twice.
            raise StateError(f"{snapshot_path} is unreadable ({error}); restore it or move the state directory aside") from None
        if snapshot.get("version") != VERSION:
            raise StateError(f"{snapshot_path} has version {snapshot.get('version')!r}; this folderd reads version {VERSION}")
        self.jobs = snapshot.get("jobs", {})
        self.meta = snapshot.get("meta", {})
        self.seq = snapshot.get("seq", 0)
        try:
            data = (self.state_dir / JOURNAL).read_bytes()
        except FileNotFoundError:
            data = b""
        records, good, dropped = decode_lines(data)
        self.dropped_lines = dropped
        self._journal_valid_bytes = good
        self._journal_lines = len(records)
        for record in records:
            if record.get("seq", 0) <= self.seq:
                continue
            self.seq = record["seq"]
            if "job" in record:
                job = record["job"]
                self.jobs[job["id"]] = job
            elif "meta" in record:
                self.meta.update(record["meta"])

    def open_for_writing(self) -> None:
        """After load(): drop a torn tail, compact, and open the journal for appending."""
        if "daemon_id" not in self.meta:
            self.meta["daemon_id"] = secrets.token_hex(4)
        self.compact()

    # ------------------------------------------------------------------ changing

    def put(self, job: dict[str, Any]) -> None:
        """Record a job's new state; durable after the next flush()."""
        self.seq += 1
        self.jobs[job["id"]] = job
        self._pending.append(encode_line({"seq": self.seq, "job": job}))

    def put_meta(self, **facts: Any) -> None:
        self.seq += 1
        self.meta.update(facts)
        self._pending.append(encode_line({"seq": self.seq, "meta": facts}))

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def flush(self) -> None:
        """Write every pending change with one write and one fsync (group commit).

        Raise DurabilityError if the disk refuses: the caller must not act on unsaved state.
        """
        if not self._pending:
            return
        if self._journal_fd is None:
            raise StateError("the ledger is not open for writing")
        data = b"".join(self._pending)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._journal_fd, view):]
            if self._fsync:
                os.fsync(self._journal_fd)
        except OSError as error:
            check_durable(error, f"cannot write the ledger journal in {self.state_dir}")
            raise DurabilityError(f"cannot write the ledger journal in {self.state_dir}: {error}") from error
        self._journal_lines += len(self._pending)
        self._pending.clear()
        if self._journal_lines > max(MIN_COMPACT_LINES, 2 * len(self.jobs)):
            self.compact()

    def compact(self) -> None:
        """Rewrite the snapshot with every job and start an empty journal."""
        for job_id, job in self.jobs.items():
            if job.get("state") in TERMINAL_STATES and len(job) > len(_TERMINAL_FIELDS):
                self.jobs[job_id] = {key: job[key] for key in _TERMINAL_FIELDS if key in job}
        snapshot = {"version": VERSION, "seq": self.seq, "meta": self.meta, "jobs": self.jobs}
        data = json.dumps(snapshot, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        try:
            atomic_write(self.state_dir / SNAPSHOT, data)
            journal = self.state_dir / JOURNAL
            temp = self.state_dir / (JOURNAL + ".new")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.replace(temp, journal)
            fsync_dir(self.state_dir)
        except OSError as error:
            raise DurabilityError(f"cannot write the ledger in {self.state_dir}: {error}") from error
        if self._journal_fd is not None:
            os.close(self._journal_fd)
        self._journal_fd = fd
        self._journal_lines = 0
        self._pending.clear()

    def close(self) -> None:
        if self._journal_fd is not None:
            try:
                self.flush()
            finally:
                os.close(self._journal_fd)
                self._journal_fd = None
        self.release_lock()

    # ------------------------------------------------------------------ reading

    def unfinished(self) -> Iterable[dict[str, Any]]:
        return (job for job in self.jobs.values() if job.get("state") not in TERMINAL_STATES)


def read_only(state_dir: Path) -> Ledger:
    """Load a ledger for viewing, without the lock (folderd status)."""
    ledger = Ledger(state_dir)
    ledger.load()
    return ledger
