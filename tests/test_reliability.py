"""Reliability (issue 3): kill -9 anywhere, power-loss discipline, disk full, cross-filesystem
moves, API chaos, and bad inputs -- with the real `folderd` process, real folders and the
fake Clipdrop API.

Every trial tracks each input by the SHA-256 of the bytes written and asserts it ends in
exactly one of done/ (with exactly one result in the outbox) or failed/ (with a sidecar
giving a reason), that no partial or empty file was ever visible under a final name (a
sampler thread looks every 5 ms), that no async task whose id was in the ledger was
submitted again, and that the ledger loads. See docs/reliability.md for the figures.

Related tests elsewhere, not repeated here: tests/test_e2e_files.py (kill -9 of a local
batch, zero-byte, truncated JPEG, text-as-JPEG, FIFO, directory named .jpg, a second daemon
on one state dir), tests/test_e2e_api.py (each API status, restart with pending tasks),
tests/test_ledger.py (torn journal lines at the unit level).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, ROOT, Setup, files, wait_until
from tests.reliability_kit import (
    Original,
    Trial,
    batch_files,
    ledger_credits,
    report,
    sha256_bytes,
    two_folder_setup,
    write_all,
    write_batch,
)

DURABLE_STEPS = ["claimed", "submitting", "submitted", "ready", "fetched", "delivered", "archived", "failing", "failed"]
EXIT_FATAL = 4


# =========================================================================== crash matrix


@pytest.mark.parametrize("state", DURABLE_STEPS)
def test_kill_right_after_each_durable_step(tmp_path: Path, fake: FakeClipdrop, state: str) -> None:
    """If folderd is SIGKILLed right after the 2nd entry into any state is durable, a restart
    finishes the batch: every input once in done (one result) or failed (with a reason),
    no partial file ever visible, no stored task id resubmitted."""
    fake.latency = 0.02
    setup = two_folder_setup(tmp_path, fake)
    originals = write_batch(setup, 10, seed=DURABLE_STEPS.index(state), bad=3)
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    trial.crash_after(state, 2)
    (killed,) = trial.kills
    states = [job["state"] for job in killed["jobs"].values()]
    assert state in states, states  # the hook fired where it should
    trial.finish()
    trial.check()
    if state == "submitting":
        caught = [job for job in killed["jobs"].values() if job["state"] == "submitting"]
        assert caught and all(setup.ledger_jobs()[job["id"]].get("maybe_paid_twice") for job in caught)


def test_the_checks_themselves_catch_partial_lost_and_duplicated_files(tmp_path: Path) -> None:
    """The sampler flags an empty file, a partial result and a partial copy under final names,
    and check_final flags a lost input and a duplicated result: their silence elsewhere means
    something."""
    from tests.reliability_kit import Sampler, check_final

    setup = Setup(tmp_path, backend="local")
    originals = write_batch(setup, 2, seed=5)
    (first, one), (_, two) = sorted(originals.items(), key=lambda item: item[1].name)
    for kind in ("outbox", "done", "failed"):
        setup.path(kind).mkdir(parents=True, exist_ok=True)
    sampler = Sampler(setup, set(originals))
    sampler.start()
    whole = (setup.inbox / one.name).read_bytes()
    (setup.outbox / "empty.jpg").write_bytes(b"")
    (setup.outbox / "half.jpg").write_bytes(whole[: len(whole) // 2])
    (setup.done / one.name).write_bytes(whole[:-10])
    time.sleep(0.1)
    sampler.stop()
    found = "\n".join(sampler.violations)
    assert "zero-length file visible" in found and "partial result visible" in found and "not the whole original" in found, found
    for kind in ("outbox", "done"):
        for path in setup.path(kind).iterdir():
            path.unlink()
    os.replace(setup.inbox / one.name, setup.done / one.name)
    (setup.outbox / one.name).write_bytes(whole)
    (setup.inbox / two.name).unlink()
    setup.state.mkdir()
    with pytest.raises(AssertionError, match="LOST"):
        check_final(setup, originals)
    (setup.outbox / (Path(one.name).stem + "-1.jpg")).write_bytes(whole)
    with pytest.raises(AssertionError, match="a duplicate delivery"):
        check_final(setup, {first: one})


def _matrix_trial(root: Path, fake: FakeClipdrop, seed: int, count: int, lives: int) -> dict[str, Any]:
    """One batch, `lives` daemon lives each ended by SIGKILL (a random moment of `folderd run`
    or right after a random durable step of `folderd once`), then `folderd once` finishes it."""
    rng = random.Random(seed)
    setup = two_folder_setup(root, fake)
    early, writes_now = batch_files(setup, count // 2, seed=seed, bad=1)
    late, writes_later = batch_files(setup, count - count // 2, seed=seed, start=count // 2)
    write_all(writes_now)
    trial = Trial(setup, fake, {**early, **late})
    trial.start_sampler()
    writer: threading.Thread | None = None
    for life in range(lives):
        if life == 0 or rng.random() < 0.5:
            daemon = trial.start()
            if writer is None:  # the second half arrives while the daemon runs, written in two halves
                writer = threading.Thread(target=write_all, args=(writes_later,), kwargs={"pause": 0.01}, daemon=True)
                writer.start()
            trial.kill_at(daemon, rng.uniform(0.3, 2.5))
        else:
            assert writer is not None
            writer.join()
            state = rng.choice(DURABLE_STEPS[:-2])
            trial.crash_after(state, rng.randint(1, max(1, count // 4)), must=False)
    assert writer is not None
    writer.join()
    trial.finish()
    outcome = trial.check()
    assert outcome["done"] == count, outcome
    return {"seed": seed, "kills": len(trial.kills), **outcome}


def _slow_requested(config: pytest.Config) -> bool:
    expression = config.getoption("markexpr") or ""
    return os.environ.get("FOLDERD_FULL_MATRIX") == "1" or ("slow" in expression and "not slow" not in expression)


@pytest.mark.parametrize(
    "trials, count, lives",
    [pytest.param(2, 50, 2, id="small"), pytest.param(24, 60, 3, id="full", marks=pytest.mark.slow)],
)
def test_crash_matrix(request: pytest.FixtureRequest, tmp_path: Path, fake: FakeClipdrop, trials: int, count: int, lives: int) -> None:
    """If a batch (sync and async folders, half the files arriving while it runs) is killed
    at random moments and right after random durable steps, then finished, every input ends
    exactly once in done with one result, and no stored task id is ever sent again."""
    if request.node.get_closest_marker("slow") and not _slow_requested(request.config):
        pytest.skip("the full crash matrix (~2 min) runs with -m slow or FOLDERD_FULL_MATRIX=1")
    fake.latency = 0.03
    fake.async_duration = 0.5
    seed_base = int(os.environ.get("FOLDERD_MATRIX_SEED", "1000"))
    results = []
    for number in range(trials):
        seed = seed_base + number
        try:
            results.append(_matrix_trial(tmp_path / f"trial{number}", fake, seed, count, lives))
        except AssertionError as error:
            raise AssertionError(f"trial with seed {seed} (rerun: FOLDERD_MATRIX_SEED={seed}): {error}") from None
    assert sum(result["kills"] for result in results) >= trials  # the kills really happened


# =========================================================================== power loss


@pytest.mark.parametrize("tail", ["half-line", "garbage", "bad-crc"])
def test_torn_ledger_tail_is_recovered_on_start(tmp_path: Path, fake: FakeClipdrop, tail: str) -> None:
    """If the journal ends with a torn record (power cut mid-append), folderd starts, says it
    dropped it, and finishes every job: no crash loop, no file lost, no stored task resubmitted."""
    setup = two_folder_setup(tmp_path, fake)
    originals = write_batch(setup, 8, seed=7)
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    trial.crash_after("submitted", 2)
    journal = setup.state / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert lines, "expected journal records after the crash"
    torn = {
        "half-line": lines[-1][: len(lines[-1]) // 2],
        "garbage": os.urandom(300).replace(b"\n", b"x"),
        "bad-crc": lines[-1].rpartition(b"\t")[0] + b"\tdeadbeef\n",
    }[tail]
    with open(journal, "ab") as handle:
        handle.write(torn)
    report("fault", fault=f"torn-journal:{tail}")
    daemon = trial.start()
    try:
        daemon.wait_for(lambda: len(files(setup.done)) + len(files(setup.path("done", 1))) == 8, timeout=30, what="the batch finished")
        assert "dropped a torn record" in daemon.log_text()
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    trial.finish()
    trial.check()  # includes: charged twice only when caught in 'submitting' and so marked


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root and mount rights): {result.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """mount(name, size) -> a fresh tmpfs under tmp_path; all unmounted at teardown."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "8m") -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte with a hidden file; return it."""
    filler = directory / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 64, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
    finally:
        os.close(fd)
    return filler


