"""End to end against the fake Clipdrop API: routing, every error status, async tasks, restarts,
credits and secrets, with the real `folderd` process and real folders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image, ImageOps

from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, DaemonProcess, Setup, files, make_image

EXIT_OK, EXIT_FAILED, EXIT_PAUSED = 0, 1, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def api(api_setup: Setup, fake: FakeClipdrop) -> Setup:
    """api_setup with a rate budget on the fake that no test here reaches by accident."""
    fake.rpm = 100_000
    return api_setup


def configure(setup: Setup, *, clipdrop: dict[str, Any] | None = None, **folder: Any) -> Setup:
    """Change folder 0's keys (and clipdrop settings) and rewrite the config."""
    setup.folder().update(folder)
    setup.data["clipdrop"].update(clipdrop or {})
    setup.write()
    return setup


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_once(setup: Setup, expected: int = EXIT_OK) -> subprocess.CompletedProcess[str]:
    result = setup.once()
    assert result.returncode == expected, f"exit {result.returncode}, expected {expected}\n{result.stderr[-4000:]}"
    return result


def events(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    found = []
    for line in (result.stdout + result.stderr).splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def sidecar(setup: Setup, name: str) -> dict[str, Any]:
    return json.loads((setup.failed / f"{name}.error.json").read_text())


def only_job(setup: Setup) -> dict[str, Any]:
    (job,) = setup.ledger_jobs().values()
    return job


def endpoints(fake: FakeClipdrop) -> list[str]:
    return [record.endpoint for record in fake.records]


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def assert_delivered(setup: Setup, names: list[str], fake: FakeClipdrop | None = None) -> None:
    """Every input has exactly one result in the outbox, its original in done, nothing in failed."""
    assert sorted(Path(name).stem for name in files(setup.outbox)) == sorted(Path(name).stem for name in names)
    assert files(setup.done) == sorted(names)
    assert files(setup.failed) == []
    assert files(setup.inbox) == []
    jobs = setup.ledger_jobs().values()
    assert sorted(job["source"] for job in jobs) == sorted(names)
    assert all(job["state"] == "archived" for job in jobs), [job["state"] for job in jobs]
    if fake is not None:
        assert fake.paid_twice() == {}


def write_exif_rotated(path: Path, size: tuple[int, int], orientation: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (20, 120, 220))
    image.paste((230, 20, 20), (0, 0, size[0] // 3, size[1] // 3))  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def all_text_under(root: Path) -> bytes:
    """The bytes of every file under `root` (logs, state, sidecars, outboxes...)."""
    chunks = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            chunks.append(path.read_bytes())
    return b"\n".join(chunks)


# --------------------------------------------------------------------------- routing


def test_smooth_small_output_goes_sync(api: Setup, fake: FakeClipdrop) -> None:
    """If the strategy is smooth and the output fits 4096x4096, the image goes through the sync endpoint once."""
    make_image(api.inbox / "small.jpg", (120, 90))
    run_once(api)
    assert_delivered(api, ["small.jpg"], fake)
    assert endpoints(fake) == ["sync"]
    job = only_job(api)
    assert job["mode"] == "sync" and job["target"] == [240, 180]
    assert size_of(api.outbox / "small.jpg") == (240, 180)


def test_output_over_4096_goes_async(api: Setup, fake: FakeClipdrop) -> None:
    """If the output would be wider than 4096 px, the image goes through the async endpoint at full size."""
    make_image(api.inbox / "wide.jpg", (2100, 60))
    run_once(api)
    assert_delivered(api, ["wide.jpg"], fake)
    assert "sync" not in endpoints(fake) and endpoints(fake)[0] == "submit"
    (task,) = fake.tasks()
    assert (task.width, task.height, task.strategy) == (4200, 120, "smooth")
    assert size_of(api.outbox / "wide.jpg") == (4200, 120)
    assert only_job(api)["mode"] == "async"


def test_detailed_strategy_goes_async(api: Setup, fake: FakeClipdrop) -> None:
    """If the strategy is detailed, even a small image goes async with strategy detailed."""
    configure(api, strategy="detailed")
    make_image(api.inbox / "d.jpg", (100, 80))
    run_once(api)
    assert_delivered(api, ["d.jpg"], fake)
    (task,) = fake.tasks()
    assert task.strategy == "detailed" and (task.width, task.height) == (200, 160)
    assert fake.calls("sync") == []


def test_input_over_16_megapixels_goes_async_even_for_a_small_output(api: Setup, fake: FakeClipdrop) -> None:
    """If the input is over 16 MP, a small output still goes async (the sync endpoint refuses such inputs)."""
    api.inbox.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4100, 4000), (10, 150, 60)).save(api.inbox / "huge.png", compress_level=1)
    configure(api, target={"width": 410})
    run_once(api)
    assert_delivered(api, ["huge.png"], fake)
    assert fake.calls("sync") == []
    (task,) = fake.tasks()
    assert (task.width, task.height) == (410, 400)
    assert size_of(api.outbox / "huge.jpg") == (410, 400)


def test_webp_input_is_converted_to_png_for_async(api: Setup, fake: FakeClipdrop) -> None:
    """If a WebP goes to the async endpoint (PNG/JPEG only), a lossless PNG of the same pixels is uploaded instead."""
    configure(api, mode="async")
    source = make_image(api.inbox / "pic.webp", (90, 60), fmt="WEBP", lossless=True)
    original = source.read_bytes()
    with Image.open(io.BytesIO(original)) as image:
        pixels = image.convert("RGB").tobytes()
    run_once(api)
    assert_delivered(api, ["pic.webp"], fake)
    (task,) = fake.tasks()
    assert task.image.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(task.image)) as uploaded:
        assert uploaded.size == (90, 60) and uploaded.convert("RGB").tobytes() == pixels
    (submit,) = fake.calls("submit")
    assert submit.image_sha256 == sha256(task.image) != sha256(original)


