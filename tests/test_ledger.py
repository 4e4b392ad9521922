"""The ledger: snapshot + CRC'd journal, group commit, torn tails, compaction, the lock."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from folderd import ledger as ledger_module
from folderd.errors import StateError
from folderd.ledger import JOURNAL, SNAPSHOT, Ledger, decode_lines, encode_line, read_only, read_snapshot


def job(job_id: str, state: str = "claimed", **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "folder": "f0", "source": f"{job_id}.jpg", "state": state, "created": 1.0, "updated": 1.0, **fields}


def open_ledger(state_dir: Path, *, lock: bool = False) -> Ledger:
    """A ledger opened the way the daemon opens one (load, then open for writing)."""
    ledger = Ledger(state_dir, fsync=True)
    if lock:
        ledger.acquire_lock()
    ledger.load()
    ledger.open_for_writing()
    return ledger


def reload(state_dir: Path) -> Ledger:
    return read_only(state_dir)


def journal_lines(state_dir: Path) -> list[bytes]:
    return (state_dir / JOURNAL).read_bytes().splitlines(keepends=True)


# --------------------------------------------------------------------------- round trip


def test_put_flush_load_round_trip(tmp_path: Path) -> None:
    """Jobs and meta facts put and flushed are all there, unchanged, when another Ledger loads the directory."""
    ledger = open_ledger(tmp_path)
    first = job("a", "claimed", sha256="00" * 32, note="naïve ünïcode ✓")
    ledger.put(first)
    ledger.put(job("b", "submitted", task_id="t-1"))
    ledger.put_meta(credits_remaining="99.5", paused=None)
    ledger.flush()
    ledger.put({**first, "state": "prepared"})
    ledger.flush()
    loaded = reload(tmp_path)
    assert loaded.jobs == {"a": {**first, "state": "prepared"}, "b": job("b", "submitted", task_id="t-1")}
    assert loaded.meta["credits_remaining"] == "99.5" and loaded.meta["paused"] is None
    assert loaded.meta["daemon_id"] == ledger.meta["daemon_id"] and len(ledger.meta["daemon_id"]) == 8
    assert loaded.seq == ledger.seq == 4
    assert loaded.dropped_lines == 0
    assert [job["id"] for job in loaded.unfinished()] == ["a", "b"]
    ledger.close()


def test_unflushed_puts_are_not_on_disk(tmp_path: Path) -> None:
    """A put is durable only after flush(): before it, another reader sees nothing and the journal is empty."""
    ledger = open_ledger(tmp_path)
    ledger.put(job("a"))
    assert ledger.dirty
    assert (tmp_path / JOURNAL).read_bytes() == b""
    assert reload(tmp_path).jobs == {}
    ledger.flush()
    assert not ledger.dirty
    assert set(reload(tmp_path).jobs) == {"a"}


def test_daemon_id_survives_restarts(tmp_path: Path) -> None:
    """The daemon id (which names the work area) is kept across reopenings of the ledger."""
    ledger = open_ledger(tmp_path)
    daemon_id = ledger.meta["daemon_id"]
    ledger.close()
    again = open_ledger(tmp_path)
    assert again.meta["daemon_id"] == daemon_id
    again.close()


def test_flush_before_open_for_writing_is_an_error(tmp_path: Path) -> None:
    """Writing a ledger that was only loaded (read-only) raises StateError instead of losing data silently."""
    ledger = read_only(tmp_path)
    ledger.put(job("a"))
    with pytest.raises(StateError, match="not open for writing"):
        ledger.flush()


# --------------------------------------------------------------------------- group commit


def test_group_commit_writes_several_puts_with_one_write_and_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several puts then one flush: one write() and one fsync() of the journal, every line in it."""
    ledger = open_ledger(tmp_path)
    writes: list[int] = []
    fsyncs: list[int] = []
    real_write, real_fsync = os.write, os.fsync

    def counting_write(fd: int, data: Any) -> int:
        writes.append(fd)
        return real_write(fd, data)

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(ledger_module.os, "write", counting_write)
    monkeypatch.setattr(ledger_module.os, "fsync", counting_fsync)
    for index in range(25):
        ledger.put(job(f"j{index}"))
    ledger.put_meta(credits_remaining="10")
    assert writes == [] and fsyncs == []
    ledger.flush()
    assert len(writes) == 1 and len(fsyncs) == 1
    ledger.flush()  # nothing pending: no write, no fsync
    assert len(writes) == 1 and len(fsyncs) == 1
    monkeypatch.undo()
    assert len(journal_lines(tmp_path)) == 26
    assert len(reload(tmp_path).jobs) == 25


