"""End to end, real folders and the real `folderd` process: what gets taken, when, where it goes, and what never is touched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from folderd import status as status_module
from folderd.ledger import read_only
from tests.fake_clipdrop import FakeClipdrop
from tests.fsprobe import TouchWatch
from tests.harness import ROOT, DaemonProcess, Setup, files, make_image

# --------------------------------------------------------------------------- helpers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def noise_jpeg(size: tuple[int, int] = (320, 240), seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG whose bytes are unique to `seed` (random pixels), so every input has its own hash."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decodes(path: Path) -> tuple[int, int]:
    """The size of the image at `path`, after decoding every pixel (fails on a truncated file)."""
    with Image.open(path) as image:
        image.load()
        return image.size


def started(daemon: DaemonProcess) -> DaemonProcess:
    daemon.wait_for(lambda: "folderd started" in daemon.log_text(), timeout=15, what="folderd started")
    return daemon


def jobs(setup: Setup) -> list[dict[str, Any]]:
    return list(read_only(setup.state).jobs.values())


def all_files(directory: Path) -> list[Path]:
    """Every file under `directory`, hidden ones included."""
    if not directory.exists():
        return []
    return sorted(path for path in directory.rglob("*") if path.is_file() or path.is_symlink() or path.is_fifo())


def processed(setup: Setup, names: list[str], *, index: int = 0) -> bool:
    """True once every name is delivered to the outbox and archived in done."""
    return files(setup.path("outbox", index)) == sorted(names) and files(setup.path("done", index)) == sorted(names)


def sentinel(setup: Setup, daemon: DaemonProcess, name: str = "sentinel.jpg", *, index: int = 0) -> None:
    """Drop a normal image and wait until it is through: proof the daemon scanned and acted since."""
    make_image(setup.path("inbox", index) / name)
    daemon.wait_for(lambda: name in files(setup.path("done", index)), what=f"{name} to be processed")


def sidecar(failed: Path, name: str) -> dict[str, Any]:
    return json.loads((failed / f"{name}.error.json").read_text())


# --------------------------------------------------------------------------- complete files only


def test_slow_writer_is_taken_once_only_when_the_whole_jpeg_is_there(local_setup: Setup) -> None:
    """A JPEG appended in chunks over ~1.5 s (pauses longer than settle) is claimed once, after its end marker, and decodes fully."""
    daemon = started(local_setup.start())
    data = noise_jpeg((480, 360), seed=1)
    target = local_setup.inbox / "scan.jpg"
    chunks = 8
    step = len(data) // chunks
    finished: list[float] = []

    def writer() -> None:
        with open(target, "ab") as handle:
            for number in range(chunks):
                end = len(data) if number == chunks - 1 else (number + 1) * step
                handle.write(data[number * step : end])
                handle.flush()
                if number < chunks - 1:
                    time.sleep(0.22)  # longer than settle (150 ms): the file settles between chunks
        finished.append(time.time())

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    daemon.wait_for(lambda: processed(local_setup, ["scan.jpg"]), what="scan.jpg delivered")
    time.sleep(0.4)  # room for a second (wrong) take
    assert daemon.stop() == 0
    (job,) = jobs(local_setup)
    assert job["state"] == "archived" and job["source"] == "scan.jpg"
    assert job["created"] >= finished[0], "claimed before the writer finished"
    assert job["sha256"] == hashlib.sha256(data).hexdigest()
    assert sha(local_setup.done / "scan.jpg") == hashlib.sha256(data).hexdigest()
    assert decodes(local_setup.outbox / "scan.jpg") == (960, 720)
    assert files(local_setup.outbox) == ["scan.jpg"] and files(local_setup.failed) == []
    # The test really exercised the wait: the file settled mid-write and was held for its end marker.
    waits = [
        event
        for event in daemon.events()
        if event.get("event") == "waiting for the file to be complete" and event.get("file") == "scan.jpg"
    ]
    assert waits and "end marker" in waits[0]["reason"]


def test_file_renamed_into_the_inbox_is_taken(local_setup: Setup, tmp_path: Path) -> None:
    """A file written elsewhere on the same filesystem and renamed into the inbox (also from a .part name) is delivered."""
    daemon = started(local_setup.start())
    staging = tmp_path / "staging"
    staging.mkdir()
    moved = staging / "Café ü~1.jpg"
    moved.write_bytes(noise_jpeg(seed=2))
    os.utime(moved, (1_000_000_000, 1_000_000_000))  # an old mtime must not matter
    os.rename(moved, local_setup.inbox / moved.name)
    partial = local_setup.inbox / "download.jpg.part"
    partial.write_bytes(noise_jpeg(seed=3))
    time.sleep(0.4)
    assert partial.exists(), "a .part file was taken while still being downloaded"
    os.rename(partial, local_setup.inbox / "download.jpg")
    daemon.wait_for(lambda: processed(local_setup, ["Café ü~1.jpg", "download.jpg"]), what="both renamed files delivered")
    assert daemon.stop() == 0
    assert sha(local_setup.done / moved.name) == hashlib.sha256(noise_jpeg(seed=2)).hexdigest()
    assert sha(local_setup.done / "download.jpg") == hashlib.sha256(noise_jpeg(seed=3)).hexdigest()
    assert decodes(local_setup.outbox / moved.name) == (640, 480)


JUNK_FILES = [
    ".DS_Store",
    "._photo.jpg",
    "~$report.jpg",
    "photo.tmp",
    "photo.jpg.tmp",
    "photo.part",
    "photo.jpg.part",
    "photo.jpg.crdownload",
    "Thumbs.db",
    "thumbs.db",
    "desktop.ini",
    ".syncthing.x.jpg",
    ".syncthing.x.jpg.tmp",
    "photo.jpg.download",
    "photo.jpg.filepart",
    "photo.jpg.!sync",
    "photo.jpg.partial",
    "PHOTO.JPG.PART",
    "notes.txt",
    "photo.JPG.xmp",
    "archive.zip",
    "preview_1.jpg",
    "raw.cr2",
    "photo.jpg~",
]
JUNK_DIRS = ["@eaDir", "#recycle", ".stfolder", "#snapshot", ".git", "$RECYCLE.BIN", "System Volume Information", "lost+found"]


def test_junk_and_non_images_are_never_touched(local_setup: Setup) -> None:
    """OS/NAS/sync-tool junk, partial downloads, non-image extensions and ignored folders stay exactly as they are."""
    local_setup.folder()["recursive"] = True
    local_setup.folder()["ignore"] = ["preview_*"]
    local_setup.write()
    inbox = local_setup.inbox
    inbox.mkdir(parents=True)
    jpeg = noise_jpeg(seed=4)
    planted: dict[Path, tuple[str, int]] = {}
    for name in JUNK_FILES:
        path = inbox / name
        path.write_bytes(jpeg)
    for directory in JUNK_DIRS:
        (inbox / directory).mkdir()
        (inbox / directory / "inside.jpg").write_bytes(jpeg)
        (inbox / directory / "SYNOPHOTO_THUMB_M.jpg").write_bytes(jpeg)
    for path in all_files(inbox):
        planted[path] = (sha(path), path.stat().st_mtime_ns)
    daemon = started(local_setup.start())
    sentinel(local_setup, daemon)
    time.sleep(0.5)  # settle (150 ms) several times over, and a rescan of the whole tree
    assert daemon.stop() == 0
    for path, (digest, mtime) in planted.items():
        assert path.exists(), f"{path.name} was moved"
        assert (sha(path), path.stat().st_mtime_ns) == (digest, mtime), f"{path.name} was changed"
    assert files(local_setup.outbox) == ["sentinel.jpg"]
    assert files(local_setup.done) == ["sentinel.jpg"]
    assert all_files(local_setup.failed) == []
    assert [job["source"] for job in jobs(local_setup)] == ["sentinel.jpg"]


def test_name_clash_in_outbox_and_done_never_overwrites(local_setup: Setup) -> None:
    """With photo.jpg already in outbox and done, results go to photo-1.jpg, then photo-2.jpg; the old files stay intact."""
    local_setup.outbox.mkdir(parents=True)
    local_setup.done.mkdir(parents=True)
    (local_setup.outbox / "photo.jpg").write_bytes(b"an earlier result, not to be overwritten")
    (local_setup.done / "photo.jpg").write_bytes(b"an earlier original")
    daemon = started(local_setup.start())
    first, second = noise_jpeg(seed=5), noise_jpeg(seed=6)
    (local_setup.inbox / "photo.jpg").write_bytes(first)
    daemon.wait_for(lambda: "photo-1.jpg" in files(local_setup.done), what="first photo.jpg")
    (local_setup.inbox / "photo.jpg").write_bytes(second)
    daemon.wait_for(lambda: "photo-2.jpg" in files(local_setup.done), what="second photo.jpg")
    assert daemon.stop() == 0
    assert (local_setup.outbox / "photo.jpg").read_bytes() == b"an earlier result, not to be overwritten"
    assert (local_setup.done / "photo.jpg").read_bytes() == b"an earlier original"
    assert files(local_setup.outbox) == ["photo-1.jpg", "photo-2.jpg", "photo.jpg"]
    assert sha(local_setup.done / "photo-1.jpg") == hashlib.sha256(first).hexdigest()
    assert sha(local_setup.done / "photo-2.jpg") == hashlib.sha256(second).hexdigest()
    assert decodes(local_setup.outbox / "photo-1.jpg") == decodes(local_setup.outbox / "photo-2.jpg") == (640, 480)
    outputs = sorted(Path(job["output"]).name for job in jobs(local_setup))
    assert outputs == ["photo-1.jpg", "photo-2.jpg"]


def test_recursive_mirrors_sub_folders_and_non_recursive_ignores_them(tmp_path: Path) -> None:
    """recursive: true mirrors sub/dir/x.jpg into outbox/sub/dir/x.jpg and done/sub/dir/x.jpg; a flat folder leaves sub-folders alone."""
    setup = Setup(tmp_path, backend="local", folders=2)
    setup.folder(1)["recursive"] = True
    setup.write()
    for index in (0, 1):
        make_image(setup.path("inbox", index) / "top.jpg")
        make_image(setup.path("inbox", index) / "sub" / "early.jpg")
    daemon = started(setup.start())
    # A directory tree created while running (new inotify watches, or the rescan, must find it).
    for index in (0, 1):
        make_image(setup.path("inbox", index) / "sub" / "dir" / "x.jpg", (40, 30))
    daemon.wait_for(lambda: processed(setup, ["sub/dir/x.jpg", "sub/early.jpg", "top.jpg"], index=1), what="recursive folder")
    daemon.wait_for(lambda: processed(setup, ["top.jpg"], index=0), what="top.jpg in the flat folder")
    time.sleep(0.4)
    assert daemon.stop() == 0
    assert decodes(setup.path("outbox", 1) / "sub" / "dir" / "x.jpg") == (80, 60)
    assert files(setup.path("inbox", 1)) == []
    assert files(setup.path("inbox", 0)) == ["sub/dir/x.jpg", "sub/early.jpg"]
    assert files(setup.path("outbox", 0)) == ["top.jpg"]
    sources = sorted(job["source"] for job in jobs(setup) if job["folder"] == "f1")
    assert sources == ["sub/dir/x.jpg", "sub/early.jpg", "top.jpg"]


# --------------------------------------------------------------------------- broken inputs


def test_truncated_jpeg_fails_after_incomplete_timeout(local_setup: Setup) -> None:
    """A JPEG cut short that never completes waits out incomplete_timeout, then goes to failed/ with a sidecar saying it is truncated."""
    local_setup.folder()["incomplete_timeout"] = "1500ms"
    local_setup.write()
    daemon = started(local_setup.start())
    data = noise_jpeg(seed=7)
    truncated = data[: len(data) * 2 // 3]
    dropped = time.monotonic()
    (local_setup.inbox / "cut.jpg").write_bytes(truncated)
    time.sleep(0.5)
    assert files(local_setup.inbox) == ["cut.jpg"], "failed before incomplete_timeout"
    daemon.wait_for(lambda: "cut.jpg" in files(local_setup.failed), timeout=10, what="cut.jpg in failed")
    assert time.monotonic() - dropped >= 1.5
    assert daemon.stop() == 0
    report = sidecar(local_setup.failed, "cut.jpg")
    assert "truncated" in report["reason"] and "never became a whole image" in report["reason"]
    assert report["file"] == "cut.jpg" and report["folder"] == "f0" and report["sha256"] == hashlib.sha256(truncated).hexdigest()
    assert (local_setup.failed / "cut.jpg").read_bytes() == truncated
    assert files(local_setup.outbox) == [] and files(local_setup.inbox) == []
    (job,) = jobs(local_setup)
    assert job["state"] == "failed" and "truncated" in job["error"]["reason"]


def test_text_file_named_jpg_fails_with_a_reason(local_setup: Setup) -> None:
    """A text file renamed .jpg is moved to failed/ with a sidecar saying it is not an image; nothing reaches the outbox."""
    local_setup.failed.mkdir(parents=True)
    (local_setup.failed / "clash.jpg").write_bytes(b"an earlier failure")
    daemon = started(local_setup.start())
    text = b"Dear all,\nthis is not a photo at all, just some notes.\n" * 5
    (local_setup.inbox / "notes.jpg").write_bytes(text)
    (local_setup.inbox / "clash.jpg").write_bytes(text + b"2")
    daemon.wait_for(lambda: {"notes.jpg", "clash-1.jpg"} <= set(files(local_setup.failed)), what="notes.jpg in failed")
    assert daemon.stop() == 0
    assert (local_setup.failed / "notes.jpg").read_bytes() == text
    report = sidecar(local_setup.failed, "notes.jpg")
    assert "not an image" in report["reason"] and report["stage"] == "claimed"
    # A name already in failed/ is never overwritten: the file and its sidecar get the next free name together.
    assert (local_setup.failed / "clash.jpg").read_bytes() == b"an earlier failure"
    assert (local_setup.failed / "clash-1.jpg").read_bytes() == text + b"2"
    assert sidecar(local_setup.failed, "clash-1.jpg")["file"] == "clash.jpg"
    assert files(local_setup.failed) == ["clash-1.jpg", "clash-1.jpg.error.json", "clash.jpg", "notes.jpg", "notes.jpg.error.json"]
    assert files(local_setup.outbox) == [] and files(local_setup.done) == []


def test_zero_byte_file_waits_then_fails_and_a_filled_placeholder_is_taken(local_setup: Setup) -> None:
    """An empty x.jpg is left alone (a copy may be about to fill it); filled in time it is delivered, left empty it fails as empty."""
    local_setup.folder()["incomplete_timeout"] = "1500ms"
    local_setup.write()
    daemon = started(local_setup.start())
    (local_setup.inbox / "empty.jpg").touch()
    placeholder = local_setup.inbox / "placeholder.jpg"
    placeholder.touch()
    time.sleep(0.6)
    assert sorted(files(local_setup.inbox)) == ["empty.jpg", "placeholder.jpg"]
    placeholder.write_bytes(noise_jpeg(seed=8))
    daemon.wait_for(lambda: processed(local_setup, ["placeholder.jpg"]), what="placeholder.jpg delivered")
    daemon.wait_for(lambda: "empty.jpg" in files(local_setup.failed), timeout=10, what="empty.jpg in failed")
    assert daemon.stop() == 0
    assert "empty" in sidecar(local_setup.failed, "empty.jpg")["reason"]
    assert (local_setup.failed / "empty.jpg").stat().st_size == 0
    assert files(local_setup.outbox) == ["placeholder.jpg"]


def test_crash_between_sidecar_and_move_into_failed_is_finished_on_restart(local_setup: Setup) -> None:
    """A crash after NAME.error.json was written but before the file moved: the restart moves it next to that sidecar, no -1 copy."""
    from folderd.ledger import Ledger

    text = b"not an image\n" * 3
    ledger = Ledger(local_setup.state)
    ledger.acquire_lock()
    ledger.load()
    ledger.open_for_writing()
    work = local_setup.inbox / ".folderd" / ledger.meta["daemon_id"] / "6b0000000000abcd~bad.jpg"
    work.parent.mkdir(parents=True)
    work.write_bytes(text)
    error = {"reason": "not an image folderd can read", "stage": "claimed", "status": None, "message": "not an image"}
    job = {
        "id": "6b0000000000abcd",
        "folder": "f0",
        "source": "bad.jpg",
        "work": str(work),
        "state": "failing",
        "error": error,
        "size": len(text),
        "sha256": hashlib.sha256(text).hexdigest(),
        "created": time.time(),
        "updated": time.time(),
        "tries": 0,
    }
    ledger.put(job)
    ledger.close()
    local_setup.failed.mkdir(parents=True)
    (local_setup.failed / "bad.jpg.error.json").write_text(json.dumps({"file": "bad.jpg", "job_id": job["id"], "reason": error["reason"]}))
    result = local_setup.once()
    assert result.returncode == 1, result.stderr[-2000:]
    assert files(local_setup.failed) == ["bad.jpg", "bad.jpg.error.json"]
    assert (local_setup.failed / "bad.jpg").read_bytes() == text
    assert sidecar(local_setup.failed, "bad.jpg")["job_id"] == job["id"]
    assert all_files(local_setup.inbox) == []
    (done,) = jobs(local_setup)
    assert done["state"] == "failed" and done["failed_to"] == str(local_setup.failed / "bad.jpg")


# --------------------------------------------------------------------------- files folderd must not take


def test_planted_symlink_is_never_read_or_moved(local_setup: Setup, tmp_path: Path) -> None:
    """Symlinks planted in the inbox (to a secret file, a folder, nowhere, the inbox itself) are never followed, opened or moved."""
    local_setup.folder()["recursive"] = True
    local_setup.write()
    secrets_dir = tmp_path / "secrets"
    secret = secrets_dir / "secret.jpg"
    secret_bytes = noise_jpeg(seed=9)
    secrets_dir.mkdir()
    secret.write_bytes(secret_bytes)
    local_setup.inbox.mkdir(parents=True)
    (local_setup.inbox / "innocent.jpg").symlink_to(secret)
    (local_setup.inbox / "folder").symlink_to(secrets_dir, target_is_directory=True)
    (local_setup.inbox / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (local_setup.inbox / "loop").symlink_to(local_setup.inbox, target_is_directory=True)
    with TouchWatch(secret) as watch:
        daemon = started(local_setup.start())
        sentinel(local_setup, daemon)
        time.sleep(0.4)
        assert daemon.stop() == 0
        assert watch.events() == [], f"folderd touched the secret: {watch.events()}"
    assert secret.read_bytes() == secret_bytes
    for name in ("innocent.jpg", "folder", "dangling.jpg", "loop"):
        assert (local_setup.inbox / name).is_symlink(), name
    assert files(local_setup.outbox) == ["sentinel.jpg"] and files(local_setup.done) == ["sentinel.jpg"]
    assert all_files(local_setup.failed) == []
    for path in all_files(local_setup.outbox) + all_files(local_setup.done) + all_files(local_setup.state):
        assert secret_bytes[100:200] not in path.read_bytes()
    assert [job["source"] for job in jobs(local_setup)] == ["sentinel.jpg"]
    assert any(event.get("event") == "skipping file" and event.get("file") == "innocent.jpg" for event in daemon.events())


def test_hardlinked_file_is_skipped(local_setup: Setup, tmp_path: Path) -> None:
    """A file in the inbox with a second hard link elsewhere is never opened or moved; once the other link is gone it is taken."""
    outside = tmp_path / "private.jpg"
    data = noise_jpeg(seed=10)
    outside.write_bytes(data)
    local_setup.inbox.mkdir(parents=True)
    os.link(outside, local_setup.inbox / "linked.jpg")
    with TouchWatch(outside) as watch:
        daemon = started(local_setup.start())
        sentinel(local_setup, daemon)
        time.sleep(0.4)
        assert watch.events() == [], f"folderd touched the hard-linked file: {watch.events()}"
    assert outside.read_bytes() == data and outside.stat().st_nlink == 2
    assert (local_setup.inbox / "linked.jpg").exists()
    assert files(local_setup.outbox) == ["sentinel.jpg"] and all_files(local_setup.failed) == []
    skipped = [event for event in daemon.events() if event.get("event") == "skipping file" and event.get("file") == "linked.jpg"]
    assert skipped and "hard links" in skipped[0]["reason"]
    # With the other link removed it is an ordinary file of the inbox (found by the periodic rescan: no event names it).
    outside.unlink()
    daemon.wait_for(lambda: "linked.jpg" in files(local_setup.done), what="linked.jpg once it has one link")
    assert daemon.stop() == 0
    assert sha(local_setup.done / "linked.jpg") == hashlib.sha256(data).hexdigest()


def test_fifo_named_jpg_does_not_hang_the_daemon(local_setup: Setup) -> None:
    """A FIFO named x.jpg is skipped without blocking: later files are still processed and the daemon stops promptly."""
    local_setup.inbox.mkdir(parents=True)
    os.mkfifo(local_setup.inbox / "x.jpg")
    daemon = started(local_setup.start())
    os.mkfifo(local_setup.inbox / "later.jpg")  # one made while running (an inotify event, not only a scan)
    sentinel(local_setup, daemon)
    sentinel(local_setup, daemon, "second.jpg")
    begin = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - begin < 5
    assert (local_setup.inbox / "x.jpg").is_fifo() and (local_setup.inbox / "later.jpg").is_fifo()
    assert files(local_setup.outbox) == ["second.jpg", "sentinel.jpg"]
    assert all_files(local_setup.failed) == []


def test_directory_named_jpg_is_ignored(local_setup: Setup) -> None:
    """A directory named x.jpg (with a file inside) in a non-recursive folder is left alone."""
    (local_setup.inbox / "x.jpg").mkdir(parents=True)
    make_image(local_setup.inbox / "x.jpg" / "inner.jpg")
    daemon = started(local_setup.start())
    sentinel(local_setup, daemon)
    time.sleep(0.3)
    assert daemon.stop() == 0
    assert (local_setup.inbox / "x.jpg").is_dir() and (local_setup.inbox / "x.jpg" / "inner.jpg").is_file()
    assert files(local_setup.outbox) == ["sentinel.jpg"] and all_files(local_setup.failed) == []


def test_non_utf8_file_name_is_skipped_without_crashing(local_setup: Setup) -> None:
    """A file whose name is not valid UTF-8 (a legacy-encoded NAS name) is skipped with a warning; the daemon keeps running."""
    local_setup.inbox.mkdir(parents=True)
    legacy = os.path.join(os.fsencode(local_setup.inbox), b"caf\xe9.jpg")
    with open(legacy, "wb") as handle:
        handle.write(noise_jpeg(seed=11))
    daemon = started(local_setup.start())
    sentinel(local_setup, daemon)
    with open(os.path.join(os.fsencode(local_setup.inbox), b"late\xff.jpg"), "wb") as handle:
        handle.write(noise_jpeg(seed=12))
    sentinel(local_setup, daemon, "second.jpg")
    assert daemon.process.poll() is None
    assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert sorted(os.listdir(os.fsencode(local_setup.inbox))) == [b".folderd", b"caf\xe9.jpg", b"late\xff.jpg"]
    assert files(local_setup.outbox) == ["second.jpg", "sentinel.jpg"]
    skipped = [event["file"] for event in daemon.events() if event.get("event") == "skipping file"]
    assert "caf\\xe9.jpg" in skipped and "late\\xff.jpg" in skipped


def test_long_file_names_are_taken(local_setup: Setup) -> None:
    """Names near the 255-byte limit (ASCII, and multi-byte UTF-8) are claimed and delivered under their full names."""
    ascii_name = "a" * 247 + ".jpg"  # 251 bytes
    cjk_name = "写真" * 41 + ".jpg"  # 82 characters, 250 bytes
    local_setup.inbox.mkdir(parents=True)
    (local_setup.inbox / ascii_name).write_bytes(noise_jpeg(seed=13))
    daemon = started(local_setup.start())
    (local_setup.inbox / cjk_name).write_bytes(noise_jpeg(seed=14))
    daemon.wait_for(lambda: processed(local_setup, [ascii_name, cjk_name]), what="long names delivered")
    assert daemon.stop() == 0
    assert sha(local_setup.done / cjk_name) == hashlib.sha256(noise_jpeg(seed=14)).hexdigest()
    assert all_files(local_setup.inbox) == []


def test_unwritable_failed_folder_is_retried_with_backoff_not_in_a_loop(local_setup: Setup) -> None:
    """When failed/ cannot be used, a failing job keeps its file and retries with backoff (no busy loop), then lands once it can."""
    daemon = started(local_setup.start())
    local_setup.failed.rmdir()
    local_setup.failed.write_text("a file where the failed folder should be")
    text = b"not an image, just words\n" * 4
    (local_setup.inbox / "bad.jpg").write_bytes(text)
    daemon.wait_for(lambda: any(job["state"] == "failing" for job in jobs(local_setup)), what="the job failing")
    time.sleep(1.5)
    attempts = [event for event in daemon.events() if event.get("event") == "step failed" and event.get("step") == "fail"]
    assert 1 <= len(attempts) <= 12, f"{len(attempts)} attempts in 1.5 s: a busy loop"
    assert daemon.process.poll() is None
    local_setup.failed.unlink()
    local_setup.failed.mkdir()
    daemon.wait_for(lambda: "bad.jpg" in files(local_setup.failed), timeout=15, what="bad.jpg in failed once it is a folder again")
    assert daemon.stop() == 0
    assert (local_setup.failed / "bad.jpg").read_bytes() == text
    assert "not an image" in sidecar(local_setup.failed, "bad.jpg")["reason"]
    assert all_files(local_setup.inbox) == []


# --------------------------------------------------------------------------- the process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_exits_0_promptly_on_signal(local_setup: Setup, sig: int) -> None:
    """`folderd run` exits 0 within a few seconds of SIGTERM or SIGINT, with work just dropped, and says it stopped."""
    daemon = started(local_setup.start())
    sentinel(local_setup, daemon)
    for number in range(5):
        (local_setup.inbox / f"late{number}.jpg").write_bytes(noise_jpeg(seed=20 + number))
    time.sleep(0.25)
    begin = time.monotonic()
    code = daemon.stop(sig, timeout=10)
    assert code == 0, daemon.log_text()[-2000:]
    assert time.monotonic() - begin < 5
    assert any(event.get("event") == "folderd stopped" and event.get("exit_code") == 0 for event in daemon.events())
    # A graceful stop mid-work loses and duplicates nothing: the next run finishes exactly what was left.
    result = local_setup.once()
    assert result.returncode == 0, result.stderr[-2000:]
    names = ["sentinel.jpg"] + [f"late{number}.jpg" for number in range(5)]
    assert files(local_setup.outbox) == sorted(names) and files(local_setup.done) == sorted(names)
    assert all_files(local_setup.inbox) == []
    for number in range(5):
        assert sha(local_setup.done / f"late{number}.jpg") == hashlib.sha256(noise_jpeg(seed=20 + number)).hexdigest()


def test_second_daemon_on_the_same_state_dir_refuses_to_start(local_setup: Setup) -> None:
    """A second `folderd run` on a state dir in use exits non-zero at once, naming the state dir; the first keeps working."""
    first = started(local_setup.start())
    result = local_setup.cli("run", timeout=20)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert str(local_setup.state) in output and "another folderd" in output, output
    assert f"pid {first.process.pid}" in output
    assert first.process.poll() is None
    once = local_setup.once(timeout=20)  # `once` must not take over a running daemon's state either
    assert once.returncode == 4 and str(local_setup.state) in once.stdout + once.stderr, once
    sentinel(local_setup, first)
    assert first.stop() == 0
    assert (local_setup.state / "lock").read_text().strip() == str(first.process.pid)


def test_kill_9_mid_batch_then_restart_delivers_every_file_exactly_once(local_setup: Setup, tmp_path: Path) -> None:
    """kill -9 at random moments during a batch of 30, then restart: each input ends exactly once in done and once in the outbox."""
    seed = int(os.environ.get("FOLDERD_TEST_SEED") or time.time() * 1000) % 100_000
    rng = random.Random(seed)
    note = f"(random seed {seed})"
    staging = tmp_path / "staging"
    staging.mkdir()
    inputs: dict[str, str] = {}
    for number in range(30):
        data = noise_jpeg((480, 360), seed=1000 + number)
        (staging / f"img{number:02d}.jpg").write_bytes(data)
        inputs[f"img{number:02d}.jpg"] = hashlib.sha256(data).hexdigest()
    local_setup.inbox.mkdir(parents=True)
    daemon = started(local_setup.start())
    for name in inputs:
        os.rename(staging / name, local_setup.inbox / name)

    def archived() -> int:
        return sum(1 for job in jobs(local_setup) if job["state"] == "archived")

    # Kill at progress points drawn at random (after the first claim, then a few files further
    # each time), with a random jitter so the kill lands in any step: claim, upscale, deliver, archive.
    goal = 0
    for kill in range(3):
        goal = min(goal + rng.randint(0 if kill == 0 else 3, 9), 27)
        daemon.wait_for(
            lambda goal=goal: jobs(local_setup) and archived() >= goal, timeout=20, what=f"progress before kill {kill + 1} {note}"
        )
        time.sleep(rng.uniform(0.0, 0.06))
        daemon.kill()
        note += f" kill {kill + 1} at {archived()} archived / {len(jobs(local_setup))} claimed;"
        if kill == 0:  # `status` knows a killed daemon is gone (its lock is free, its pid dead)
            assert status_json(local_setup)["daemon"]["running"] is False, note
        daemon = started(local_setup.start())
    daemon.wait_for(lambda: processed(local_setup, list(inputs)), timeout=40, what=f"every file delivered {note}")
    time.sleep(0.3)
    assert daemon.stop() == 0, note
    # Exactly once: one result per input in the outbox, each original once in done, with its bytes.
    assert files(local_setup.outbox) == sorted(inputs), note
    assert {name: sha(local_setup.done / name) for name in files(local_setup.done)} == inputs, note
    for name in inputs:
        assert decodes(local_setup.outbox / name) == (960, 720), f"{name} {note}"
    # Nothing left behind: no file in the inbox or its work area, no temp or empty file anywhere.
    assert all_files(local_setup.inbox) == [], f"{all_files(local_setup.inbox)} {note}"
    for directory in (local_setup.outbox, local_setup.done, local_setup.failed):
        for path in all_files(directory):
            assert not path.name.startswith("."), f"leftover temp {path} {note}"
            assert path.stat().st_size > 0, f"empty {path} {note}"
    assert all_files(local_setup.failed) == [], note
    finished = jobs(local_setup)
    assert sorted(job["source"] for job in finished if job["state"] == "archived") == sorted(inputs), note
    assert all(job["state"] == "archived" for job in finished), note


# --------------------------------------------------------------------------- status and once


def documented_keys() -> dict[str, set[str]]:
    """The JSON keys of `status --json` as documented in folderd/status.py's docstring (the stable interface)."""
    doc = status_module.__doc__ or ""

    def keys(pattern: str) -> set[str]:
        match = re.search(pattern, doc, re.DOTALL)
        assert match, f"status.py's docstring no longer documents {pattern}"
        return set(re.findall(r'"(\w+)"', match.group(1)))

    return {
        "daemon": keys(r'"daemon":\s*\{([^}]*)\}'),
        "credits": keys(r'"credits":\s*\{([^}]*)\}'),
        "folder": keys(r"NAME:\s*\{(.*?)\["),
        "job": keys(r'"jobs":\s*\[\s*\{([^}]*)\}'),
    }