def test_webp_input_goes_to_sync_unconverted(api: Setup, fake: FakeClipdrop) -> None:
    """If a WebP goes to the sync endpoint (which takes WebP), the original bytes are uploaded as they are."""
    source = make_image(api.inbox / "pic.webp", (90, 60), fmt="WEBP")
    digest = sha256(source.read_bytes())
    run_once(api)
    assert_delivered(api, ["pic.webp"], fake)
    (call,) = fake.calls("sync")
    assert call.image_sha256 == digest


def test_exif_rotated_jpeg_is_uploaded_upright(api: Setup, fake: FakeClipdrop) -> None:
    """If a JPEG carries EXIF orientation 6, the upload is the upright image and the target uses the upright size."""
    configure(api, mode="async")
    source = write_exif_rotated(api.inbox / "phone.jpg", (80, 40), orientation=6)
    with Image.open(source) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    run_once(api)
    assert_delivered(api, ["phone.jpg"], fake)
    (task,) = fake.tasks()
    with Image.open(io.BytesIO(task.image)) as uploaded:
        assert uploaded.format == "PNG" and uploaded.size == (40, 80)
        assert uploaded.getexif().get(0x0112, 1) == 1
        assert uploaded.convert("RGB").tobytes() == upright.tobytes()
    assert (task.width, task.height) == (80, 160)
    assert size_of(api.outbox / "phone.jpg") == (80, 160)


def test_exif_rotated_jpeg_on_sync_is_delivered_upright(api: Setup, fake: FakeClipdrop) -> None:
    """If an EXIF-rotated JPEG goes sync, the result has the upright shape with the marker where a viewer shows it."""
    write_exif_rotated(api.inbox / "phone.jpg", (80, 40), orientation=6)
    run_once(api)
    assert_delivered(api, ["phone.jpg"], fake)
    (call,) = fake.calls("sync")
    assert call.image_sha256 != sha256((api.done / "phone.jpg").read_bytes())
    with Image.open(api.outbox / "phone.jpg") as result:
        assert result.size == (80, 160)
        # Orientation 6 turns the stored top-left corner to the displayed top-right one.
        rgb = result.convert("RGB")
        top_right, top_left = rgb.getpixel((70, 10)), rgb.getpixel((10, 10))
        assert isinstance(top_right, tuple) and isinstance(top_left, tuple)
        assert top_right[0] > 150 and top_right[1] < 100  # the red marker
        assert top_left[2] > 150 and top_left[0] < 100  # the blue background