def test_journal_lines_carry_seq_and_crc(tmp_path: Path) -> None:
    """Each journal line is `<json>\\t<crc32 hex>\\n` with increasing seq numbers and the job's whole record."""
    ledger = open_ledger(tmp_path)
    ledger.put(job("a"))
    ledger.put(job("a", "prepared"))
    ledger.put_meta(paused="no key")
    ledger.flush()
    seqs = []
    for line in journal_lines(tmp_path):
        payload, checksum = line.rstrip(b"\n").rsplit(b"\t", 1)
        assert int(checksum, 16) == zlib.crc32(payload)
        seqs.append(json.loads(payload)["seq"])
    assert seqs == [1, 2, 3]
    assert line == encode_line({"seq": 3, "meta": {"paused": "no key"}})


# --------------------------------------------------------------------------- torn tails


def _ledger_with_three_jobs(state_dir: Path) -> None:
    ledger = open_ledger(state_dir)
    for name in ("a", "b", "c"):
        ledger.put(job(name))
        ledger.flush()
    ledger.close()


@pytest.mark.parametrize("cut", [1, 10, -40, -9, -2, -1])
def test_truncated_last_line_is_dropped(tmp_path: Path, cut: int) -> None:
    """A journal cut anywhere inside its last line (a power cut mid-write) loads the earlier lines and drops only that one."""
    _ledger_with_three_jobs(tmp_path)
    lines = journal_lines(tmp_path)
    last = lines[-1]
    keep = cut if cut > 0 else len(last) + cut
    (tmp_path / JOURNAL).write_bytes(b"".join(lines[:-1]) + last[:keep])
    loaded = reload(tmp_path)
    assert set(loaded.jobs) == {"a", "b"}
    assert loaded.dropped_lines == 1
    assert loaded.seq == 2


@pytest.mark.parametrize(
    "tail",
    [
        b"garbage",
        b"garbage\n",
        b"\x00\x00\x00\x00\x00\x00\x00\x00",
        b"\xff\xfe\tzz\n",
        b'{"seq": 9, "job": {"id": "x", "state": "claimed"}}\n',
        b'{"seq": 9, "job": {"id": "x", "state": "claimed"}}\t00000000\n',
        b'{"seq": 9, "job": {"id": "x", "state": "claim\t' + b"1234abcd\n",
        b"\n",
        b"\t\n",
    ],
)
def test_garbage_or_bad_crc_tail_is_dropped_and_never_crashes(tmp_path: Path, tail: bytes) -> None:
    """Garbage, NUL padding, a line without CRC or with a wrong CRC at the end is dropped on load; load never raises."""
    _ledger_with_three_jobs(tmp_path)
    with open(tmp_path / JOURNAL, "ab") as handle:
        handle.write(tail)
    loaded = reload(tmp_path)
    assert set(loaded.jobs) == {"a", "b", "c"}
    assert loaded.dropped_lines >= 1
    assert "x" not in loaded.jobs


def test_nothing_after_a_bad_line_is_trusted(tmp_path: Path) -> None:
    """A valid-looking line after one with a bad CRC is not replayed: the journal is only trusted up to the first bad line."""
    _ledger_with_three_jobs(tmp_path)
    good_after_bad = encode_line({"seq": 10, "job": job("late")})
    with open(tmp_path / JOURNAL, "ab") as handle:
        handle.write(b'{"seq":9}\tdeadbeef\n' + good_after_bad)
    loaded = reload(tmp_path)
    assert set(loaded.jobs) == {"a", "b", "c"}
    assert loaded.dropped_lines == 2


def test_writing_after_a_torn_tail_keeps_new_records(tmp_path: Path) -> None:
    """After a torn tail is dropped, the daemon's next writes are readable on the next load (not stuck behind the bad line)."""
    _ledger_with_three_jobs(tmp_path)
    with open(tmp_path / JOURNAL, "ab") as handle:
        handle.write(b'{"seq": 4, "job": {"id": "torn"')
    ledger = open_ledger(tmp_path)
    assert ledger.dropped_lines == 1
    ledger.put(job("d"))
    ledger.put(job("a", "archived"))
    ledger.flush()
    ledger.close()
    loaded = reload(tmp_path)
    assert set(loaded.jobs) == {"a", "b", "c", "d"}
    assert loaded.jobs["a"]["state"] == "archived"
    assert loaded.dropped_lines == 0


