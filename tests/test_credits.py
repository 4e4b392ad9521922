"""Credits: estimates, the plan, caps that hold jobs, the low-balance warning, and dedupe."""

from __future__ import annotations

import json
import shutil
import signal
from decimal import Decimal
from pathlib import Path

from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, Setup, files, make_image


def _distinct(setup: Setup, count: int, size: tuple[int, int] = (40, 30)) -> list[str]:
    """`count` JPEGs with different bytes (a comment each), so dedupe never joins them."""
    names = []
    for index in range(count):
        name = f"img{index:02d}.jpg"
        make_image(setup.inbox / name, size, comment=f"picture {index}".encode())
        names.append(name)
    return names


def test_plan_lists_routes_and_estimates_and_calls_nothing(api_setup: Setup, fake: FakeClipdrop) -> None:
    """`folderd plan` shows each file's route and estimated credits, the total, and refusals, without calling the API or moving a file."""
    api_setup.folder()["strategy"] = "detailed"
    api_setup.folder()["target"] = {"width": 2000, "height": 2000, "fit": "exact"}
    api_setup.write()
    make_image(api_setup.inbox / "a.jpg", (100, 100))
    (api_setup.inbox / "notes.jpg").write_text("this is not an image, only text pretending to be one")
    before = sorted(path.name for path in api_setup.inbox.iterdir())
    result = api_setup.cli("plan")
    assert result.returncode == 0, result.stderr
    assert "a.jpg: 100x100 JPEG -> 2000x2000 clipdrop async/detailed, ~4.00 credits" in result.stdout
    assert "notes.jpg: REFUSED: not an image" in result.stdout
    assert "total: 1 file(s) to upscale, ~4.00 credits estimated; 1 would be refused" in result.stdout
    assert fake.records == []
    assert sorted(path.name for path in api_setup.inbox.iterdir()) == before
    as_json = json.loads(api_setup.cli("plan", "--json").stdout)
    assert [entry.get("credits") for entry in as_json] == ["4.00", None]
    # The estimate is what the fake then charges.
    assert api_setup.once().returncode == 1
    assert fake.charged() == Decimal("4.00")


def test_daily_cap_holds_jobs_then_lets_them_go_after_midnight(api_setup: Setup, fake: FakeClipdrop, tmp_path: Path) -> None:
    """A daily cap reached mid-batch holds the rest (queued, not failed); when the day changes they are delivered."""
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    api_setup.env["FOLDERD_CLOCK_OFFSET_FILE"] = str(offset)
    api_setup.data["clipdrop"]["budget"] = {"daily": 2}
    api_setup.data["clipdrop"]["concurrency"] = 1
    api_setup.write()
    _distinct(api_setup, 4)
    daemon = api_setup.start()
    try:
        daemon.wait_for(lambda: len(files(api_setup.outbox)) == 2, what="two deliveries")
        def held_jobs() -> list[dict[str, object]]:
            status = json.loads(api_setup.cli("status", "--json").stdout)
            return [job for job in status["folders"]["f0"]["jobs"] if job["held"]]

        held = daemon.wait_for(lambda: len(held_jobs()) == 2 and held_jobs(), what="status to show two held jobs")
        assert "daily credit cap of 2" in str(held[0]["held"])
        status = json.loads(api_setup.cli("status", "--json").stdout)
        assert files(api_setup.failed) == [] and fake.charged() == 2
        assert status["credits"]["spent_today"] == "2"
        offset.write_text(str(24 * 3600))  # tomorrow
        daemon.wait_for(lambda: len(files(api_setup.outbox)) == 4, timeout=30, what="the held jobs after midnight")
    finally:
        assert daemon.stop() == 0
    assert fake.charged() == 4 and files(api_setup.failed) == []