def _where_is(setup: Setup, originals: dict[str, Original]) -> dict[str, list[str]]:
    """Every place each input's content is now (inbox, work area, done, failed). Hidden
    `.folderd-*` temp files (a copy not yet given its name) are not places: the next start
    removes them."""
    found: dict[str, list[str]] = {sha: [] for sha in originals}
    for index in range(len(setup.names)):
        for kind in ("inbox", "done", "failed"):
            root = setup.path(kind, index)
            for path in root.rglob("*") if root.exists() else []:
                if path.is_file() and not path.name.startswith((".filler", ".folderd-")):
                    digest = sha256_bytes(path.read_bytes())
                    if digest in found:
                        found[digest].append(f"{kind}/{path.relative_to(root)}")
    return found


@pytest.mark.parametrize("where", ["state", "outbox"])
def test_disk_full_stops_with_exit_4_and_loses_nothing(tmp_path: Path, fake: FakeClipdrop, tmpfs: Any, where: str) -> None:
    """If the state dir's or the outbox's filesystem is full, folderd stops with a clear
    message and exit 4 instead of carrying on; after space is freed, a restart delivers
    every input exactly once."""
    mount = tmpfs(f"{where}fs", "2m")
    overrides: dict[str, Any] = {"state_dir": str(mount / "state")} if where == "state" else {}
    setup = two_folder_setup(tmp_path / "setup", fake, **overrides)
    if where == "outbox":
        setup.folder(0)["outbox"] = str(mount / "outbox")
        setup.folder(1)["outbox"] = str(mount / "outbox1")
        setup.write()
    originals, writes = batch_files(setup, 10, seed=11)
    trial = Trial(setup, fake, originals)
    daemon = trial.start()
    try:
        daemon.wait_for(lambda: (setup.state / "status.json").exists() and setup.path("outbox", 1).exists(), what="the daemon started")
        filler = _fill(mount)
        report("fault", fault=f"disk-full:{where}")
        write_all(writes)
        code = daemon.process.wait(timeout=30)
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    log = daemon.log_text()
    assert code == EXIT_FATAL, f"exit {code}\n{log[-3000:]}"
    assert "cannot be written" in log and "No space left on device" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    places = _where_is(setup, originals)
    assert all(places.values()), f"inputs lost while the disk was full: {[sha for sha, where in places.items() if not where]}"
    filler.unlink()
    trial.start_sampler()
    trial.finish()
    trial.check()


