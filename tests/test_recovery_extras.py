"""Start-up tidying and names at the filesystem's limits."""

from __future__ import annotations

import json
import os

from tests.harness import Setup, files, make_image


def test_stale_temp_files_are_removed_at_start_and_user_files_kept(local_setup: Setup) -> None:
    """Hidden .folderd- temp files a crash left in outbox, done and failed are removed at the next start; other files stay."""
    for directory in (local_setup.outbox, local_setup.done, local_setup.failed):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".folderd-0123abcd.part").write_bytes(b"half a result")
        (directory / ".folderd-e-1a2b3c4d.tmp").write_bytes(b"{")
        (directory / "keep me.jpg").write_bytes(b"a user's file")
    result = local_setup.once()
    assert result.returncode == 0, result.stderr
    for directory in (local_setup.outbox, local_setup.done, local_setup.failed):
        assert sorted(os.listdir(directory)) == ["keep me.jpg"]
        assert (directory / "keep me.jpg").read_bytes() == b"a user's file"


def test_a_failed_file_with_a_name_at_the_limit_gets_its_sidecar(local_setup: Setup) -> None:
    """A failing file whose name is 250 bytes still lands in failed/ with NAME.error.json (the stem is shortened to fit)."""
    name = "é" * 123 + ".jpg"  # 246 + 4 bytes: the sidecar's name would pass 255 bytes
    assert len(os.fsencode(name)) == 250
    local_setup.inbox.mkdir(parents=True, exist_ok=True)
    (local_setup.inbox / name).write_text("not an image at all, just some text")
    result = local_setup.once()
    assert result.returncode == 1, result.stderr
    failed = files(local_setup.failed)
    assert len(failed) == 2
    original = next(item for item in failed if not item.endswith(".error.json"))
    assert (local_setup.failed / original).read_text() == "not an image at all, just some text"
    report = json.loads((local_setup.failed / (original + ".error.json")).read_text())
    assert report["file"] == name and "not an image" in report["reason"]
    assert all(len(os.fsencode(item)) <= 255 for item in failed)


def test_a_long_name_is_delivered_with_a_name_that_fits(local_setup: Setup) -> None:
    """A 250-byte file name is upscaled and both the result and the archived original keep a name within 255 bytes."""
    name = "é" * 123 + ".jpg"
    make_image(local_setup.inbox / name)
    result = local_setup.once()
    assert result.returncode == 0, result.stderr
    assert files(local_setup.outbox) == [name] and files(local_setup.done) == [name]