def test_exact_width_and_height_target(api: Setup, fake: FakeClipdrop) -> None:
    """If the target is {width, height, fit: exact}, the API is asked for exactly that size, ratio not kept."""
    configure(api, target={"width": 300, "height": 300, "fit": "exact"})
    make_image(api.inbox / "e.png", (100, 50))
    run_once(api)
    assert_delivered(api, ["e.png"], fake)
    assert only_job(api)["target"] == [300, 300]
    (result,) = files(api.outbox)
    assert size_of(api.outbox / result) == (300, 300)


def test_sync_mode_clamps_target_over_4096_keeping_ratio(api: Setup, fake: FakeClipdrop) -> None:
    """If mode is sync and the target is over 4096 px, it is clamped to 4096 keeping the aspect ratio."""
    configure(api, mode="sync")
    make_image(api.inbox / "c.jpg", (2500, 100))
    run_once(api)
    assert_delivered(api, ["c.jpg"], fake)
    assert endpoints(fake) == ["sync"]
    job = only_job(api)
    assert job["target"] == [4096, 164] and job.get("clamped") is True
    assert size_of(api.outbox / "c.jpg") == (4096, 164)


def test_target_beyond_every_limit_fails_without_calling_the_api(api: Setup, fake: FakeClipdrop) -> None:
    """If the target is beyond every endpoint's limit (scale 500), the file goes to failed/ with a reason and `once` exits 1."""
    configure(api, target={"scale": 500})
    make_image(api.inbox / "big.jpg", (64, 48))
    run_once(api, EXIT_FAILED)
    assert fake.records == []
    assert files(api.failed) == ["big.jpg", "big.jpg.error.json"]
    report = sidecar(api, "big.jpg")
    assert "32000x24000" in report["reason"] and "12000" in report["reason"]
    assert report["status"] is None and report["file"] == "big.jpg"
    assert files(api.outbox) == [] and files(api.inbox) == []
    assert only_job(api)["state"] == "failed"


def test_once_exit_code_is_1_when_one_of_several_failed(api: Setup, fake: FakeClipdrop) -> None:
    """If one file fails and another is delivered, `once` exits 1 and each file is where it belongs."""
    make_image(api.inbox / "good.jpg", (60, 40))
    make_image(api.inbox / "bad.jpg", (61, 40))
    fake.inject("sync", "413-html")
    run_once(api, EXIT_FAILED)
    assert len(files(api.outbox)) == 1 and len(files(api.done)) == 1
    assert len([name for name in files(api.failed) if not name.endswith(".error.json")]) == 1


# --------------------------------------------------------------------------- error statuses


def _noise_png(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path, compress_level=0)
    return path


def test_http_400_from_a_real_bad_request_fails_without_retry(api: Setup, fake: FakeClipdrop) -> None:
    """If the API answers 400 (a PNG whose pixel data is damaged past what folderd checks), the file fails at once with the API's message."""
    path = _noise_png(api.inbox / "broken.png", (1300, 1200))  # over 4 MB: folderd only reads its header
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))
    run_once(api, EXIT_FAILED)
    (call,) = fake.calls("sync")
    assert call.status == 400
    assert files(api.failed) == ["broken.png", "broken.png.error.json"]
    report = sidecar(api, "broken.png")
    assert report["status"] == 400 and "could not be decoded" in report["message"]
    assert fake.charged() == 0 and files(api.outbox) == []


def test_proxy_html_413_fails_without_retry(api: Setup, fake: FakeClipdrop) -> None:
    """If a proxy answers an HTML 413, the file fails at once and the sidecar holds 413 and a readable message."""
    make_image(api.inbox / "x.jpg", (60, 40))
    fake.inject("sync", "413-html")
    run_once(api, EXIT_FAILED)
    assert len(fake.calls("sync")) == 1
    report = sidecar(api, "x.jpg")
    assert report["status"] == 413
    assert "HTTP 413" in report["message"] and "Request Entity Too Large" in report["message"]
    assert report["stage"] and report["job_id"] == only_job(api)["id"]
    assert only_job(api)["error"]["status"] == 413