STATUS_ENOSPC = """
import errno, os, sys
import folderd.daemon as daemon
real = daemon.write_status_file
def write_status_file(path, data):
    if os.path.exists(os.environ["ENOSPC_AFTER"]):  # the test says when the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real(path, data)
daemon.write_status_file = write_status_file
from folderd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_status_file_write_error_stops_with_exit_4(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If the state disk fills up and status.json is the first write to fail, folderd stops
    with exit 4 and a clear message (it used to escape the loop as a traceback, exit 1)."""
    setup = two_folder_setup(tmp_path, fake)
    flag = tmp_path / "disk-is-full"
    env = {**setup.env, "ENOSPC_AFTER": str(flag)}
    log_path = tmp_path / "status-enospc.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", STATUS_ENOSPC, "run", "-c", str(setup.config)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            wait_until(lambda: (setup.state / "status.json").exists(), what="the daemon started")
            flag.touch()
            report("fault", fault="disk-full:status-file")
            originals = write_batch(setup, 2, seed=51)
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log_path.read_text()
    assert code == EXIT_FATAL, text[-3000:]
    assert "cannot write status.json" in text and "No space left on device" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    trial = Trial(setup, fake, originals, logs=[log_path])
    trial.start_sampler()
    trial.finish()
    trial.check()


