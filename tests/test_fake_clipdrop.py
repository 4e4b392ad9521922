"""Tests for the fake Clipdrop server, driven with plain ``requests`` over loopback.

They pin down the fake's behaviour so that the daemon's end-to-end tests can trust it.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image

from tests.fake_clipdrop import FakeClipdrop, detailed_cost, format_credits

KEY = FakeClipdrop.DEFAULT_KEY
H = {"x-api-key": KEY}
SYNC = "/image-upscaling/v1/upscale"
SUBMIT = "/image-upscaling/v1/async-upscale"


# -- helpers ------------------------------------------------------------------------------
def make_image(fmt: str = "PNG", size: tuple[int, int] = (8, 6), mode: str = "RGB", **info: object) -> bytes:
    """A tiny in-memory image."""
    out = io.BytesIO()
    color = {"P": 1, "1": 1, "RGBA": (255, 0, 0, 128)}.get(mode, "red")  # RGBA: really translucent
    img = Image.new(mode, size, color)
    img.save(out, fmt, **info)
    return out.getvalue()


def sync(fake: FakeClipdrop, image: bytes | None = None, w: object = 20, h: object = 10,
         headers: dict[str, str] | None = H, session: requests.Session | None = None, **kw: object) -> requests.Response:
    """POST the sync endpoint."""
    files = {"image_file": ("in.png", image if image is not None else make_image())}
    data = {k: v for k, v in (("target_width", w), ("target_height", h)) if v is not None}
    return (session or requests).post(fake.base_url + SYNC, headers=headers, files=files, data=data, **kw)


def submit(fake: FakeClipdrop, image: bytes | None = None, w: object = 20, h: object = 10,
           strategy: str | None = "smooth", headers: dict[str, str] | None = H, **kw: object) -> requests.Response:
    """POST the async submit endpoint."""
    files = {"image_file": ("in.png", image if image is not None else make_image())}
    data = {k: v for k, v in (("target_width", w), ("target_height", h), ("strategy", strategy)) if v is not None}
    return requests.post(fake.base_url + SUBMIT, headers=headers, files=files, data=data, **kw)


def status(fake: FakeClipdrop, task_id: str, headers: dict[str, str] | None = H) -> requests.Response:
    """GET the task status."""
    return requests.get(f"{fake.base_url}/async-tasks/v1/task-status/{task_id}", headers=headers)


def result(fake: FakeClipdrop, task_id: str, headers: dict[str, str] | None = H) -> requests.Response:
    """GET the task result (signed URL)."""
    return requests.get(f"{fake.base_url}/async-tasks/v1/result/{task_id}", headers=headers)


def finished_task(fake: FakeClipdrop, image: bytes | None = None, **kw: object) -> str:
    """Submit a task and make it complete immediately."""
    task_id = submit(fake, image, **kw).json()["taskId"]
    fake.complete_now(task_id)
    return task_id


@pytest.fixture
def fake():
    """A fake with a generous rate limit and short async tasks."""
    with FakeClipdrop(rpm=100_000, async_duration=0.3) as f:
        yield f
        assert f.errors() == []


# -- sync endpoint ----------------------------------------------------------------------------
def test_sync_resizes_to_jpeg_and_charges_one_credit(fake):
    """An opaque PNG comes back as a JPEG of exactly the target size, 1 credit charged."""
    r = sync(fake, w=33, h=17)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (33, 17)
    assert r.headers["x-credits-consumed"] == "1" and r.headers["x-remaining-credits"] == "99"
    assert fake.credits() == 99 and fake.charged() == 1


@pytest.mark.parametrize("image", [
    make_image("PNG", mode="RGBA"),
    make_image("PNG", mode="RGB", transparency=(255, 0, 0)),
    make_image("WEBP", mode="RGBA"),
], ids=["rgba-png", "color-key-transparency", "rgba-webp"])
def test_sync_transparent_input_gives_webp(fake, image):
    """Inputs with an alpha channel or transparency info come back as WebP with alpha."""
    r = sync(fake, image, w=12, h=12)
    out = Image.open(io.BytesIO(r.content))
    assert r.headers["Content-Type"] == "image/webp" and out.format == "WEBP"
    assert out.size == (12, 12) and out.mode == "RGBA"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_sync_accepts_jpeg_and_webp(fake, fmt):
    """JPEG and opaque WebP inputs are accepted and answered with JPEG."""
    r = sync(fake, make_image(fmt))
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"


def test_sync_upload_bytes_arrive_intact(fake):
    """Multipart parsing is byte-exact, even with CRLFs and boundary-like bytes in the file."""
    raw = make_image() + b"\r\n--boundary\r\n\r\n" + os.urandom(3000)
    sync(fake, raw)
    assert fake.calls("sync")[-1].image_sha256 == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("w,h", [(0, 10), (4097, 10), (10, -1), ("abc", 10), (1.5, 10), (None, 10), (10, None)])
def test_sync_bad_targets_are_400_and_free(fake, w, h):
    """Missing, non-integer or out-of-range (1..4096) targets give a JSON 400, no charge."""
    r = sync(fake, w=w, h=h)
    assert r.status_code == 400 and "error" in r.json() and fake.charged() == 0


def test_sync_400_cases(fake):
    """Missing image_file, bad format, too many pixels, too many bytes, non-multipart: 400."""
    no_file = requests.post(fake.base_url + SYNC, headers=H, files={"x": ("a", b"1")},
                            data={"target_width": 5, "target_height": 5})
    assert no_file.status_code == 400 and "image_file" in no_file.json()["error"]
    assert sync(fake, make_image("GIF")).status_code == 400
    assert sync(fake, b"not an image").status_code == 400
    assert sync(fake, make_image("PNG", size=(4001, 4000), mode="1")).status_code == 400  # 16.004 MP
    assert sync(fake, b"\0" * 30_000_001).json()["error"].startswith("Image file is too large")
    not_multipart = requests.post(fake.base_url + SYNC, headers=H, data={"target_width": 5})
    assert not_multipart.status_code == 400
    assert fake.charged() == 0


def test_sync_latency_options():
    """latency delays every API response; sync_latency adds to the sync endpoint only."""
    with FakeClipdrop(latency=0.1, sync_latency=0.2) as fake:
        t0 = time.monotonic()
        status(fake, "nope")
        t1 = time.monotonic()
        sync(fake)
        t2 = time.monotonic()
    assert 0.1 <= t1 - t0 < 0.3 and t2 - t1 >= 0.3


def test_fractional_credit_headers():
    """fractional_credits formats the credit headers as decimals ("1.0")."""
    with FakeClipdrop(fractional_credits=True) as fake:
        r = sync(fake)
    assert r.headers["x-credits-consumed"] == "1.0" and r.headers["x-remaining-credits"] == "99.0"


# -- authentication, credits, connections ---------------------------------------------------
def test_auth_errors_on_every_endpoint(fake):
    """No key: 401 'No api key provided'; unknown or revoked key: 403 (all API endpoints)."""
    fake.add_key("other", 5)
    fake.revoke("other")
    for call in (lambda h: sync(fake, headers=h), lambda h: submit(fake, headers=h),
                 lambda h: status(fake, "x", h), lambda h: result(fake, "x", h)):
        missing = call(None)
        assert missing.status_code == 401 and missing.json() == {"error": "No api key provided"}
        assert call({"x-api-key": "wrong"}).status_code == 403
        assert call({"x-api-key": "other"}).status_code == 403
    assert fake.charged() == 0
    assert {r.key_ok for r in fake.records} == {False}


def test_no_credits_is_402(fake):
    """A zero balance gives 402 on both POST endpoints; status/result stay free."""
    task_id = finished_task(fake)
    fake.set_credits(KEY, 0)
    assert sync(fake).status_code == 402
    assert submit(fake).status_code == 402
    assert status(fake, task_id).status_code == 200 and result(fake, task_id).status_code == 200
    fake.add_key("fresh", "2")
    assert sync(fake, headers={"x-api-key": "fresh"}).headers["x-remaining-credits"] == "1"


def test_keep_alive_connection_is_reused(fake):
    """HTTP/1.1 with exact Content-Length: a requests.Session reuses one connection."""
    with requests.Session() as s:
        for _ in range(3):
            assert sync(fake, session=s).status_code == 200
        s.get(f"{fake.base_url}/async-tasks/v1/task-status/x", headers=H)
    assert fake.connections("api") == 1


def test_concurrent_charging_is_exact(fake):
    """Parallel requests are charged exactly once each (thread-safe counters)."""
    fake.set_credits(KEY, 10)
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(sync(fake).status_code)) for _ in range(14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 10 + [402] * 4
    assert fake.charged() == 10 and fake.credits() == 0
    assert fake.paid_twice() == {hashlib.sha256(make_image()).hexdigest(): 10}


def test_unknown_path_and_wrong_method(fake):
    """Unknown paths are 404 JSON, wrong methods 405; both recorded as endpoint 'unknown'/name."""
    assert requests.get(fake.base_url + "/nope", headers=H).status_code == 404
    assert requests.get(fake.base_url + SYNC, headers=H).status_code == 405
    assert [r.endpoint for r in fake.records] == ["unknown", "sync"]


# -- async submit / status / result / download ---------------------------------------------------
def test_submit_returns_task_id_and_charges(fake):
    """Smooth costs 1; detailed costs output MP to the cent (2000x2000 = 4, 2048x2048 = 4.19)."""
    r = submit(fake)
    assert r.status_code == 200 and isinstance(r.json()["taskId"], str)
    assert r.headers["x-credits-consumed"] == "1"
    assert submit(fake, w=2000, h=2000, strategy="detailed").headers["x-credits-consumed"] == "4"
    r = submit(fake, w=2048, h=2048, strategy="detailed")
    assert r.headers["x-credits-consumed"] == "4.19" and r.headers["x-remaining-credits"] == "90.81"
    assert fake.charged() == Decimal("9.19") and len(fake.tasks()) == 3


def test_detailed_cost_and_credit_format():
    """Cost rounding is half-up to 0.01 with a 0.01 minimum; formatting drops needless zeros."""
    assert detailed_cost(1000, 1000) == Decimal("1.00") and detailed_cost(1, 1) == Decimal("0.01")
    assert detailed_cost(1005, 1000) == Decimal("1.01")  # 1.005 rounds half up
    assert format_credits(Decimal("100")) == "100" and format_credits(Decimal("4.10")) == "4.1"
    assert format_credits(Decimal("0")) == "0" and format_credits(Decimal("2"), fractional=True) == "2.0"


def test_submit_detailed_402_when_balance_below_cost(fake):
    """A detailed job costing more than the balance is 402 and charges nothing."""
    fake.set_credits(KEY, 3)
    assert submit(fake, w=2000, h=2000, strategy="detailed").status_code == 402
    assert fake.credits() == 3 and fake.tasks() == []


@pytest.mark.parametrize("kwargs", [
    {"image": make_image("WEBP")},
    {"image": make_image("PNG", size=(8193, 1), mode="1")},
    {"w": 12001}, {"h": 0}, {"strategy": "fast"}, {"strategy": None},
], ids=["webp", "side-8193", "w-12001", "h-0", "bad-strategy", "no-strategy"])
def test_submit_validation_400(fake, kwargs):
    """Async accepts PNG/JPEG only, sides <= 8192, targets 1..12000, smooth|detailed."""
    r = submit(fake, **kwargs)
    assert r.status_code == 400 and "error" in r.json() and fake.charged() == 0


def test_submit_accepts_large_target(fake):
    """Async targets may exceed the sync limit, up to 12000."""
    assert submit(fake, w=12000, h=1).status_code == 200


def test_status_lifecycle():
    """Queued (with position and ms eta) until async_duration elapses, then completed."""
    with FakeClipdrop(async_duration=0.6) as fake:
        first = submit(fake).json()["taskId"]
        second = submit(fake).json()["taskId"]
        s1, s2 = status(fake, first).json(), status(fake, second).json()
        assert s1["status"] == "queued" and s1["position"] == 0 and s2["position"] == 1
        assert s1["eta"] == int(fake.task(first).ready_at * 1000)
        time.sleep(max(0.0, fake.task(first).ready_at - time.time()) + 0.02)
        assert status(fake, first).json() == {"status": "completed"}


def test_status_unknown_or_foreign_task_is_404(fake):
    """Unknown task ids, and tasks of another key, are 404 JSON."""
    task_id = submit(fake).json()["taskId"]
    fake.add_key("other")
    assert status(fake, "no-such-task").status_code == 404
    assert status(fake, task_id, {"x-api-key": "other"}).status_code == 404
    assert result(fake, "no-such-task").json()["error"]


def test_status_options():
    """status_case='upper', eta=False and task_id_shape='object' change the JSON shapes."""
    with FakeClipdrop(status_case="upper", eta=False, task_id_shape="object", async_duration=5) as fake:
        body = submit(fake).json()
        task_id = body["taskId"]["value"]
        assert status(fake, task_id).json() == {"status": "QUEUED", "position": 0}
        fake.complete_now()
        assert status(fake, task_id).json() == {"status": "COMPLETED"}


def test_result_before_completion_is_400(fake):
    """Asking for the result of a queued task is a JSON 400."""
    r = result(fake, submit(fake).json()["taskId"])
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("mode,fmt,ctype", [("RGB", "JPEG", "image/jpeg"), ("RGBA", "PNG", "image/png")])
def test_result_and_download(fake, mode, fmt, ctype):
    """A completed task yields a signed URL on the storage host serving the resized image."""
    task_id = finished_task(fake, make_image("PNG", mode=mode), w=40, h=30)
    url = result(fake, task_id).json()["downloadUrl"]
    assert url.startswith(fake.storage_url + f"/results/{task_id}.")
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert 3590 < expires - time.time() <= 3600
    r = requests.get(url)
    img = Image.open(io.BytesIO(r.content))
    assert r.status_code == 200 and r.headers["Content-Type"] == ctype
    assert img.format == fmt and img.size == (40, 30)
    assert fake.leaks() == 0 and fake.calls("download")[-1].task_id == task_id


def test_download_with_api_key_counts_as_leak(fake):
    """A storage request carrying x-api-key is served but counted as a leak."""
    url = result(fake, finished_task(fake)).json()["downloadUrl"]
    assert requests.get(url, headers=H).status_code == 200
    rec = fake.calls("download")[-1]
    assert fake.leaks() == 1 and rec.key_sent and rec.key_ok and rec.api_key == KEY


def test_download_bad_or_expired_signature_is_403_xml(fake):
    """Tampered signatures and expired URLs are 403 with an S3-like XML body."""
    url = result(fake, finished_task(fake)).json()["downloadUrl"]
    flipped = url[:-1] + ("0" if url[-1] != "0" else "1")
    for bad in (flipped, url.split("&signature")[0], url.replace("expires=", "expires=1")):
        r = requests.get(bad)
        assert r.status_code == 403 and r.headers["Content-Type"] == "application/xml"
        assert r.text.startswith("<?xml")
    fake.url_ttl = 0
    r = requests.get(result(fake, finished_task(fake)).json()["downloadUrl"])
    assert r.status_code == 403 and "expired" in r.text


def test_failed_task(fake):
    """task-fail: submit is accepted and charged, status ends 'failed', result is 404."""
    fake.inject("submit", "task-fail")
    r = submit(fake)
    assert r.status_code == 200 and fake.charged() == 1
    task_id = r.json()["taskId"]
    fake.complete_now()
    assert status(fake, task_id).json() == {"status": "failed"}
    assert result(fake, task_id).status_code == 404


# -- rate limiting ------------------------------------------------------------------------------
@pytest.mark.parametrize("retry_after", [None, 7, "date"])
def test_rate_limit_sliding_window(retry_after):
    """rpm*window/60 calls pass per window (all API endpoints, not downloads); then 429."""
    with FakeClipdrop(rpm=240, window=0.5, retry_after=retry_after) as fake:  # 2 per 0.5 s
        task_id = finished_task(fake)
        url = result(fake, task_id).json()["downloadUrl"]
        assert requests.get(url).status_code == 200  # downloads are not rate limited
        r = status(fake, task_id)
        assert r.status_code == 429 and r.json()["error"]
        if retry_after is None:
            assert "Retry-After" not in r.headers
        elif retry_after == "date":
            assert parsedate_to_datetime(r.headers["Retry-After"]).timestamp() > time.time()
        else:
            assert r.headers["Retry-After"] == "7"
        time.sleep(0.52)
        assert status(fake, task_id).status_code == 200
        assert fake.rate_limited() == 1 and fake.charged() == 1


def test_rate_limit_is_per_key():
    """Each key has its own window."""
    with FakeClipdrop(rpm=60, window=1, keys={"a": 5, "b": 5}) as fake:
        assert status(fake, "x", {"x-api-key": "a"}).status_code == 404
        assert status(fake, "x", {"x-api-key": "a"}).status_code == 429
        assert status(fake, "x", {"x-api-key": "b"}).status_code == 404


# -- injected faults -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,code,ctype", [
    ("500", 500, "application/json"), ("502-html", 502, "text/html"), ("413-html", 413, "text/html"),
    ("401", 401, "application/json"), ("402", 402, "application/json"), ("403", 403, "application/json"),
    ("429", 429, "application/json"),
])
def test_rejecting_faults_do_not_charge(fake, kind, code, ctype):
    """Rejecting faults return their status/content type, charge nothing, then clear."""
    fake.inject("sync", kind)
    r = sync(fake)
    assert r.status_code == code and r.headers["Content-Type"] == ctype
    assert fake.charged() == 0 and fake.calls("sync")[-1].fault == kind
    assert sync(fake).status_code == 200 and fake.pending_faults() == []


@pytest.mark.parametrize("retry_after,expect", [(None, None), (3, "3"), ("date", "date")])
def test_injected_429_retry_after(fake, retry_after, expect):
    """An injected 429 carries Retry-After as requested (none, seconds or HTTP-date)."""
    fake.inject("status", "429", retry_after=retry_after)
    header = status(fake, "x").headers.get("Retry-After")
    if expect == "date":
        assert parsedate_to_datetime(header).timestamp() > time.time()
    else:
        assert header == expect
    assert fake.rate_limited() == 1


@pytest.mark.parametrize("endpoint", ["sync", "submit"])
@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_cut_before_processing_does_not_charge(fake, endpoint, kind):
    """reset/truncate on the POSTs break the response before processing: no charge."""
    fake.inject(endpoint, kind)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        (sync if endpoint == "sync" else submit)(fake)
    assert fake.charged() == 0 and fake.tasks() == []


@pytest.mark.parametrize("endpoint", ["sync", "submit"])
@pytest.mark.parametrize("kind", ["reset-after-charge", "truncate-after-charge"])
def test_cut_after_charge_charges(fake, endpoint, kind):
    """*-after-charge faults process and charge, then break the response; retries pay twice."""
    fake.inject(endpoint, kind)
    call = sync if endpoint == "sync" else submit
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        call(fake)
    assert call(fake).status_code == 200
    assert fake.charged() == 2 and list(fake.paid_twice().values()) == [2]


def test_reset_is_a_real_connection_reset(fake):
    """'reset' aborts with a TCP RST (ConnectionResetError), not a clean close."""
    fake.inject("status", "reset")
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="reset"):
        status(fake, "x")


def test_download_faults(fake):
    """Faults apply to the storage host too: truncated and reset downloads, then success."""
    url = result(fake, finished_task(fake)).json()["downloadUrl"]
    fake.inject("download", "truncate")
    fake.inject("download", "reset")
    for _ in range(2):
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(url)
    assert requests.get(url).status_code == 200
    assert [r.fault for r in fake.calls("download")] == ["truncate", "reset", None]


def test_slow_fault_triggers_client_timeout_but_charges(fake):
    """'slow' delays the answer; the request is still processed (and charged)."""
    fake.inject("sync", "slow", seconds=0.5)
    with pytest.raises(requests.exceptions.ReadTimeout):
        sync(fake, timeout=0.15)
    assert fake.charged() == 1


def test_expired_url_fault(fake):
    """'expired-url' makes the result endpoint hand out an already expired URL."""
    task_id = finished_task(fake)
    fake.inject("result", "expired-url")
    r = requests.get(result(fake, task_id).json()["downloadUrl"])
    assert r.status_code == 403 and "expired" in r.text
    assert requests.get(result(fake, task_id).json()["downloadUrl"]).status_code == 200


def test_redirect_fault_exposes_key_forwarding(fake):
    """'redirect' answers 302 to the same path on the storage host; following it with the key leaks."""
    fake.inject("status", "redirect")
    r = requests.get(f"{fake.base_url}/async-tasks/v1/task-status/x", headers=H, allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["Location"] == f"{fake.storage_url}/async-tasks/v1/task-status/x"
    assert fake.leaks() == 0
    fake.inject("status", "redirect")
    status(fake, "x")  # requests follows the redirect and keeps custom headers across hosts
    assert fake.leaks() == 1 and fake.calls("download")[-1].path == "/async-tasks/v1/task-status/x"


def test_faults_are_consumed_in_order_with_times_and_any(fake):
    """Queued faults match their endpoint (or 'any') and are consumed first-in first-out."""
    fake.inject("status", "500", times=2)
    fake.inject("any", "403")
    fake.inject("result", "401")
    codes = [status(fake, "x").status_code for _ in range(3)] + [result(fake, "x").status_code]
    assert codes == [500, 500, 403, 401] and fake.pending_faults() == []


def test_inject_validates_arguments(fake):
    """Unknown endpoints/kinds and endpoint-specific kinds elsewhere are rejected."""
    for args in (("nope", "500"), ("sync", "nope"), ("sync", "task-fail"), ("status", "expired-url")):
        with pytest.raises(ValueError):
            fake.inject(*args)


def test_chaos_is_deterministic_by_seed():
    """chaos(rate, kinds, seed) faults the same requests for the same seed; rate 0 disables."""
    def run(seed: int) -> list[int]:
        with FakeClipdrop(rpm=100_000) as fake:
            fake.chaos(0.5, ["500", "429"], seed=seed)
            return [status(fake, "x").status_code for _ in range(20)]

    first, again = run(7), run(7)
    assert first == again and {404, 500, 429} <= set(first)
    assert run(8) != first
    with FakeClipdrop() as fake:
        fake.chaos(0.0)
        assert status(fake, "x").status_code == 404


def test_chaos_skips_downloads(fake):
    """Chaos only hits API requests, never storage downloads."""
    url = result(fake, finished_task(fake)).json()["downloadUrl"]
    fake.chaos(1.0, ["500"])
    assert status(fake, "x").status_code == 500 and requests.get(url).status_code == 200


# -- lifecycle and command line ----------------------------------------------------------------------
def test_stop_closes_pooled_connections():
    """After stop(), even a pooled keep-alive connection gets no answer."""
    fake = FakeClipdrop().start()
    with requests.Session() as s:
        assert s.get(fake.base_url + "/nope").status_code == 404
        fake.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            s.get(fake.base_url + "/nope", timeout=2)


def test_command_line_server():
    """`python -m tests.fake_clipdrop` prints its base URL and exits cleanly on SIGTERM."""
    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-m", "tests.fake_clipdrop", "--port", "0", "--key", "k", "--credits", "3"]
    with subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            base_url = proc.stdout.readline().strip()
            r = requests.post(base_url + SYNC, headers={"x-api-key": "k"}, files={"image_file": ("a.png", make_image())},
                              data={"target_width": 4, "target_height": 4})
            assert r.status_code == 200 and r.headers["x-remaining-credits"] == "2"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