def status_json(setup: Setup) -> dict[str, Any]:
    result = setup.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    documented = documented_keys()
    assert set(document) == {"daemon", "credits", "folders"}
    assert set(document["daemon"]) == documented["daemon"]
    assert set(document["credits"]) == documented["credits"]
    for folder in document["folders"].values():
        assert set(folder) == documented["folder"]
        for job in folder["jobs"]:
            assert set(job) == documented["job"]
    return document


def test_status_while_running_and_after(tmp_path: Path, fake: FakeClipdrop) -> None:
    """`status` and `status --json` show counts per folder and pending jobs with state and age, live and after the daemon stops."""
    fake.async_duration = 120.0  # an async task that stays queued while we look
    setup = Setup(tmp_path, backend="clipdrop", folders=2, base_url=fake.base_url).with_key()
    setup.folder(0)["strategy"] = "detailed"
    setup.folder(1)["backend"] = "local"
    setup.write()
    before = status_json(setup)  # before any run: no state yet, still a valid answer
    assert before["daemon"]["running"] is False and before["folders"]["f0"]["delivered"] == 0
    daemon = started(setup.start())
    make_image(setup.inbox / "slow.png", (100, 100))
    make_image(setup.path("inbox", 1) / "a.jpg")
    make_image(setup.path("inbox", 1) / "b.jpg")
    (setup.path("inbox", 1) / "bad.jpg").write_bytes(b"not an image at all, just text\n" * 4)
    daemon.wait_for(lambda: any(job["state"] == "submitted" for job in jobs(setup)), what="the async job submitted")
    daemon.wait_for(lambda: len(files(setup.path("done", 1))) == 2 and files(setup.path("failed", 1)), what="local folder done")
    live = daemon.wait_for(
        lambda: (
            (doc := status_json(setup))["daemon"]["running"]
            and doc["folders"]["f1"]["delivered"] == 2
            and doc["folders"]["f1"]["last_scan"]
            and doc
        ),
        what="status to show the running daemon",
    )
    assert live["daemon"]["pid"] == daemon.process.pid and live["daemon"]["updated"]
    f0, f1 = live["folders"]["f0"], live["folders"]["f1"]
    assert (f0["queued"], f0["in_flight"], f0["delivered"], f0["failed"]) == (0, 1, 0, 0)
    assert (f1["queued"], f1["in_flight"], f1["delivered"], f1["failed"]) == (0, 0, 2, 1)
    assert f1["watch"] in ("native", "poll") and f1["watch_reason"]
    (pending,) = f0["jobs"]
    assert pending["file"] == "slow.png" and pending["state"] == "submitted" and pending["task_id"]
    assert 0 <= pending["age_seconds"] < 30 and pending["error"] is None
    assert f0["oldest_pending"] and f1["jobs"] == []
    text = setup.cli("status")
    assert text.returncode == 0, text.stderr
    assert f"daemon: running (pid {daemon.process.pid})" in text.stdout
    assert "f0: 0 queued, 1 in flight, 0 delivered, 0 failed" in text.stdout
    assert "f1: 0 queued, 0 in flight, 2 delivered, 1 failed" in text.stdout
    assert f"submitted  slow.png task {pending['task_id']}" in text.stdout and f"job {pending['id']}" in text.stdout
    assert daemon.stop() == 0
    time.sleep(0.2)
    after = status_json(setup)
    assert after["daemon"] == {"running": False, "pid": None, "updated": None, "paused": None, "line": None}
    assert (after["folders"]["f1"]["delivered"], after["folders"]["f1"]["failed"]) == (2, 1)
    (still,) = after["folders"]["f0"]["jobs"]
    assert still["id"] == pending["id"] and still["state"] == "submitted" and still["age_seconds"] >= pending["age_seconds"]
    assert after["folders"]["f0"]["watch"] is None  # watcher facts are only shown while a daemon runs
    text = setup.cli("status")
    assert "daemon: not running" in text.stdout and "f0: 0 queued, 1 in flight" in text.stdout
    # The job resumes from the ledger on the next start and finishes.
    fake.complete_now()
    result = setup.once()
    assert result.returncode == 0, result.stderr[-2000:]
    final = status_json(setup)
    assert final["folders"]["f0"]["delivered"] == 1 and final["folders"]["f0"]["jobs"] == []
    assert final["credits"]["spent"] != "0"