# =========================================================================== cross-filesystem


def _cross_fs_setup(tmp_path: Path, fake: FakeClipdrop, tmpfs: Any) -> Setup:
    """Inboxes (and so the work areas) on a tmpfs; outbox, done and failed on tmp_path's disk."""
    mount = tmpfs("inboxfs", "32m")
    setup = two_folder_setup(tmp_path / "disk", fake)
    for index, name in enumerate(setup.names):
        folder = setup.folder(index)
        folder["inbox"] = str(mount / name / "inbox")
        for kind in ("outbox", "done", "failed"):
            folder[kind] = str(tmp_path / "disk" / name / kind)
    setup.write()
    for index in range(2):
        setup.path("inbox", index).mkdir(parents=True)
        setup.path("done", index).mkdir(parents=True)
        assert os.stat(setup.path("inbox", index)).st_dev != os.stat(setup.path("done", index)).st_dev
    return setup


def test_cross_filesystem_done_and_failed(tmp_path: Path, fake: FakeClipdrop, tmpfs: Any) -> None:
    """If the inbox is on another filesystem than done/failed, originals are copied there
    whole (the sampler never sees a partial copy) and removed from the work area."""
    setup = _cross_fs_setup(tmp_path, fake, tmpfs)
    originals = write_batch(setup, 10, seed=21, bad=2)
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    trial.finish()
    trial.check()


def test_cross_filesystem_kill_after_delivered(tmp_path: Path, fake: FakeClipdrop, tmpfs: Any) -> None:
    """If folderd is killed right after a result is delivered, with done/ on another
    filesystem, the restart archives every original: none lost, at worst a whole duplicate."""
    setup = _cross_fs_setup(tmp_path, fake, tmpfs)
    originals = write_batch(setup, 10, seed=22, bad=1)
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    trial.crash_after("delivered", 3)
    trial.finish()
    # The kill may also catch another job's archive between its copy and its unlink: then
    # that original is in done/ twice (whole both times: the sampler checks every copy).
    outcome = trial.check(allow_done_duplicates=True)
    assert outcome == {"done": 10, "failed": 1}