@pytest.mark.parametrize("kind", ["500", "502-html"])
def test_server_errors_are_retried_then_delivered(api: Setup, fake: FakeClipdrop, kind: str) -> None:
    """If the API answers 500 or a proxy's HTML 502 twice, the call is retried and the file is delivered once."""
    make_image(api.inbox / "r.jpg", (60, 40))
    fake.inject("sync", kind, times=2)
    run_once(api)
    assert_delivered(api, ["r.jpg"], fake)
    assert [call.status for call in fake.calls("sync")] == [int(kind[:3])] * 2 + [200]
    assert only_job(api)["attempts"] == 2
    assert fake.charged() == 1


@pytest.mark.parametrize(
    ("endpoint", "kind"),
    [(endpoint, kind) for endpoint in ("sync", "submit", "download") for kind in ("reset", "truncate")]
    + [("status", "reset"), ("result", "truncate")],
)
def test_cut_responses_are_retried_and_each_input_delivered_once(api: Setup, fake: FakeClipdrop, kind: str, endpoint: str) -> None:
    """If a response is reset or cut short mid-body, the call is retried and each input is delivered exactly once."""
    # A cut answer to a paid call may have been charged; allow two resends per job so that both
    # faults landing on the same file still ends in a delivery (the fake cuts before charging).
    configure(api, mode="sync" if endpoint == "sync" else "async", clipdrop={"ambiguous_retries": 2})
    names = ["a.jpg", "b.jpg", "c.jpg"]
    for index, name in enumerate(names):
        make_image(api.inbox / name, (60 + index, 40))
    fake.inject(endpoint, kind, times=2)
    run_once(api)
    assert_delivered(api, names, fake)
    assert sorted(fake.submissions().values()) == [1, 1, 1]
    assert [fault for fault in (record.fault for record in fake.records) if fault] == [kind, kind]
    for name in names:
        assert size_of(api.outbox / name) == (2 * size_of(api.done / name)[0], 80)


def test_slow_answer_past_the_timeout_is_retried(api: Setup, fake: FakeClipdrop) -> None:
    """If the API answers after the client timeout, the call is retried, the file delivered, and the job flagged as maybe paid twice."""
    configure(api, clipdrop={"timeout": "500ms"})
    make_image(api.inbox / "s.jpg", (60, 40))
    fake.inject("sync", "slow", seconds=1.5)
    result = run_once(api)
    assert_delivered(api, ["s.jpg"], None)
    calls = fake.calls("sync")
    assert len(calls) == 2 and calls[0].fault == "slow"
    job = only_job(api)
    assert job["attempts"] == 1
    assert "no answer within 0.5s" in result.stderr
    # The slow call was processed (and charged) by the fake: the daemon says so rather than hides it,
    # and the flag outlives the ledger compaction of the next start.
    assert fake.charged() == 2 and job.get("maybe_paid_twice") is True
    run_once(api)
    assert only_job(api).get("maybe_paid_twice") is True


@pytest.mark.parametrize(("endpoint", "retry_after"), [("sync", None), ("sync", 1), ("sync", "date"), ("status", 1)])
def test_429_pauses_every_call_of_the_key_then_delivers(api: Setup, fake: FakeClipdrop, endpoint: str, retry_after: Any) -> None:
    """If the API answers 429, no call of the key goes until Retry-After (or a backoff) has passed, then files are delivered."""
    configure(api, clipdrop={"concurrency": 1}, mode="sync" if endpoint == "sync" else "async")
    names = ["a.jpg", "b.jpg"]
    for index, name in enumerate(names):
        make_image(api.inbox / name, (60 + index, 40))
    fake.inject(endpoint, "429", retry_after=retry_after)
    result = run_once(api)
    assert_delivered(api, names, fake)
    records = fake.records
    (limited,) = [record for record in records if record.status == 429]
    assert limited.endpoint == endpoint
    after = [record.time - limited.time for record in records if record.time > limited.time]
    assert after, "no call after the 429"
    minimum = {None: 0.02, 1: 0.95, "date": 0.95}[retry_after]
    assert min(after) >= minimum, f"a call went {min(after):.3f}s after the 429"
    assert sorted(fake.submissions().values()) == [1, 1]
    rate_events = [event for event in events(result) if event.get("event", "").startswith("rate limited")]
    assert rate_events and rate_events[0]["retry_after"] is (retry_after is not None)