def test_once_exit_codes(tmp_path: Path) -> None:
    """`folderd once` exits 0 when every file is delivered, 1 when a file failed, 2 on a configuration error."""
    setup = Setup(tmp_path, backend="local")
    empty = setup.once(timeout=30)
    assert empty.returncode == 0, empty.stderr
    make_image(setup.inbox / "good.jpg")
    result = setup.once()
    assert result.returncode == 0, result.stderr
    assert files(setup.outbox) == ["good.jpg"]
    make_image(setup.inbox / "good2.jpg")
    (setup.inbox / "bad.jpg").write_bytes(b"plain text, not an image\n" * 3)
    result = setup.once()
    assert result.returncode == 1, result.stderr
    assert files(setup.outbox) == ["good.jpg", "good2.jpg"] and files(setup.failed) == ["bad.jpg", "bad.jpg.error.json"]
    again = setup.once()  # the failure was in the previous run: nothing failed this time
    assert again.returncode == 0, again.stderr
    setup.folder()["target"] = {"scale": 0}
    setup.write()
    result = setup.once()
    assert result.returncode == 2
    assert "folders[0].target.scale: must be > 0" in result.stderr


def test_once_waits_for_a_file_still_being_written(local_setup: Setup) -> None:
    """`folderd once` with a file still being written waits for it to complete rather than exiting early or failing it."""
    data = noise_jpeg(seed=30)
    target = local_setup.inbox / "late.jpg"
    target.parent.mkdir(parents=True)
    target.write_bytes(data[:1000])

    def finish() -> None:
        time.sleep(0.8)
        with open(target, "ab") as handle:
            handle.write(data[1000:])

    thread = threading.Thread(target=finish)
    thread.start()
    result = local_setup.once(timeout=30)
    thread.join()
    assert result.returncode == 0, result.stderr[-2000:]
    assert files(local_setup.outbox) == ["late.jpg"]
    assert sha(local_setup.done / "late.jpg") == hashlib.sha256(data).hexdigest()


def test_cli_without_config_is_a_usage_error(tmp_path: Path) -> None:
    """Every command with a missing config file exits 2 and says it cannot read it."""
    env = {key: value for key, value in os.environ.items() if key not in ("FOLDERD_CONFIG", "CLIPDROP_API_KEY")}
    for command in ("run", "once", "status", "check"):
        result = subprocess.run(
            [sys.executable, "-m", "folderd", command, "-c", str(tmp_path / "none.yaml")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == 2, (command, result)
        assert "cannot read" in result.stderr