def test_raising_the_cap_by_reload_lets_held_jobs_go(api_setup: Setup, fake: FakeClipdrop) -> None:
    """A job held by a monthly cap goes once a reload raises the cap; `once` alone exits 3 while only held jobs remain."""
    api_setup.data["clipdrop"]["budget"] = {"monthly": 1}
    api_setup.write()
    _distinct(api_setup, 2)
    result = api_setup.once()
    assert result.returncode == 3, result.stderr
    assert len(files(api_setup.outbox)) == 1 and files(api_setup.failed) == []
    daemon = api_setup.start()
    try:
        daemon.wait_for(lambda: "credit cap" in daemon.log_text(), what="the held job")
        api_setup.data["clipdrop"]["budget"] = {"monthly": 10}
        api_setup.write()
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: len(files(api_setup.outbox)) == 2, timeout=20, what="the job after the reload")
    finally:
        assert daemon.stop() == 0
    assert fake.charged() == 2


def test_folder_cap_holds_only_that_folder(tmp_path: Path, fake: FakeClipdrop) -> None:
    """A folder's own daily cap holds that folder's jobs while another folder's go on."""
    setup = Setup(tmp_path, backend="clipdrop", base_url=fake.base_url, folders=2).with_key()
    setup.folder(0)["budget"] = {"daily": 1}
    setup.write()
    for index in range(2):
        for number in range(2):
            make_image(setup.path("inbox", index) / f"x{number}.jpg", (40, 30), comment=f"{index}-{number}".encode())
    assert setup.once().returncode == 3
    assert len(files(setup.path("outbox", 0))) == 1
    assert len(files(setup.path("outbox", 1))) == 2


def test_low_balance_warns_before_the_account_runs_dry(api_setup: Setup, fake: FakeClipdrop) -> None:
    """When the reported balance falls below budget.low_balance, a warning is logged (once) and STATUS says LOW BALANCE."""
    fake.set_credits(CANARY_KEY, 3)
    api_setup.data["clipdrop"]["budget"] = {"low_balance": 2}
    api_setup.write()
    _distinct(api_setup, 2)
    result = api_setup.once()
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "credit balance is low" in line]
    assert len(warnings) == 1 and '"remaining": "1"' in warnings[0]
    status = json.loads((api_setup.state / "status.json").read_text())
    assert "LOW BALANCE" in status["line"]


def test_dedupe_serves_identical_content_from_the_earlier_result(api_setup: Setup, fake: FakeClipdrop) -> None:
    """The same bytes dropped again under the same rule are copied from the earlier result: 0 credits, one API call in all."""
    api_setup.folder()["dedupe"] = True
    api_setup.write()
    make_image(api_setup.inbox / "first.jpg", (50, 40))
    assert api_setup.once().returncode == 0
    shutil.copy(api_setup.done / "first.jpg", api_setup.inbox / "again.jpg")
    assert api_setup.once().returncode == 0
    assert sorted(files(api_setup.outbox)) == ["again.jpg", "first.jpg"]
    assert (api_setup.outbox / "again.jpg").read_bytes() == (api_setup.outbox / "first.jpg").read_bytes()
    assert len(fake.calls("sync")) == 1 and fake.charged() == 1
    again = next(job for job in api_setup.ledger_jobs().values() if job["source"] == "again.jpg")
    assert again["state"] == "archived" and again.get("credits") is None and again["credits_estimate"] == "0"


def test_dedupe_upscales_again_when_the_rule_or_the_earlier_result_changed(api_setup: Setup, fake: FakeClipdrop) -> None:
    """Dedupe needs the same rule and an intact earlier result: a new target, or a deleted result, pays for a fresh upscale."""
    api_setup.folder()["dedupe"] = True
    api_setup.write()
    make_image(api_setup.inbox / "one.jpg", (50, 40))
    assert api_setup.once().returncode == 0
    original = api_setup.done / "one.jpg"
    api_setup.folder()["target"] = {"scale": 3}
    api_setup.write()
    shutil.copy(original, api_setup.inbox / "two.jpg")
    assert api_setup.once().returncode == 0
    assert len(fake.calls("sync")) == 2  # another size: not the same result
    (api_setup.outbox / "two.jpg").unlink()
    shutil.copy(original, api_setup.inbox / "three.jpg")
    assert api_setup.once().returncode == 0
    assert len(fake.calls("sync")) == 3  # the earlier 3x result is gone: made afresh
    assert fake.charged() == 3