def test_the_apis_own_rate_limiter_is_obeyed_without_a_storm(api: Setup, fake: FakeClipdrop) -> None:
    """If the API's rate limiter refuses calls (2 per second here), folderd waits as told and delivers every file once, with few 429s."""
    fake.rpm, fake.window, fake.retry_after = 120, 1.0, 1
    names = [f"n{index}.jpg" for index in range(5)]
    for index, name in enumerate(names):
        make_image(api.inbox / name, (60 + index, 40))
    run_once(api)
    assert_delivered(api, names, fake)
    assert sorted(fake.submissions().values()) == [1] * 5
    assert 1 <= fake.rate_limited() <= 6
    accepted = sorted(record.time for record in fake.calls("sync", 200))
    assert all(later - earlier >= 0.9 for earlier, later in zip(accepted, accepted[2:])), "more than 2 calls went within one window"


def test_stop_during_a_429_pause_resumes_without_a_false_double_charge(api: Setup, fake: FakeClipdrop) -> None:
    """If folderd is stopped while a 429 pauses the key, the restart submits the file once more, delivers it, and flags no double charge."""
    make_image(api.inbox / "q.jpg", (60, 40))
    fake.inject("sync", "429", retry_after=30)
    daemon = api.start()
    try:
        daemon.wait_for(lambda: fake.calls("sync", 429), what="the 429")
        daemon.wait_for(lambda: "rate limited by the API" in daemon.log_text(), what="the pause")
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    assert fake.calls("sync", 200) == [] and files(api.failed) == [] and files(api.outbox) == []
    result = run_once(api)
    assert_delivered(api, ["q.jpg"], fake)
    assert "charged twice" not in result.stderr
    assert not only_job(api).get("maybe_paid_twice")
    assert fake.charged() == 1


@pytest.mark.parametrize("status", [401, 403, 402])
def test_auth_and_credit_errors_pause_and_the_files_wait_for_a_fixed_key(api: Setup, fake: FakeClipdrop, status: int) -> None:
    """If the API answers 401/403/402, `once` exits 3, nothing moves to failed, and after the key is fixed the same files are delivered."""
    names = ["a.jpg", "b.jpg"]
    for index, name in enumerate(names):
        make_image(api.inbox / name, (60 + index, 40))
    if status == 401:
        fake.inject("any", "401", times=100)
    elif status == 403:
        fake.revoke(CANARY_KEY)
    else:
        fake.set_credits(CANARY_KEY, 0)
    result = run_once(api, EXIT_PAUSED)
    assert fake.calls(status=status), endpoints(fake)
    assert fake.charged() == 0
    assert files(api.failed) == [] and files(api.outbox) == [] and files(api.done) == []
    jobs = api.ledger_jobs()
    waiting = files(api.inbox) + [Path(job["work"]).name.split("~", 1)[1] for job in jobs.values() if Path(job["work"]).exists()]
    assert sorted(waiting) == names
    assert all(job["state"] not in ("failed", "failing", "archived") for job in jobs.values())
    assert f"HTTP {status}" in result.stderr
    assert CANARY_KEY not in result.stderr + result.stdout

    if status == 401:
        fake.clear_faults()
    elif status == 403:
        fake.add_key(CANARY_KEY, 1000)
    else:
        fake.set_credits(CANARY_KEY, 1000)
    result = run_once(api)
    assert_delivered(api, names, fake)
    assert sorted(fake.submissions().values()) == [1, 1]
    # A refused call was never processed: no false "may be charged twice" on the next start.
    assert "charged twice" not in result.stderr
    assert not any(job.get("maybe_paid_twice") for job in api.ledger_jobs().values())


