"""The persistent record of every job: a JSON-lines snapshot plus an append-only JSON-lines journal.

Files in the state directory:
  snapshot.jsonl  rewritten atomically (temp, fsync, rename): a header line
                  {"version", "seq", "meta"}, then one job record per line.
  journal.jsonl   one line per change since the snapshot: `<json>\t<crc32 hex>\n`, where the
                  JSON is {"seq": N, "job": {...}} (a job's whole record after the change) or
                  {"seq": N, "meta": {...}} (daemon-wide facts such as the last credit balance).
  lock            flock'd by the daemon that owns the directory.

Why a journal: a change costs one appended line, whatever the number of jobs, and
`flush()` gives changes made together one fsync (group commit). The snapshot is rewritten
only when the journal has grown bigger than it, so the cost stays amortised O(1).

Why lines: both files are read and written a line at a time, so loading 100,000 jobs never
holds them all as one parsed document, and a daemon keeps each finished job only as its
encoded line (about 500 bytes instead of a 2 KB dict); `get()` decodes one on demand.

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
from folderd.fsutil import check_durable, fsync_dir, temp_path

SNAPSHOT = "snapshot.jsonl"
JOURNAL = "journal.jsonl"
LOCK = "lock"
VERSION = 2
MIN_COMPACT_BYTES = 4 * 1024 * 1024

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


def decode_line(line: bytes) -> dict[str, Any] | None:
    """One journal line (without its newline) if it is whole and its CRC matches, else None."""
    payload, tab, checksum = line.rpartition(b"\t")
    try:
        if not tab or int(checksum, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _finished_line(job: dict[str, Any]) -> bytes:
    """A finished job as the compact JSON line kept in memory and in the snapshot."""
    return json.dumps({key: job[key] for key in _TERMINAL_FIELDS if key in job}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_snapshot(path: Path) -> dict[str, Any]:
    """The snapshot as one document {"version", "seq", "meta", "jobs": {id: record}} (for tools and tests)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.readline())
        header["jobs"] = {job["id"]: job for job in (json.loads(line) for line in handle if line.strip())}
    return header


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

    def __init__(self, state_dir: Path, *, fsync: bool = True, keep_finished_encoded: bool = False) -> None:
        self.state_dir = state_dir
        self.jobs: dict[str, dict[str, Any]] = {}
        # With keep_finished_encoded (the daemon), finished jobs live here as their JSON line
        # instead of in `jobs`; a read-only ledger keeps every job as a dict in `jobs`.
        self.finished: dict[str, bytes] = {}
        self.keep_finished_encoded = keep_finished_encoded
        self.meta: dict[str, Any] = {}
        self.seq = 0
        self.dropped_lines = 0
        self._pending: list[bytes] = []
        self._journal_fd: int | None = None
        self._journal_bytes = 0
        self._snapshot_bytes = 0
        self._journal_valid_bytes = 0
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
        """Read the snapshot and replay the journal, a line at a time (safe while a daemon runs)."""
        snapshot_path = self.state_dir / SNAPSHOT
        try:
            with open(snapshot_path, "rb") as handle:
                header = json.loads(handle.readline())
                if not isinstance(header, dict) or header.get("version") != VERSION:
                    version = header.get("version") if isinstance(header, dict) else None
                    raise StateError(f"{snapshot_path} has version {version!r}; this folderd reads version {VERSION}")
                self.meta = header.get("meta", {})
                self.seq = header.get("seq", 0)
                for line in handle:
                    if line.strip():
                        self._keep(json.loads(line), line.rstrip(b"\n"))
                self._snapshot_bytes = handle.tell()
        except FileNotFoundError:
            pass
        except (ValueError, OSError, KeyError) as error:
            # The snapshot is only ever replaced by rename, so it is never torn by a crash;
            # a broken one was damaged from outside, and guessing would risk paying twice.
            raise StateError(f"{snapshot_path} is unreadable ({error}); restore it or move the state directory aside") from None
        good = dropped = 0
        try:
            with open(self.state_dir / JOURNAL, "rb") as handle:
                for line in handle:
                    record = decode_line(line[:-1]) if line.endswith(b"\n") else None
                    if record is None:
                        # Only the tail of an append-only file can be torn, and nothing after a
                        # bad line can be trusted to follow it.
                        dropped = 1 + sum(1 for _ in handle)
                        break
                    good += len(line)
                    if record.get("seq", 0) <= self.seq:
                        continue
                    self.seq = record["seq"]
                    if "job" in record:
                        self._keep(record["job"], None)
                    elif "meta" in record:
                        self.meta.update(record["meta"])
        except FileNotFoundError:
            pass
        self.dropped_lines = dropped
        self._journal_valid_bytes = good
        self._journal_bytes = good

    def _keep(self, job: dict[str, Any], line: bytes | None) -> None:
        """Hold a job's latest record: finished ones encoded when keep_finished_encoded."""
        job_id = job["id"]
        if self.keep_finished_encoded and job.get("state") in TERMINAL_STATES:
            self.jobs.pop(job_id, None)
            self.finished[job_id] = line if line is not None else _finished_line(job)
        else:
            self.finished.pop(job_id, None)
            self.jobs[job_id] = job

    def open_for_writing(self) -> None:
        """After load(): cut a torn tail off the journal, or compact when it is long; open it for appending."""
        journal = self.state_dir / JOURNAL
        if "daemon_id" not in self.meta:
            self.meta["daemon_id"] = secrets.token_hex(4)
            self.compact()  # the daemon id must be durable before any file is claimed under it
            return
        if not (self.state_dir / SNAPSHOT).exists() or self._journal_bytes > max(MIN_COMPACT_BYTES, self._snapshot_bytes):
            self.compact()
            return
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if self.dropped_lines or os.fstat(fd).st_size != self._journal_valid_bytes:
                # New lines must not follow a torn one: the next load would stop at it.
                os.ftruncate(fd, self._journal_valid_bytes)
                os.fsync(fd)
        except OSError as error:
            raise DurabilityError(f"cannot open the ledger journal in {self.state_dir}: {error}") from error
        self._journal_fd = fd

    def get(self, job_id: str) -> dict[str, Any] | None:
        """A job by id, live or finished (decoded)."""
        job = self.jobs.get(job_id)
        if job is None and job_id in self.finished:
            return json.loads(self.finished[job_id])  # type: ignore[no-any-return]
        return job

    def all_jobs(self) -> Iterable[dict[str, Any]]:
        """Every job as a dict, the finished ones decoded one at a time."""
        yield from list(self.jobs.values())
        for line in list(self.finished.values()):
            yield json.loads(line)

    # ------------------------------------------------------------------ changing

    def put(self, job: dict[str, Any]) -> None:
        """Record a job's new state; durable after the next flush()."""
        self.seq += 1
        self._keep(job, None)
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
        self._journal_bytes += len(data)
        self._pending.clear()
        if self._journal_bytes > max(MIN_COMPACT_BYTES, self._snapshot_bytes):
            self.compact()

    def compact(self) -> None:
        """Rewrite the snapshot with every job, a line at a time, and start an empty journal."""
        header = {"version": VERSION, "seq": self.seq, "meta": self.meta}
        path = self.state_dir / SNAPSHOT
        temp = temp_path(self.state_dir, "snapshot")
        try:
            with open(temp, "xb", buffering=1024 * 1024) as handle:
                handle.write(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n")
                for job in self.jobs.values():
                    line = _finished_line(job) if job.get("state") in TERMINAL_STATES else json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
                    handle.write(line + b"\n")
                for line in self.finished.values():
                    handle.write(line + b"\n")
                handle.flush()
                if self._fsync:
                    os.fsync(handle.fileno())
                size = handle.tell()
            os.replace(temp, path)
            journal = self.state_dir / JOURNAL
            fresh = self.state_dir / (JOURNAL + ".new")
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.replace(fresh, journal)
            fsync_dir(self.state_dir)
        except OSError as error:
            try:
                temp.unlink()
            except OSError:
                pass
            raise DurabilityError(f"cannot write the ledger in {self.state_dir}: {error}") from error
        if self._journal_fd is not None:
            os.close(self._journal_fd)
        self._journal_fd = fd
        self._journal_bytes = 0
        self._snapshot_bytes = size
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