KILL_ON_UNLINK = """
import os, signal, sys
real_unlink = os.unlink
def unlink(path, *args, **kwargs):
    if "/.folderd/" in os.fspath(path):  # the original in the work area, after its copy has its final name
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(path, *args, **kwargs)
os.unlink = unlink
from folderd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cross_filesystem_kill_between_copy_and_unlink_leaves_a_duplicate_never_a_loss(
    tmp_path: Path, fake: FakeClipdrop, tmpfs: Any
) -> None:
    """If folderd dies after the copy in done/ has its final name but before the original is
    unlinked from the work area, the restart leaves a duplicate in done/, never a loss."""
    setup = _cross_fs_setup(tmp_path, fake, tmpfs)
    originals = write_batch(setup, 4, seed=23)
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    result = subprocess.run(
        [sys.executable, "-c", KILL_ON_UNLINK, "once", "-c", str(setup.config)],
        env=setup.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    (setup.root / "kill-on-unlink.log").write_text(result.stdout + result.stderr)
    trial.logs.append(setup.root / "kill-on-unlink.log")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    trial.after_kill("kill between copy and unlink")
    report("fault", fault="sigkill:between-copy-and-unlink")
    places = _where_is(setup, originals)
    assert all(places.values()), places
    doubled = [where for where in places.values() if len(where) == 2]
    assert doubled and all({place.split("/")[0] for place in where} == {"inbox", "done"} for where in doubled), places
    trial.finish()
    outcome = trial.check(allow_done_duplicates=True)
    assert outcome["done"] == 4
    in_done = sorted(len(where) for where in _where_is(setup, originals).values())
    assert in_done == [1] * (4 - len(doubled)) + [2] * len(doubled), "a duplicate for each interrupted move, nothing lost"


# =========================================================================== API faults


CHAOS_KINDS = ["500", "502-html", "reset", "truncate", "429", "slow", "task-fail", "expired-url"]


def test_api_chaos_batch_nothing_lost_and_credits_add_up(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If ~30% of API calls fail (500, HTML 502, resets, truncated bodies, 429, slow
    answers, failed tasks, expired URLs), the daemon keeps running, every input ends
    delivered or in failed/ with a reason, and the credits charged equal the ledger's."""
    fake.latency = 0.01
    setup = two_folder_setup(tmp_path, fake)
    originals = write_batch(setup, 40, seed=31)
    for original in originals.values():
        original.expect = "either"
    fake.chaos(0.3, kinds=CHAOS_KINDS, seed=31, seconds=0.3)
    fake.inject("submit", "task-fail", times=2)  # on top of chaos: some tasks surely fail...
    fake.inject("result", "expired-url", times=2)  # ... and some URLs surely expire
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    daemon = trial.start()
    try:

        def settled() -> bool:
            count = sum(
                len([name for name in files(setup.path(kind, index)) if not name.endswith(".error.json")])
                for kind in ("done", "failed")
                for index in (0, 1)
            )
            return count == len(originals)

        daemon.wait_for(settled, timeout=60, what="every input delivered or failed")
        assert daemon.process.poll() is None, "the daemon died"
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    fake.clear_faults()
    faults = [record.fault for record in fake.records if record.fault]
    for fault in faults:
        report("fault", fault=f"api:{fault}")
    assert len(set(faults)) >= 6 and {"task-fail", "expired-url"} <= set(faults), f"too few kinds of fault: {sorted(set(faults))}"
    trial.check()
    jobs = setup.ledger_jobs()
    assert ledger_credits(jobs) == fake.charged(), (ledger_credits(jobs), fake.charged())
    assert fake.paid_twice() == {}
    unexpected = [event for event in daemon.events() if event.get("event") == "step failed"]
    assert unexpected == [], f"errors the daemon did not classify: {unexpected[:3]}"
    reasons = [
        json.loads((setup.path("failed", index) / name).read_text())["reason"]
        for index in (0, 1)
        for name in files(setup.path("failed", index))
        if name.endswith(".error.json")
    ]
    assert len(reasons) >= 2 and all(reasons), reasons
    assert any("the API reports the task" in reason for reason in reasons), reasons


@pytest.mark.parametrize("status", [401, 402, 403])
def test_auth_and_credit_errors_mid_batch_pause_then_resume_in_one_process(tmp_path: Path, fake: FakeClipdrop, status: int) -> None:
    """If the API starts answering 401/402/403 mid-batch, `folderd run` pauses the backend
    (nothing moves to failed/, files arriving meanwhile stay in the inbox but for one probe
    per pause_retry) and, once the key or credits are back, delivers the same files
    without a restart."""
    fake.async_duration = 0.8
    setup = two_folder_setup(tmp_path, fake, clipdrop={"pause_retry": "1s"})
    trial = Trial(setup, fake, write_batch(setup, 6, seed=41))
    daemon = trial.start()
    try:
        daemon.wait_for(lambda: len(files(setup.done)) == 3, what="the sync files delivered")
        # Async tasks of folder 1 are pending now; then the key goes bad.
        if status == 401:
            fake.inject("any", "401", times=100_000)
        elif status == 402:
            fake.set_credits(CANARY_KEY, 0)  # free calls (status, result) still work
        else:
            fake.revoke(CANARY_KEY)
        report("fault", fault=f"api:{status}-mid-batch")
        trial.originals.update(write_batch(setup, 4, seed=42, start=6))  # meets the 402 on its submits
        daemon.wait_for(lambda: f"HTTP {status}" in daemon.log_text(), what="the pause")
        waiting = write_batch(setup, 4, seed=43, start=10)
        trial.originals.update(waiting)
        time.sleep(1.5)  # one pause_retry period goes by: at most one waiting file is let in to probe
        assert daemon.process.poll() is None
        assert "API backend paused" in daemon.log_text()
        assert files(setup.failed) == [] and files(setup.path("failed", 1)) == []
        assert all(job["state"] not in ("failing", "failed") for job in setup.ledger_jobs().values())
        in_inbox = [name for index in (0, 1) for name in files(setup.path("inbox", index)) if name[1:4] in ("010", "011", "012", "013")]
        assert len(in_inbox) >= 2, f"files arriving during the pause should wait in the inbox: {in_inbox}"
        if status == 401:
            fake.clear_faults()
        elif status == 402:
            fake.set_credits(CANARY_KEY, 1000)
        else:
            fake.add_key(CANARY_KEY, 1000)
        daemon.wait_for(
            lambda: len(files(setup.done)) + len(files(setup.path("done", 1))) == 14,
            timeout=20,
            what="every file delivered after the key was fixed",
        )
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    trial.finish()
    trial.check()
    assert fake.paid_twice() == {}
    if status == 402:
        resumes = [event for event in daemon.events() if event.get("event", "").startswith("the API accepts the key again")]
        assert len(resumes) == 1, f"a free call must not end a credits pause: {len(resumes)} resumes"