def test_running_daemon_pauses_on_402_and_resumes_when_credits_return(api: Setup, fake: FakeClipdrop) -> None:
    """If credits run out while `folderd run` works, it retries the key only every pause_retry, fails nothing, and delivers once credits return."""
    configure(api, clipdrop={"pause_retry": "400ms"})
    fake.set_credits(CANARY_KEY, 0)
    names = ["a.jpg", "b.jpg"]
    for index, name in enumerate(names):
        make_image(api.inbox / name, (60 + index, 40))
    daemon = api.start()
    try:
        daemon.wait_for(lambda: fake.calls(status=402), what="a 402")
        first = fake.calls(status=402)[0].time
        time.sleep(1.0)
        refused = fake.calls(status=402)
        span = refused[-1].time - first
        # At most every queued job once per pause_retry: no hammering of a key without credits.
        assert len(refused) <= len(names) * (2 + span / 0.4), [round(r.time - first, 3) for r in refused]
        assert files(api.failed) == [] and files(api.outbox) == []
        fake.set_credits(CANARY_KEY, 1000)
        daemon.wait_for(lambda: len(files(api.done)) == len(names), what="delivery after credits came back")
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    assert_delivered(api, names, fake)
    assert not any(job.get("maybe_paid_twice") for job in api.ledger_jobs().values())
    assert "the API accepts the key again" in daemon.log_text()


