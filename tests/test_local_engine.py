"""The local engine in-process: strips against the whole image, the streaming encoders, EXIF, memory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from folderd import local
from folderd.errors import ImageError
from folderd.imaging import exif_for_output, probe
from tests.harness import ROOT


def photo(size: tuple[int, int], mode: str = "RGB", seed: int = 40) -> Image.Image:
    """Something with texture, edges and gradients: noise over a gradient, with blocks."""
    width, height = size
    noise = Image.effect_noise(size, seed).convert("L")
    image = Image.merge("RGB", (noise, Image.linear_gradient("L").resize(size), noise.rotate(180)))
    image.paste((250, 20, 20), (width // 5, height // 5, width // 2, height // 2))
    image.paste((10, 10, 10), (width // 2, height // 2, width * 4 // 5, height * 4 // 5))
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").rotate(90).resize(size))
    return image


def assemble(image: Image.Image, width: int, height: int, strategy: str, rows: int) -> Image.Image:
    canvas = Image.new(image.mode, (width, height))
    tops = []
    for top, strip in local.render_strips(image, width, height, strategy, rows=rows):
        assert strip.size == (width, min(rows, height - top))
        canvas.paste(strip, (0, top))
        tops.append(top)
    assert tops == list(range(0, height, rows))
    return canvas


def differing(first: Image.Image, second: Image.Image, by_more_than: int) -> float:
    """Fraction of channel values that differ by more than `by_more_than`."""
    histogram = ImageChops.difference(first, second).histogram()
    bands = len(first.getbands())
    total = first.width * first.height * bands
    return sum(sum(histogram[band * 256 + by_more_than + 1 : band * 256 + 256]) for band in range(bands)) / total


# ------------------------------------------------------------------ strips


@pytest.mark.parametrize("strategy", ["smooth", "detailed"])
@pytest.mark.parametrize(("source", "target"), [((160, 120), (480, 360)), ((173, 101), (500, 317)), ((300, 200), (120, 80)), ((90, 300), (271, 900))])
def test_strips_equal_the_whole_image_result(strategy: str, source: tuple[int, int], target: tuple[int, int]) -> None:
    """Made strip by strip (32 rows each), the result equals the whole-image one within rounding."""
    image = photo(source)
    whole = local.render_whole(image, *target, strategy)
    strips = assemble(image, *target, strategy, rows=32)
    assert max(high for _, high in ImageChops.difference(whole, strips).getextrema()) <= 4
    assert differing(whole, strips, 1) < 0.002


def test_strips_with_alpha_equal_the_whole_image_where_visible() -> None:
    """RGBA is resampled premultiplied; where alpha is near 0 a rounding step is amplified, so compare premultiplied."""
    image = photo((150, 100), "RGBA")
    whole = local.render_whole(image, 400, 270, "detailed").convert("RGBa")
    strips = assemble(image, 400, 270, "detailed", rows=16).convert("RGBa")
    assert max(high for _, high in ImageChops.difference(whole, strips).getextrema()) <= 4
    assert differing(whole, strips, 1) < 0.002


def test_smooth_is_pillow_lanczos() -> None:
    """smooth is plain Lanczos: the same pixels as Pillow's own resize (it also does the horizontal pass first)."""
    image = photo((120, 90))
    assert ImageChops.difference(local.render_whole(image, 360, 270, "smooth"), image.resize((360, 270), Image.Resampling.LANCZOS)).getbbox() is None


def test_detailed_is_sharper_than_smooth_but_smooth_areas_stay_put() -> None:
    """The unsharp mask raises local contrast at edges; a flat area (below the threshold) is untouched."""
    image = Image.new("RGB", (60, 60), (120, 120, 120))
    image.paste((200, 200, 200), (30, 0, 60, 60))
    smooth = local.render_whole(image, 180, 180, "smooth")
    detailed = local.render_whole(image, 180, 180, "detailed")
    assert detailed.getpixel((10, 90)) == smooth.getpixel((10, 90)) == (120, 120, 120)
    row = [detailed.getpixel((x, 90))[0] for x in range(180)]
    assert min(row) < 120 and max(row) > 200  # under- and overshoot beside the edge


# ------------------------------------------------------------------ encoders