# =========================================================================== bad input


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A PNG declaring width x height RGB; its zlib stream holds `rows` rows of zeros (all by default):
    a few KB (or a few hundred KB for a whole stream) that decode to width*height*3 bytes."""
    import struct
    import zlib

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    count = height if rows is None else rows
    parts = [compressor.compress(row * min(100, count - done)) for done in range(0, count, 100)]
    parts.append(compressor.flush() if rows is None else compressor.flush(zlib.Z_SYNC_FLUSH))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def _image(mode: str, size: tuple[int, int] = (60, 40)) -> Image.Image:
    """A gradient in `mode`; "I;16" is a real 16-bit greyscale ramp over the whole range."""
    if mode == "I;16":
        import struct

        width, height = size
        ramp = b"".join(struct.pack("<H", (x * 65535) // (width - 1)) for x in range(width))
        return Image.frombytes("I;16", size, ramp * height)
    return Image.linear_gradient("L").resize(size).convert(mode)


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _frames(fmt: str) -> bytes:
    frames = [Image.new("RGB", (48, 32), color) for color in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated() -> bytes:
    image = Image.new("RGB", (80, 40), (20, 120, 220))
    image.paste((230, 20, 20), (0, 0, 26, 13))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def _unique_jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = random.Random(seed)
    return _encoded(Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)), "JPEG", quality=90)


# name -> what the sidecar's reason must say
BAD_INPUTS: dict[str, str] = {
    "empty.jpg": "the file is empty",
    "cut.jpg": "JPEG end marker (EOI) is missing",
    "cut.png": "PNG end chunk (IEND) is missing",
    "text.jpg": "not an image",
    "document.jpg": "not an image",
    "wide.png": "over the largest output the API makes (12000x12000)",
    "bomb.png": "decompression bomb",
}
GOOD_INPUTS = [
    "cmyk.jpg",
    "deep16.png",
    "palette.png",
    "anim_gif.gif",
    "anim_webp.webp",
    "rotated.jpg",
    "with space.jpg",
    "ünïcødé 写真.jpg",
    "-leading-dash.jpg",
    "--help.jpg",
    "new\nline.jpg",
]


def _bad_input_bytes() -> dict[str, bytes]:
    whole_jpeg, whole_png = _unique_jpeg(1), _encoded(_image("RGB"), "PNG")
    return {
        "empty.jpg": b"",
        "cut.jpg": whole_jpeg[: len(whole_jpeg) * 2 // 3],
        "cut.png": whole_png[: len(whole_png) * 2 // 3],
        "text.jpg": b"Dear user,\nthis is a letter, not a photo.\n" * 20,
        "document.jpg": b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" + os.urandom(2000) + b"\n%%EOF\n",
        "wide.png": _encoded(Image.new("RGB", (9000, 8), (10, 20, 30)), "PNG"),
        "bomb.png": bomb_png(30000, 30000, rows=50),
    }


def _good_input_bytes() -> dict[str, bytes]:
    palette = _image("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    found = {
        "cmyk.jpg": _encoded(Image.new("CMYK", (60, 40), (0, 120, 200, 10)), "JPEG"),
        "deep16.png": _encoded(_image("I;16"), "PNG"),
        "palette.png": _encoded(palette, "PNG", transparency=0),
        "anim_gif.gif": _frames("GIF"),
        "anim_webp.webp": _frames("WEBP"),
        "rotated.jpg": _exif_rotated(),
    }
    for seed, name in enumerate(GOOD_INPUTS[len(found) :], start=100):
        found[name] = _unique_jpeg(seed)
    return found


def test_bad_inputs_fail_with_a_reason_odd_ones_are_delivered_and_the_daemon_keeps_running(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If one `folderd run` meets empty, truncated, non-image, oversized and bomb files, odd
    but valid images (CMYK, 16-bit, palette, animated, EXIF-rotated), odd names, a >30 MB
    file, a FIFO, a directory named .jpg, and files deleted or replaced before the claim,
    each bad one fails with a clear reason, each good one is delivered, and it keeps running."""
    fake.rpm = 1_000_000
    setup = Setup(tmp_path, backend="clipdrop", folders=2, base_url=fake.base_url, folder={"incomplete_timeout": "1s"}).with_key()
    setup.folder(1)["target"] = {"width": 400}  # the >30 MB file: a small output keeps the fake quick
    setup.write()
    inbox, big_inbox = setup.inbox, setup.path("inbox", 1)
    inbox.mkdir(parents=True)
    big_inbox.mkdir(parents=True)
    bad, good = _bad_input_bytes(), _good_input_bytes()
    big = _encoded(Image.frombytes("RGB", (3300, 3300), os.urandom(3300 * 3300 * 3)), "PNG", compress_level=0)
    assert len(big) > 30_000_000
    originals: dict[str, Original] = {}
    for name, data in bad.items():
        originals[sha256_bytes(data)] = Original(0, name, sha256_bytes(data), expect="failed")
    for name, data in good.items():
        originals[sha256_bytes(data)] = Original(0, name, sha256_bytes(data))
    originals[sha256_bytes(big)] = Original(1, "noise.png", sha256_bytes(big))
    replaced_first, replaced_second, deleted = _unique_jpeg(8), _unique_jpeg(9), _unique_jpeg(10)
    originals[sha256_bytes(replaced_second)] = Original(0, "swap.jpg", sha256_bytes(replaced_second))
    after = _unique_jpeg(11)
    originals[sha256_bytes(after)] = Original(0, "after.jpg", sha256_bytes(after))
    os.mkfifo(inbox / "pipe.jpg")
    (inbox / "album.jpg").mkdir()
    (inbox / "album.jpg" / "inside.jpg").write_bytes(_unique_jpeg(7))
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    daemon = trial.start()
    try:
        for name, data in {**bad, **good}.items():
            (inbox / name).write_bytes(data)
        (big_inbox / "noise.png").write_bytes(big)
        # Deleted, and replaced, within the settle time: the first content is never taken.
        (inbox / "gone.jpg").write_bytes(deleted)
        (inbox / "swap.jpg").write_bytes(replaced_first)
        time.sleep(0.05)
        (inbox / "gone.jpg").unlink()
        (tmp_path / "swap.tmp").write_bytes(replaced_second)
        os.replace(tmp_path / "swap.tmp", inbox / "swap.jpg")
        expected = len(bad) + len(good) + 2  # + noise.png, swap.jpg

        def finished() -> bool:
            done = len(files(setup.done)) + len(files(setup.path("done", 1)))
            failed = len([name for name in files(setup.failed) if not name.endswith(".error.json")])
            return done + failed == expected

        daemon.wait_for(finished, timeout=40, what="every input delivered or failed")
        (inbox / "after.jpg").write_bytes(after)
        daemon.wait_for(lambda: "after.jpg" in files(setup.done), what="a later file delivered: the daemon still works")
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    # Ignored by design: left exactly where they were.
    assert (inbox / "pipe.jpg").is_fifo()
    assert (inbox / "album.jpg" / "inside.jpg").read_bytes() == _unique_jpeg(7)
    (inbox / "pipe.jpg").unlink()
    (inbox / "album.jpg" / "inside.jpg").unlink()
    (inbox / "album.jpg").rmdir()
    for name, needle in BAD_INPUTS.items():
        report("bad-input", input=name, outcome="failed")
        sidecar = json.loads((setup.failed / f"{name}.error.json").read_text())
        assert needle in sidecar["reason"], f"{name}: {sidecar['reason']}"
    for name in GOOD_INPUTS + ["noise.png", "swap.jpg"]:
        report("bad-input", input=name, outcome="delivered")
    for name in ("pipe.jpg (FIFO)", "album.jpg/ (directory)", "gone.jpg (deleted before the claim)"):
        report("bad-input", input=name, outcome="ignored")
    trial.check()
    uploaded = {record.image_sha256 for record in fake.records if record.image_sha256}
    assert sha256_bytes(replaced_first) not in uploaded and sha256_bytes(deleted) not in uploaded
    # The >30 MB PNG went up converted to a JPEG under the API's 30 MB limit: nothing refused.
    assert fake.calls(status=400) == []
    (big_job,) = [job for job in setup.ledger_jobs().values() if job["source"] == "noise.png"]
    assert big_job["upload_mime"] == "image/jpeg" and big_job["state"] == "archived"
    with Image.open(setup.outbox / "rotated.jpg") as result:
        assert result.size == (80, 160)  # upright
    assert sorted(files(setup.path("outbox", 1))) == ["noise.jpg"]
    with Image.open(setup.path("outbox", 1) / "noise.jpg") as result:
        assert result.size == (400, 400)