def test_no_api_key_leaves_files_in_the_inbox_and_exits_3(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If no API key is configured, `once` calls nothing, moves nothing, and exits 3."""
    setup = Setup(tmp_path, backend="clipdrop", base_url=fake.base_url)
    make_image(setup.inbox / "k.jpg", (60, 40))
    result = run_once(setup, EXIT_PAUSED)
    assert fake.records == []
    assert files(setup.inbox) == ["k.jpg"] and files(setup.failed) == [] and files(setup.outbox) == []
    assert "CLIPDROP_API_KEY" in result.stderr


def test_chaos_on_every_endpoint_still_delivers_each_file_once(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If a third of all API calls fail transiently (5xx, resets, cut bodies, 429), every file of a sync and an async folder is delivered exactly once."""
    fake.rpm = 100_000
    setup = Setup(
        tmp_path, backend="clipdrop", base_url=fake.base_url, folders=2, clipdrop={"max_attempts": 12, "ambiguous_retries": 10}
    ).with_key()
    configure(setup, mode="sync")
    setup.folder(1)["mode"] = "async"
    setup.write()
    names = [f"c{index}.jpg" for index in range(4)]
    for folder in range(2):
        for index, name in enumerate(names):
            make_image(setup.path("inbox", folder) / name, (60 + index, 40 + folder))
    fake.chaos(0.33, ["500", "502-html", "reset", "truncate", "429"], seed=7)
    run_once(setup)
    for folder in range(2):
        assert files(setup.path("outbox", folder)) == names
        assert files(setup.path("done", folder)) == names
        assert files(setup.path("failed", folder)) == []
    assert sorted(fake.submissions().values()) == [1] * 8
    assert sum(1 for record in fake.records if record.fault) >= 4
    assert fake.leaks() == 0


def test_permanent_500_fails_after_max_attempts(api: Setup, fake: FakeClipdrop) -> None:
    """If the API keeps answering 500, the file fails after clipdrop.max_attempts calls with the reason in its sidecar."""
    make_image(api.inbox / "p.jpg", (60, 40))
    fake.inject("sync", "500", times=50)
    run_once(api, EXIT_FAILED)
    assert len(fake.calls("sync")) == 4  # FAST_CLIPDROP max_attempts
    report = sidecar(api, "p.jpg")
    assert report["status"] == 500 and "gave up after 4 attempts" in report["reason"]
    assert "Internal server error" in report["reason"]
    assert report["attempts"] == 4
    assert files(api.outbox) == [] and files(api.done) == []


# --------------------------------------------------------------------------- async


def test_failed_task_goes_to_failed_with_reason(api: Setup, fake: FakeClipdrop) -> None:
    """If the async task ends failed, the file goes to failed/ with the task id and the reason."""
    configure(api, mode="async")
    make_image(api.inbox / "t.jpg", (60, 40))
    fake.inject("submit", "task-fail")
    run_once(api, EXIT_FAILED)
    (task,) = fake.tasks()
    report = sidecar(api, "t.jpg")
    assert report["task_id"] == task.id and "failed" in report["reason"] and task.id in report["reason"]
    assert fake.calls("download") == [] and files(api.outbox) == []
    assert len(fake.calls("submit")) == 1


def test_expired_download_url_asks_result_again(api: Setup, fake: FakeClipdrop) -> None:
    """If the signed URL has expired when downloaded, folderd asks /result for a fresh one and delivers."""
    configure(api, mode="async")
    make_image(api.inbox / "u.jpg", (60, 40))
    fake.inject("result", "expired-url")
    run_once(api)
    assert_delivered(api, ["u.jpg"], fake)
    assert [call.status for call in fake.calls("result")] == [200, 200]
    assert [call.status for call in fake.calls("download")] == [403, 200]
    assert len(fake.calls("submit")) == 1


@pytest.mark.parametrize(
    "option",
    [{"task_id_shape": "object"}, {"status_case": "upper"}, {"eta": False}],
    ids=["taskid-object", "status-upper", "no-eta"],
)
def test_async_answer_variants(api: Setup, fake: FakeClipdrop, option: dict[str, Any]) -> None:
    """If the API gives taskId as {"value": ...}, status in upper case or no eta, async jobs are still delivered."""
    for name, value in option.items():
        setattr(fake, name, value)
    configure(api, mode="async")
    names = ["a.jpg", "b.png"]
    make_image(api.inbox / names[0], (60, 40))
    make_image(api.inbox / names[1], (50, 40), mode="RGBA")
    run_once(api)
    assert_delivered(api, names, fake)
    ids = {job["task_id"] for job in api.ledger_jobs().values()}
    assert ids == {task.id for task in fake.tasks()}
    assert all(call.status == 200 for call in fake.calls("status"))
    assert size_of(api.outbox / "b.png") == (100, 80)


def _wait_all_submitted(daemon: DaemonProcess, setup: Setup, count: int) -> dict[str, dict[str, Any]]:
    def submitted() -> dict[str, dict[str, Any]] | None:
        jobs = setup.ledger_jobs()
        if len(jobs) == count and all(job["state"] == "submitted" and job.get("task_id") for job in jobs.values()):
            return jobs
        return None

    return daemon.wait_for(submitted, timeout=15, what="every job submitted with a task id")


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_restart_with_pending_tasks_does_not_resubmit(api: Setup, fake: FakeClipdrop, how: str) -> None:
    """If folderd stops (SIGTERM, or kill -9) while async tasks are pending, the restart polls the stored task ids and pays once per file."""
    fake.async_duration = 30.0
    configure(api, mode="async")
    names = ["a.jpg", "b.jpg", "c.jpg"]
    for index, name in enumerate(names):
        make_image(api.inbox / name, (60 + index, 40))
    daemon = api.start()
    try:
        jobs = _wait_all_submitted(daemon, api, len(names))
        if how == "sigterm":
            assert daemon.stop(signal.SIGTERM) == 0
        else:
            daemon.kill()
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    stored = {job["task_id"] for job in jobs.values()}
    assert stored == {task.id for task in fake.tasks()}
    assert files(api.outbox) == [] and files(api.failed) == []
    submits_before = len(fake.calls("submit"))
    fake.complete_now()

    second = api.start()
    try:
        second.wait_for(lambda: len(files(api.done)) == len(names), what="every file delivered after the restart")
        assert second.stop() == 0
    finally:
        if second.process.poll() is None:
            second.kill()
    assert_delivered(api, names, fake)
    assert len(fake.calls("submit")) == submits_before == len(names)
    assert sorted(fake.submissions().values()) == [1, 1, 1]
    assert {job["task_id"] for job in api.ledger_jobs().values()} == stored
    assert {record.task_id for record in fake.calls("download")} == stored
    assert not any(job.get("maybe_paid_twice") for job in api.ledger_jobs().values())


# --------------------------------------------------------------------------- credits


def test_ledger_credits_equal_what_the_api_charged(api: Setup, fake: FakeClipdrop) -> None:
    """If sync and detailed async jobs run, each job's recorded credits equal what the fake charged for it, and the totals agree."""
    configure(api, strategy="detailed")
    make_image(api.inbox / "d1.jpg", (100, 100))  # 200x200 -> 0.04
    make_image(api.inbox / "d2.jpg", (1000, 700))  # 2000x1400 -> 2.8
    run_once(api)
    configure(api, strategy="smooth")
    make_image(api.inbox / "s1.jpg", (60, 40))
    run_once(api)
    jobs = {job["source"]: job for job in api.ledger_jobs().values()}
    by_sha = {call.image_sha256: call.charged for call in fake.records if call.charged}
    for name, job in jobs.items():
        assert Decimal(job["credits"]) == by_sha[job["sha256"]], name
    assert {name: job["credits"] for name, job in jobs.items()} == {"d1.jpg": "0.04", "d2.jpg": "2.8", "s1.jpg": "1"}
    assert sum(Decimal(job["credits"]) for job in jobs.values()) == fake.charged() == Decimal("3.84")
    from folderd.ledger import read_only

    meta = read_only(api.state).meta
    assert Decimal(meta["credits_remaining"]) == fake.credits(CANARY_KEY) == Decimal(1000) - Decimal("3.84")


def test_fractional_credit_headers_parse(api: Setup, fake: FakeClipdrop) -> None:
    """If the API writes credits as "1.0", they parse as decimals and the ledger still matches the charge."""
    fake.fractional_credits = True
    make_image(api.inbox / "f.jpg", (60, 40))
    run_once(api)
    assert_delivered(api, ["f.jpg"], fake)
    (call,) = fake.calls("sync")
    assert Decimal(only_job(api)["credits"]) == call.charged == fake.charged() == 1
    from folderd.ledger import read_only

    assert Decimal(read_only(api.state).meta["credits_remaining"]) == Decimal(999)


# --------------------------------------------------------------------------- secrets


def _signatures(fake: FakeClipdrop) -> set[str]:
    found = set()
    for record in fake.records:
        for value in parse_qs(urlsplit(record.path).query).get("signature", []):
            found.add(value)
    return found


def test_key_never_logged_nor_stored_nor_sent_to_storage(api: Setup, fake: FakeClipdrop) -> None:
    """If jobs succeed, fail and retry (with debug logs), the API key appears in no output, log, state file or sidecar, and never reaches the storage host."""
    configure(api, mode="async")
    make_image(api.inbox / "ok.jpg", (60, 40))
    make_image(api.inbox / "bad.jpg", (61, 40))
    fake.inject("submit", "413-html")
    fake.inject("status", "500")
    fake.inject("download", "reset")
    result = run_once(api, EXIT_FAILED)
    output = (result.stdout + result.stderr).encode()
    assert output, "expected log output"
    assert CANARY_KEY.encode() not in output
    assert CANARY_KEY.encode() not in all_text_under(api.root)
    assert files(api.failed) and all(CANARY_KEY not in (api.failed / name).read_text(errors="replace") for name in files(api.failed))
    assert fake.leaks() == 0
    assert all(record.api_key == CANARY_KEY for record in fake.records if record.endpoint != "download")


@pytest.mark.parametrize("endpoint", ["status", "result"])
def test_redirect_to_another_host_does_not_carry_the_key(api: Setup, fake: FakeClipdrop, endpoint: str) -> None:
    """If a status or result call is redirected to the storage host, the key is not sent there and the file is still delivered."""
    configure(api, mode="async")
    make_image(api.inbox / "r.jpg", (60, 40))
    fake.inject(endpoint, "redirect")
    run_once(api)
    assert_delivered(api, ["r.jpg"], fake)
    redirected = [record for record in fake.records if record.endpoint == "download" and not record.path.startswith("/results/")]
    assert redirected, "the redirect was not followed at all"
    assert fake.leaks() == 0
    assert all(record.api_key is None for record in fake.calls("download"))


def test_signed_url_signatures_never_logged(api: Setup, fake: FakeClipdrop) -> None:
    """If downloads fail and URLs expire (debug logs on), no signature of a signed URL appears in the output, logs or state."""
    configure(api, mode="async")
    make_image(api.inbox / "a.jpg", (60, 40))
    make_image(api.inbox / "b.jpg", (61, 40))
    fake.inject("result", "expired-url")
    fake.inject("download", "500")
    fake.inject("download", "reset")
    fake.inject("download", "truncate")
    daemon = api.start()
    try:
        daemon.wait_for(lambda: len(files(api.done)) == 2, what="both files delivered")
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    signatures = _signatures(fake)
    assert len(signatures) >= 3
    text = daemon.log_text()
    assert "download" in text
    stored = all_text_under(api.root)
    for signature in signatures:
        assert signature not in text
        assert signature.encode() not in stored
    assert CANARY_KEY not in text