def test_decode_lines_reports_valid_bytes(tmp_path: Path) -> None:
    """decode_lines returns the valid records, how many bytes were valid, and how many lines were dropped."""
    one = encode_line({"seq": 1, "job": job("a")})
    two = encode_line({"seq": 2, "job": job("b")})
    records, good, dropped = decode_lines(one + two + two[:5])
    assert [record["seq"] for record in records] == [1, 2]
    assert good == len(one + two) and dropped == 1
    assert decode_lines(b"") == ([], 0, 0)


def test_damaged_snapshot_is_a_clear_state_error(tmp_path: Path) -> None:
    """A snapshot damaged from outside (it is only ever replaced by rename) refuses to load with a message, no guessing."""
    _ledger_with_three_jobs(tmp_path)
    (tmp_path / SNAPSHOT).write_text('{"version": 2, "seq": 0, "meta": {}}\n{"id": "a", "sta')
    with pytest.raises(StateError, match=f"{SNAPSHOT} is unreadable"):
        reload(tmp_path)
    (tmp_path / SNAPSHOT).write_text('{"version": 99, "seq": 0, "meta": {}}\n')
    with pytest.raises(StateError, match="has version 99"):
        reload(tmp_path)


# --------------------------------------------------------------------------- compaction


def test_compaction_keeps_every_job_and_empties_the_journal(tmp_path: Path) -> None:
    """compact() writes every job (finished ones trimmed to their lasting fields) to the snapshot and starts an empty journal."""
    ledger = open_ledger(tmp_path)
    for index in range(50):
        state = ("claimed", "submitted", "archived", "failed")[index % 4]
        scratch = {f"step_{number}": number for number in range(20)}  # a real job carries many working fields
        ledger.put(job(f"j{index}", state, work=f"/w/{index}", upload=f"/u/{index}", output=f"/o/{index}", sha256="ab", **scratch))
    ledger.put_meta(credits_spent="12.5")
    ledger.flush()
    seq = ledger.seq
    ledger.compact()
    assert (tmp_path / JOURNAL).read_bytes() == b""
    snapshot = read_snapshot(tmp_path / SNAPSHOT)
    assert snapshot["seq"] == seq and len(snapshot["jobs"]) == 50
    loaded = reload(tmp_path)
    assert set(loaded.jobs) == {f"j{index}" for index in range(50)}
    assert loaded.meta["credits_spent"] == "12.5"
    archived = loaded.jobs["j2"]
    assert archived["state"] == "archived" and archived["output"] == "/o/2" and archived["sha256"] == "ab"
    assert "upload" not in archived and "work" not in archived and "step_3" not in archived  # trimmed to what status and dedupe need
    assert loaded.jobs["j3"]["state"] == "failed" and "step_3" not in loaded.jobs["j3"]
    unfinished = loaded.jobs["j1"]
    assert unfinished["work"] == "/w/1" and unfinished["upload"] == "/u/1" and unfinished["step_3"] == 3  # unfinished: everything
    # Writing goes on into the new journal, with seq numbers after the snapshot's.
    ledger.put(job("j0", "prepared"))
    ledger.flush()
    ledger.close()
    again = reload(tmp_path)
    assert again.jobs["j0"]["state"] == "prepared" and again.seq == seq + 1


def test_stale_journal_lines_are_not_replayed_over_a_newer_snapshot(tmp_path: Path) -> None:
    """A crash after the new snapshot but before the journal was emptied: lines the snapshot holds (seq <= its seq) are skipped."""
    ledger = open_ledger(tmp_path)
    ledger.put(job("a", "claimed"))
    ledger.put(job("b", "claimed"))
    ledger.put_meta(credits_remaining="100")
    ledger.flush()
    stale = (tmp_path / JOURNAL).read_bytes()
    ledger.put(job("a", "archived"))  # seq 4: only in the snapshot
    ledger.put_meta(credits_remaining="99")
    ledger.compact()
    ledger.close()
    # Put the old journal back, as if the crash came between the snapshot's rename and the journal's.
    (tmp_path / JOURNAL).write_bytes(stale)
    loaded = reload(tmp_path)
    assert loaded.jobs["a"]["state"] == "archived"
    assert loaded.meta["credits_remaining"] == "99"
    assert loaded.seq == 5
    # And the daemon reopening it goes on from seq 5, so its new lines are replayed next time.
    reopened = open_ledger(tmp_path)
    reopened.put(job("b", "failed"))
    reopened.flush()
    reopened.close()
    final = reload(tmp_path)
    assert final.jobs["b"]["state"] == "failed" and final.jobs["a"]["state"] == "archived" and final.seq == 6