@pytest.fixture
def small_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strips of 16 rows, so that small test images are made of many strips."""
    monkeypatch.setattr(local, "STRIP_BYTES", 1)


@pytest.mark.parametrize("quality", [92, 75], ids=["q92-444", "q75-420"])
def test_jpeg_strips_join_into_one_jpeg_equal_to_a_whole_encode(tmp_path: Path, small_strips: None, quality: int) -> None:
    """Strips encoded separately and joined with restart markers decode to exactly the pixels of one whole encode."""
    source = tmp_path / "in.jpg"
    photo((200, 150)).save(source, quality=95)
    output = tmp_path / "out.jpg"
    assert local.upscale(source, output, 610, 457, "detailed", jpeg_quality=quality) == "JPEG"
    data = output.read_bytes()
    assert b"\xff\xdd" in data and data.count(b"\xff\xd0") >= 1  # DRI, and RST0 between strips
    reference = io.BytesIO()
    local.render(local.decode(source).image, 610, 457, "detailed").save(reference, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    with Image.open(output) as joined, Image.open(reference) as whole:
        assert joined.size == (610, 457) and joined.format == "JPEG"
        assert ImageChops.difference(joined.convert("RGB"), whole.convert("RGB")).getbbox() is None


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_written_row_by_row_is_lossless(tmp_path: Path, small_strips: None, mode: str) -> None:
    """folderd's own streaming PNG writer decodes to exactly the rendered pixels."""
    source = tmp_path / "in.png"
    photo((120, 80), mode).save(source)
    output = tmp_path / "out.png"
    assert local.upscale(source, output, 333, 222, "detailed") == "PNG"
    with Image.open(output) as written:
        written.load()
        assert written.mode == mode and written.size == (333, 222)
        expected = local.render(local.decode(source).image, 333, 222, "detailed")
        assert ImageChops.difference(written, expected).getbbox() is None


def test_webp_output_and_its_size_limit(tmp_path: Path) -> None:
    source = tmp_path / "in.webp"
    photo((100, 80)).save(source, quality=95)
    assert local.upscale(source, tmp_path / "out.webp", 200, 160, "smooth") == "WEBP"
    with Image.open(tmp_path / "out.webp") as written:
        assert written.size == (200, 160)
    with pytest.raises(ImageError, match="WebP is at most 16383 px"):
        local.upscale(source, tmp_path / "big.webp", 20000, 16000, "smooth")
    assert not (tmp_path / "big.webp").exists()


def test_requested_output_format_is_written_directly(tmp_path: Path) -> None:
    """output=png|jpeg|webp writes that format (deliver then has nothing to convert); alpha on JPEG goes on white."""
    source = tmp_path / "in.png"
    photo((40, 30), "RGBA").save(source)
    assert local.upscale(source, tmp_path / "out.jpg", 80, 60, "smooth", output="jpeg") == "JPEG"
    with Image.open(tmp_path / "out.jpg") as written:
        assert written.format == "JPEG" and written.mode == "RGB"


def test_damaged_input_is_an_image_error_and_leaves_no_output(tmp_path: Path) -> None:
    source = tmp_path / "cut.jpg"
    buffer = io.BytesIO()
    photo((300, 200)).save(buffer, "JPEG")
    source.write_bytes(buffer.getvalue()[:3000])
    with pytest.raises(ImageError, match="damaged or truncated"):
        local.upscale(source, tmp_path / "out.jpg", 600, 400, "smooth")
    assert not (tmp_path / "out.jpg").exists()


# ------------------------------------------------------------------ metadata


def test_exif_for_output_resets_orientation_updates_size_and_drops_layout_tags() -> None:
    exif = Image.Exif()
    exif.update({0x0112: 8, 0x010F: "Cam", 0x0100: 64, 0x0101: 48, 0x0111: 8, 0x0117: 1000, 0x8773: b"icc"})
    exif.get_ifd(0x8769)[0x9003] = "2024:01:02 03:04:05"
    out = Image.Exif()
    out.load(exif_for_output(exif, 300, 400))
    assert out[0x0112] == 1 and out[0x010F] == "Cam"
    assert not {0x0100, 0x0101, 0x0111, 0x0117, 0x8773} & set(out)
    assert out.get_ifd(0x8769) == {0x9003: "2024:01:02 03:04:05", 0xA002: 300, 0xA003: 400}


def test_exif_for_output_fits_jpeg_by_dropping_the_maker_note() -> None:
    exif = Image.Exif()
    exif[0x010F] = "Cam"
    exif.get_ifd(0x8769)[0x927C] = b"\x00" * 70_000
    assert len(exif_for_output(exif, 10, 10) or b"") > 70_000
    fitted = exif_for_output(exif, 10, 10, limit=65_533)
    assert fitted is not None and len(fitted) < 1000
    raw = exif.tobytes()[6:]  # as WebP keeps it: no "Exif\0\0" header
    assert (exif_for_output(raw, 5, 5) or b"").startswith(b"Exif\x00\x00")
    assert exif_for_output(b"garbage", 5, 5) is None


