"""End to end: the real folderd process, real folders, the fake API over loopback."""

from __future__ import annotations

from PIL import Image

from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, Setup, files, make_image


def test_once_local_delivers_upscaled_image_and_archives_original(local_setup: Setup) -> None:
    """With the local backend, `once` upscales a dropped JPEG 2x into the outbox and moves the original to done."""
    make_image(local_setup.inbox / "photo one.jpg", (80, 60))
    result = local_setup.once()
    assert result.returncode == 0, result.stderr
    assert files(local_setup.outbox) == ["photo one.jpg"]
    with Image.open(local_setup.outbox / "photo one.jpg") as image:
        assert image.size == (160, 120)
        assert image.format == "JPEG"
    assert files(local_setup.done) == ["photo one.jpg"]
    assert files(local_setup.inbox) == []


def test_once_sync_api_delivers_and_records_credits(api_setup: Setup, fake: FakeClipdrop) -> None:
    """A smooth 2x of a small JPEG goes through the sync endpoint, is delivered, and the ledger holds the credits."""
    make_image(api_setup.inbox / "a.jpg", (100, 50))
    result = api_setup.once()
    assert result.returncode == 0, result.stderr
    assert files(api_setup.outbox) == ["a.jpg"]
    with Image.open(api_setup.outbox / "a.jpg") as image:
        assert image.size == (200, 100)
    assert [record.endpoint for record in fake.records] == ["sync"]
    (job,) = api_setup.ledger_jobs().values()
    assert job["state"] == "archived" and job["mode"] == "sync" and job["credits"] == "1"
    assert CANARY_KEY not in result.stderr + result.stdout


def test_once_async_detailed_polls_and_downloads_without_key(api_setup: Setup, fake: FakeClipdrop) -> None:
    """The detailed strategy goes async: submit, poll, result, download; the key never reaches the storage host."""
    api_setup.folder()["strategy"] = "detailed"
    api_setup.write()
    make_image(api_setup.inbox / "b.png", (100, 100), mode="RGBA")
    result = api_setup.once()
    assert result.returncode == 0, result.stderr
    assert files(api_setup.outbox) == ["b.png"]
    endpoints = [record.endpoint for record in fake.records]
    assert endpoints[0] == "submit" and "status" in endpoints and endpoints[-2:] == ["result", "download"]
    assert fake.leaks() == 0
    (job,) = api_setup.ledger_jobs().values()
    assert job["mode"] == "async" and job["task_id"] and job["credits"] == "0.04"