def test_flush_compacts_automatically_when_the_journal_grows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the journal outgrows max(MIN_COMPACT_BYTES, the snapshot), flush() compacts; nothing is lost or replayed twice."""
    monkeypatch.setattr(ledger_module, "MIN_COMPACT_BYTES", 20_000)
    ledger = Ledger(tmp_path, fsync=False)
    ledger.load()
    ledger.open_for_writing()
    ledger.put(job("counter", "claimed", count=0))
    ledger.put(job("other"))
    ledger.flush()
    total = 2005
    for count in range(1, total + 1):
        ledger.put(job("counter", "claimed", count=count))
        if count % 100 == 0:
            ledger.flush()
    ledger.flush()
    size = (tmp_path / JOURNAL).stat().st_size
    assert size < 20_000, "the journal was never compacted"
    snapshot = read_snapshot(tmp_path / SNAPSHOT)
    assert snapshot["seq"] > 0 and "counter" in snapshot["jobs"]
    ledger.close()
    loaded = reload(tmp_path)
    assert loaded.jobs["counter"]["count"] == total
    assert set(loaded.jobs) == {"counter", "other"}
    assert loaded.seq == total + 2


def test_daemon_ledger_keeps_finished_jobs_encoded(tmp_path: Path) -> None:
    """With keep_finished_encoded, a finished job leaves `jobs` for a compact line in `finished`; get() and all_jobs() still return it, and it survives a reload."""
    ledger = Ledger(tmp_path, fsync=False, keep_finished_encoded=True)
    ledger.load()
    ledger.open_for_writing()
    ledger.put(job("live", "claimed"))
    ledger.put(job("done", "archived"))
    ledger.flush()
    assert set(ledger.jobs) == {"live"} and set(ledger.finished) == {"done"}
    assert isinstance(ledger.finished["done"], bytes)
    assert ledger.get("done")["state"] == "archived" and ledger.get("nope") is None
    assert {item["id"] for item in ledger.all_jobs()} == {"live", "done"}
    ledger.compact()
    ledger.close()
    again = Ledger(tmp_path, keep_finished_encoded=True)
    again.load()
    assert set(again.jobs) == {"live"} and again.get("done")["state"] == "archived"
    assert reload(tmp_path).jobs["done"]["state"] == "archived"


def test_torn_tail_is_cut_before_new_lines_are_appended(tmp_path: Path) -> None:
    """A start after a torn last line cuts it off before appending, so lines written afterwards are read at the next load."""
    ledger = Ledger(tmp_path, fsync=False)
    ledger.load()
    ledger.open_for_writing()
    ledger.put(job("a", "claimed"))
    ledger.flush()
    ledger.close()
    with open(tmp_path / JOURNAL, "ab") as handle:
        handle.write(b'{"seq": 99, "job": {"id": "x"')  # a power cut mid-write
    second = Ledger(tmp_path, fsync=False)
    second.load()
    assert second.dropped_lines == 1
    second.open_for_writing()
    second.put(job("b", "claimed"))
    second.flush()
    second.close()
    assert set(reload(tmp_path).jobs) == {"a", "b"}


# --------------------------------------------------------------------------- the lock


def test_second_lock_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    """A second Ledger.acquire_lock on a locked state dir raises StateError naming the dir and the holder's pid."""
    first = Ledger(tmp_path)
    first.acquire_lock()
    second = Ledger(tmp_path)
    with pytest.raises(StateError) as caught:
        second.acquire_lock()
    message = str(caught.value)
    assert f"another folderd (pid {os.getpid()}) is using the state directory {tmp_path}" in message
    assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
    first.release_lock()
    second.acquire_lock()  # free again once the holder lets go
    second.release_lock()


def test_lock_is_released_by_close(tmp_path: Path) -> None:
    """close() flushes pending changes and releases the lock for the next daemon."""
    ledger = open_ledger(tmp_path, lock=True)
    ledger.put(job("a"))
    ledger.close()
    assert set(reload(tmp_path).jobs) == {"a"}
    again = open_ledger(tmp_path, lock=True)
    again.close()


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    """acquire_lock creates a missing state dir with mode 0700 and the lock file 0600."""
    state = tmp_path / "deep" / "state"
    ledger = Ledger(state)
    ledger.acquire_lock()
    try:
        assert state.stat().st_mode & 0o777 == 0o700
        assert (state / "lock").stat().st_mode & 0o777 == 0o600
    finally:
        ledger.release_lock()
