"""End to end with the local backend: every input format folderd takes, and metadata, drop -> outbox.

Each sample is made here with Pillow (and pillow-heif for HEIC); each test runs the real
daemon (`folderd once`) and looks at what lands in the outbox, done/ and failed/.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageCms, ImageOps, ImageStat

import folderd.imaging  # noqa: F401 - registers pillow-heif's HEIC/HEIF opener and saver
from tests.fake_clipdrop import FakeClipdrop
from tests.harness import Setup, files

SIZE = (64, 48)
PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def picture(size: tuple[int, int] = SIZE, mode: str = "RGB") -> Image.Image:
    """A test card: a gradient, a red block and a blue corner (so a wrong rotation shows)."""
    width, height = size
    image = Image.merge("RGB", (Image.linear_gradient("L").resize(size), Image.linear_gradient("L").rotate(90).resize(size), Image.new("L", size, 90)))
    image.paste((220, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    image.paste((20, 20, 230), (0, 0, width // 6, height // 6))
    if mode in ("RGBA", "LA", "PA"):
        alpha = Image.linear_gradient("L").rotate(-90).resize(size).point(lambda value: 40 + value * 215 // 255)
        image = image.convert("RGBA")
        image.putalpha(alpha)
        return image.convert(mode) if mode != "RGBA" else image
    return image.convert(mode)


def _png_16bit_rgb(path: Path) -> None:
    """Pillow writes no 16-bit RGB PNG: build one (colour type 2, bit depth 16) by hand."""
    base = picture()
    width, height = base.size
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            for value in base.getpixel((x, y)):
                rows += struct.pack(">H", value * 257)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )


def _rotated_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
    picture().save(path, "JPEG", quality=95, exif=exif)


def _cmyk_jpeg(path: Path) -> None:
    picture().convert("CMYK").save(path, "JPEG", quality=95)


def _multipage_tiff(path: Path) -> None:
    picture().save(path, "TIFF", save_all=True, append_images=[Image.new("RGB", (30, 30), (0, 255, 0))])


def _animated_gif(path: Path) -> None:
    first = picture().quantize(64)
    first.info["transparency"] = 0
    second = Image.new("RGB", SIZE, (0, 255, 0)).quantize(64)
    first.save(path, "GIF", save_all=True, append_images=[second], duration=100, loop=0, transparency=0)


def _animated_webp(path: Path) -> None:
    picture().save(path, "WEBP", save_all=True, append_images=[Image.new("RGB", SIZE, (0, 255, 0))], quality=95, duration=100)


def _saver(mode: str, fmt: str, **options: object) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        image = picture(mode=mode) if mode in ("RGB", "RGBA", "L", "LA") else picture()
        if mode == "I;16":
            image = image.convert("I").point(lambda value: value * 257).convert("I;16")
        elif mode == "P":
            image = picture().quantize(64)
        elif mode == "P+transparency":
            image = picture().quantize(64)
            image.info["transparency"] = 0
            options.setdefault("transparency", 0)
        image.save(path, fmt, **options)

    return save


# (id, file name, maker, the output format expected, whether the output keeps alpha)
FORMATS = [
    ("jpeg", "a.jpg", _saver("RGB", "JPEG", quality=95), "JPEG", False),
    ("jpeg-exif-rotated", "a.jpg", _rotated_jpeg, "JPEG", False),
    ("jpeg-cmyk", "a.jpg", _cmyk_jpeg, "JPEG", False),
    ("jpeg-grey", "a.jpg", _saver("L", "JPEG", quality=95), "JPEG", False),
    ("png", "a.png", _saver("RGB", "PNG"), "PNG", False),
    ("png-16bit-grey", "a.png", _saver("I;16", "PNG"), "PNG", False),
    ("png-16bit-rgb", "a.png", _png_16bit_rgb, "PNG", False),
    ("png-palette", "a.png", _saver("P", "PNG"), "PNG", False),
    ("png-palette-transparent", "a.png", _saver("P+transparency", "PNG"), "PNG", True),
    ("png-rgba", "a.png", _saver("RGBA", "PNG"), "PNG", True),
    ("png-grey-alpha", "a.png", _saver("LA", "PNG"), "PNG", True),
    ("webp", "a.webp", _saver("RGB", "WEBP", quality=95), "WEBP", False),
    ("webp-alpha-lossless", "a.webp", _saver("RGBA", "WEBP", lossless=True), "WEBP", True),
    ("webp-animated", "a.webp", _animated_webp, "WEBP", False),
    ("tiff", "a.tif", _saver("RGB", "TIFF", compression="tiff_lzw"), "PNG", False),
    ("tiff-multipage", "a.tif", _multipage_tiff, "PNG", False),
    ("tiff-16bit-grey", "a.tif", _saver("I;16", "TIFF"), "PNG", False),
    ("bmp", "a.bmp", _saver("RGB", "BMP"), "PNG", False),
    ("gif", "a.gif", _saver("P", "GIF"), "PNG", False),
    ("gif-animated-transparent", "a.gif", _animated_gif, "PNG", True),
    ("heic", "a.heic", _saver("RGB", "HEIF", quality=95), "JPEG", False),
    ("avif", "a.avif", _saver("RGB", "AVIF", quality=95), "JPEG", False),
]
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


def expected_upright(path: Path, alpha: bool) -> Image.Image:
    """What the input looks like upright, first frame, as Pillow decodes it."""
    with Image.open(path) as image:
        image.seek(0)
        image.load()
        upright = ImageOps.exif_transpose(image)
        if upright.mode.startswith("I;16"):
            upright = upright.point(lambda value: value / 256).convert("L")
        return upright.convert("RGBA" if alpha else "RGB")


def mean_difference(first: Image.Image, second: Image.Image) -> float:
    return max(ImageStat.Stat(ImageChops.difference(first, second)).mean)


def make_setup(tmp_path: Path, backend: str, request: pytest.FixtureRequest, **overrides: object) -> Setup:
    """A one-folder setup on the local engine, or on the fake Clipdrop API (started for the test)."""
    if backend == "local":
        return Setup(tmp_path, backend="local", **overrides)  # type: ignore[arg-type]
    fake: FakeClipdrop = request.getfixturevalue("fake")
    return Setup(tmp_path, backend="clipdrop", base_url=fake.base_url, **overrides).with_key()  # type: ignore[arg-type]


def api_format(alpha: bool) -> str:
    """What the API returns: WebP when the image has transparency, JPEG when not."""
    return "WEBP" if alpha else "JPEG"


@pytest.mark.parametrize("backend", ["local", "clipdrop"])
@pytest.mark.parametrize(("name", "make", "fmt", "alpha"), [case[1:] for case in FORMATS], ids=[case[0] for case in FORMATS])
def test_each_input_format_goes_from_inbox_to_outbox(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str, name: str, make: Callable[[Path], None], fmt: str, alpha: bool
) -> None:
    """Every format folderd takes is upscaled 2x by either backend, upright, first frame/page, colours kept."""
    setup = make_setup(tmp_path, backend, request)
    if backend == "clipdrop":
        fmt = api_format(alpha)
    source = setup.inbox / name
    source.parent.mkdir(parents=True, exist_ok=True)
    make(source)
    expected = expected_upright(source, alpha)
    result = setup.once()
    assert result.returncode == 0, result.stderr[-3000:]
    output_name = Path(name).stem + SUFFIX[fmt]
    assert files(setup.outbox) == [output_name], (files(setup.failed), [p.read_text() for p in setup.failed.glob("*.json")])
    assert files(setup.done) == [name]
    assert files(setup.failed) == []
    with Image.open(setup.outbox / output_name) as output:
        assert output.format == fmt
        assert output.size == (expected.width * 2, expected.height * 2)
        assert ("A" in output.getbands()) == alpha
        output.seek(0)
        reduced = output.convert("RGBA" if alpha else "RGB").resize(expected.size, Image.Resampling.BOX)
    if alpha:  # colour matters only where it is visible: compare premultiplied
        reduced, expected = reduced.convert("RGBa"), expected.convert("RGBa")
    assert mean_difference(reduced, expected) < 6, "the output does not look like the input (colours, rotation or frame)"


# ------------------------------------------------------------------ metadata


def _exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "FolderdCam"       # Make
    exif[0x0110] = "Model 7"          # Model
    exif[0x0132] = "2024:05:06 07:08:09"  # DateTime
    exif[0x8298] = "(c) folderd tests"    # Copyright
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal
    return exif


METADATA_INPUTS = [
    ("jpeg", "m.jpg", "JPEG", "JPEG"),
    ("png", "m.png", "PNG", "PNG"),
    ("webp", "m.webp", "WEBP", "WEBP"),
    ("tiff", "m.tif", "TIFF", "PNG"),
    ("heic", "m.heic", "HEIF", "JPEG"),
    ("avif", "m.avif", "AVIF", "JPEG"),
]


def check_metadata(path: Path, size: tuple[int, int], *, exif_ifd: bool = True) -> None:
    with Image.open(path) as output:
        assert output.size == size
        assert output.info.get("icc_profile") == PROFILE, "the colour profile's bytes changed or were lost"
        exif = output.getexif()
    assert exif.get(0x0112) == 1, "the pixels are upright: orientation must be 1"
    assert exif.get(0x010F) == "FolderdCam" and exif.get(0x0110) == "Model 7"
    assert exif.get(0x0132) == "2024:05:06 07:08:09" and exif.get(0x8298) == "(c) folderd tests"
    sub = exif.get_ifd(0x8769)
    if exif_ifd:
        assert sub.get(0x9003) == "2024:05:06 07:08:09"
    assert (sub.get(0xA002), sub.get(0xA003)) == size, "EXIF pixel dimensions must describe the output"


@pytest.mark.parametrize("backend", ["local", "clipdrop"])
@pytest.mark.parametrize(("name", "fmt", "out_fmt"), [case[1:] for case in METADATA_INPUTS], ids=[case[0] for case in METADATA_INPUTS])
def test_icc_profile_and_exif_survive_the_trip(tmp_path: Path, request: pytest.FixtureRequest, backend: str, name: str, fmt: str, out_fmt: str) -> None:
    """The profile's bytes are kept; EXIF keeps Make/Model/DateTime/... with orientation 1 and the new size (the API's
    result carries neither: folderd puts them back)."""
    setup = make_setup(tmp_path, backend, request)
    if backend == "clipdrop":
        out_fmt = api_format(False)
    source = setup.inbox / name
    source.parent.mkdir(parents=True)
    picture().save(source, fmt, icc_profile=PROFILE, exif=_exif(), quality=95)
    upright = expected_upright(source, False)
    result = setup.once()
    assert result.returncode == 0, result.stderr[-3000:]
    output = setup.outbox / (Path(name).stem + SUFFIX[out_fmt])
    assert files(setup.outbox) == [output.name]
    # Pillow's TIFF writer leaves the Exif sub-IFD (DateTimeOriginal) out of the sample itself.
    check_metadata(output, (upright.width * 2, upright.height * 2), exif_ifd=fmt != "TIFF")
    with Image.open(output) as image:  # and the pixels were turned, not only the tag reset
        reduced = image.convert("RGB").resize(upright.size, Image.Resampling.BOX)
    assert mean_difference(reduced, upright) < 6


CONVERSIONS = [
    pytest.param("m.jpg", "JPEG", "png", id="jpeg-to-png"),
    pytest.param("m.jpg", "JPEG", "webp", id="jpeg-to-webp"),
    pytest.param("m.png", "PNG", "jpeg", id="png-to-jpeg"),
    pytest.param("m.png", "PNG", "webp", id="png-to-webp"),
    pytest.param("m.webp", "WEBP", "jpeg", id="webp-to-jpeg"),
]


@pytest.mark.parametrize(("name", "fmt", "wanted"), CONVERSIONS)
def test_output_format_conversion_keeps_metadata(tmp_path: Path, name: str, fmt: str, wanted: str) -> None:
    """With output.format set, the delivered file is in that format and still has the profile and EXIF."""
    setup = Setup(tmp_path, backend="local", folder={"output": {"format": wanted}})
    source = setup.inbox / name
    source.parent.mkdir(parents=True)
    picture().save(source, fmt, icc_profile=PROFILE, exif=_exif(), quality=95)
    result = setup.once()
    assert result.returncode == 0, result.stderr[-3000:]
    suffix = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}[wanted]
    assert files(setup.outbox) == ["m" + suffix]
    with Image.open(setup.outbox / ("m" + suffix)) as output:
        assert output.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[wanted]
    check_metadata(setup.outbox / ("m" + suffix), (SIZE[1] * 2, SIZE[0] * 2))


# ------------------------------------------------------------------ memory budget


def test_job_over_the_memory_budget_fails_with_a_clear_reason(tmp_path: Path) -> None:
    """A job whose estimated peak is over the engine's budget goes to failed/ saying so; a small one passes."""
    setup = Setup(tmp_path, backend="local")
    setup.env["FOLDERD_LOCAL_MEMORY_BUDGET"] = "40MB"
    setup.inbox.mkdir(parents=True)
    picture((1600, 1200)).save(setup.inbox / "big.png")
    picture((64, 48)).save(setup.inbox / "small.png")
    result = setup.once()
    assert result.returncode == 1, result.stderr[-3000:]  # once: 1 = some file failed
    assert files(setup.outbox) == ["small.png"]
    assert files(setup.failed) == ["big.png", "big.png.error.json"]
    report = json.loads((setup.failed / "big.png.error.json").read_text())
    reason = report["reason"]
    assert "1600x1200 to 3200x2400" in reason and "memory" in reason and "budget of 40 MB" in reason, reason