def test_tiff_orientation_is_counted_once(tmp_path: Path) -> None:
    """Pillow's TIFF plugin already reports the upright size: probe() must not turn it again."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo((60, 40)).save(tmp_path / "r.tif", exif=exif)
    photo((60, 40)).save(tmp_path / "r.jpg", exif=exif)
    for name in ("r.tif", "r.jpg"):
        info = probe(tmp_path / name)
        assert (info.width, info.height) == (40, 60) == local.decode(tmp_path / name).image.size


# ------------------------------------------------------------------ memory


def test_budget_refuses_a_job_it_could_never_fit_and_queues_one_that_must_wait() -> None:
    budget = local.MemoryBudget(100)
    with pytest.raises(ImageError, match=r"needs about 0 MB of memory, over the local engine's budget"):
        with budget.reserve(101, "a job"):
            pass
    order: list[str] = []
    with budget.reserve(60, "first"):
        waiter = threading.Thread(target=lambda: (budget.reserve(60, "second").__enter__(), order.append("second")))
        waiter.start()
        time.sleep(0.2)
        assert order == [] and waiter.is_alive()  # 60 + 60 > 100: the second waits
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"]


def test_budget_setting_is_parsed_and_a_bad_one_fails_jobs_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    assert local._parse_bytes("1.5GB") == 1_500_000_000 and local._parse_bytes("512MiB") == 512 << 20 and local._parse_bytes("4096") == 4096
    monkeypatch.setenv("FOLDERD_LOCAL_MEMORY_BUDGET", "lots")
    bad = local._initial_budget()
    with pytest.raises(ImageError, match="FOLDERD_LOCAL_MEMORY_BUDGET: not a size"):
        with bad.reserve(1, "a job"):
            pass


_PEAK_SCRIPT = """
import json, resource, sys, time
from pathlib import Path
from folderd import local
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
began = time.perf_counter()
local.upscale(Path(sys.argv[1]), Path(sys.argv[2]), 6000, 4500, "detailed")
print(json.dumps({"before": start * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - began}))
"""


def test_a_large_upscale_never_holds_the_whole_output(tmp_path: Path) -> None:
    """1000x750 -> 6000x4500 (27 MP) detailed JPEG: peak RSS grows by far less than one full-size copy (108 MB)."""
    source = tmp_path / "in.jpg"
    photo((1000, 750)).save(source, quality=90)
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(source), str(tmp_path / "out.jpg")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    full_copy = 6000 * 4500 * 4
    assert measured["peak"] - measured["before"] < full_copy * 0.75, measured
    with Image.open(tmp_path / "out.jpg") as written:
        assert written.size == (6000, 4500)
        written.draft("RGB", (750, 563))  # decode at 1/8 scale: a quick look that every strip is in place
        small = written.convert("RGB").resize((200, 150), Image.Resampling.BOX)
    expected = photo((1000, 750)).resize((200, 150), Image.Resampling.BOX)
    assert max(ImageStat.Stat(ImageChops.difference(small, expected)).mean) < 8


# ------------------------------------------------------------------ metadata for API results


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 90}), ("WEBP", {"lossless": True}), ("WEBP-alpha", {"lossless": True})],
    ids=["jpeg", "png", "webp-lossy", "webp-lossless", "webp-alpha"],
)
def test_reattach_metadata_puts_profile_and_exif_into_an_api_result_without_reencoding(tmp_path: Path, fmt: str, options: dict) -> None:
    """An API result (no ICC, no EXIF) gets the original's profile bytes and EXIF (orientation 1, its own size); pixels untouched."""
    from PIL import ImageCms

    from folderd.imaging import reattach_metadata

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif.update({0x0112: 6, 0x010F: "FolderdCam", 0x0110: "Model 7", 0x0132: "2024:05:06 07:08:09"})
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"
    original = tmp_path / "original.jpg"
    photo((60, 40)).save(original, quality=95, icc_profile=profile, exif=exif)
    result = tmp_path / "result"
    made = photo((80, 120), "RGBA" if fmt == "WEBP-alpha" else "RGB")
    made.save(result, fmt.split("-")[0], **options)
    with Image.open(result) as before:
        pixels = before.convert("RGBA").tobytes()
    assert reattach_metadata(original, result) is True
    with Image.open(result) as after:
        assert after.info.get("icc_profile") == profile
        out = after.getexif()
        assert after.convert("RGBA").tobytes() == pixels
    assert out[0x0112] == 1 and out[0x010F] == "FolderdCam" and out[0x0110] == "Model 7" and out[0x0132] == "2024:05:06 07:08:09"
    assert out.get_ifd(0x8769)[0x9003] == "2024:05:06 07:08:09"
    assert (out.get_ifd(0x8769)[0xA002], out.get_ifd(0x8769)[0xA003]) == (80, 120)
    assert reattach_metadata(original, result) is True  # again: replaced, not doubled
    with Image.open(result) as again:
        assert again.info.get("icc_profile") == profile
    if fmt == "JPEG":
        assert result.read_bytes().count(b"ICC_PROFILE\x00") == 1


def test_reattach_metadata_with_nothing_to_carry_leaves_the_result_alone(tmp_path: Path) -> None:
    from folderd.imaging import reattach_metadata

    photo((20, 20)).save(tmp_path / "plain.png")
    photo((40, 40)).save(tmp_path / "result.png")
    before = (tmp_path / "result.png").read_bytes()
    assert reattach_metadata(tmp_path / "plain.png", tmp_path / "result.png") is False
    assert (tmp_path / "result.png").read_bytes() == before
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert reattach_metadata(tmp_path / "broken.jpg", tmp_path / "result.png") is False