def test_claim_refuses_a_file_deleted_or_replaced_after_it_settled(tmp_path: Path) -> None:
    """If a file is replaced (or deleted) between the watcher's last look and the claim, the
    claim refuses it and leaves the new file in the inbox, untouched, for the next look."""
    from folderd.claim import ClaimRefused, claim

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    target = inbox / "x.jpg"
    target.write_bytes(_unique_jpeg(1))
    info = os.lstat(target)
    signature = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
    (tmp_path / "new").write_bytes(_unique_jpeg(2))
    os.replace(tmp_path / "new", target)
    with pytest.raises(ClaimRefused, match="changed since it settled"):
        claim(inbox, "x.jpg", signature, "d1", "f")
    assert target.read_bytes() == _unique_jpeg(2)
    target.unlink()
    with pytest.raises(ClaimRefused, match="gone"):
        claim(inbox, "x.jpg", signature, "d1", "f")
    assert [path for path in (inbox / ".folderd").rglob("*") if path.is_file()] == []
    report("bad-input", input="replaced between detection and claim", outcome="ignored")
    report("bad-input", input="deleted between detection and claim", outcome="ignored")


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_decompression_bomb_is_refused_without_allocating_its_pixels(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If PNGs declare 30000x30000 (4 KB) or 12000x12000 with a whole zlib stream (400 KB that
    inflate to 432 MB), they fail as decompression bombs and the daemon's peak RSS stays small:
    neither the watcher's completeness check nor the probe decodes them."""
    fake.rpm = 1_000_000
    setup = Setup(tmp_path, backend="clipdrop", base_url=fake.base_url).with_key()
    setup.inbox.mkdir(parents=True)
    bombs = {"tiny-bomb.png": bomb_png(30000, 30000, rows=50), "whole-bomb.png": bomb_png(12000, 12000)}
    assert len(bombs["whole-bomb.png"]) < 4 * 1024 * 1024  # "small": the watcher used to decode such files fully
    trial = Trial(setup, fake, {sha256_bytes(data): Original(0, name, sha256_bytes(data), expect="failed") for name, data in bombs.items()})
    daemon = trial.start()
    try:
        daemon.wait_for(lambda: (setup.state / "status.json").exists(), what="the daemon started")
        baseline = _vm_hwm_kib(daemon.process.pid)
        for name, data in bombs.items():
            (setup.inbox / name).write_bytes(data)
        daemon.wait_for(lambda: len(files(setup.failed)) == 4, what="both bombs failed")
        peak = _vm_hwm_kib(daemon.process.pid)
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    for name in bombs:
        report("bad-input", input=name, outcome="failed")
        reason = json.loads((setup.failed / f"{name}.error.json").read_text())["reason"]
        assert "decompression bomb" in reason, reason
    assert peak - baseline < 100 * 1024, f"peak RSS grew by {(peak - baseline) // 1024} MiB (baseline {baseline // 1024} MiB)"
    assert fake.records == []
    trial.check()
