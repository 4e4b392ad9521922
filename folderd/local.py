"""The embedded local engine: upscaling with no network and nothing to pay.

Strategies
    smooth    Lanczos-3 resampling (Pillow's: the very same pixels), alpha premultiplied.
    detailed  the same, then an unsharp mask on the colour channels (never on alpha):
              U + amount x (U - blur(U)) wherever |U - blur(U)| >= threshold, blur a Gaussian of
              sigma DETAILED_RADIUS_PER_FACTOR x the upscale factor (output px), amount
              DETAILED_PERCENT %, threshold DETAILED_THRESHOLD levels (smaller differences, flat
              areas and faint JPEG noise, are left alone). Only when the image is enlarged; a
              reduction is plain Lanczos. blur(U) is computed as Lanczos(blur'(input)): see
              "rendering" below.

The parameters were chosen with bench/quality.py --tune (PSNR and SSIM of box-downscaled
photos upscaled back, against the originals, at 2x and 4x, from lossless and JPEG-q85
inputs, on scikit-image's photos); the grid and the scores are in bench/README.md.

Bounded memory
    The output is made in horizontal strips. Each strip is resampled from just the input rows
    its Lanczos support reads (horizontal pass, then vertical); the strips put together equal
    the whole-image result (`render_whole`) to within a level of rounding. JPEG and PNG are
    encoded as the strips come, so a full-size output never exists in memory:
      JPEG  each strip is a baseline JPEG of its own (same tables: optimize off); their
            entropy-coded data are joined with restart markers (DRI = one strip), which is a
            valid single JPEG whose pixels are exactly those of a whole-image encode.
      PNG   folderd writes the PNG itself: rows with the Average filter (within 1 % of
            Pillow's adaptive filtering on photos), deflated as they come.
      WebP  libwebp needs the whole picture: the strips are assembled into one image first
            (about 16 bytes an output pixel at the peak).
    4000x3000 -> 12000x9000 detailed to JPEG peaks under 200 MB RSS (Pillow's whole-image
    path: 1.3 GB); bench/local_speed.py measures it. Before decoding, each job reserves its
    estimated peak (estimate_memory) from a budget shared by the engine's workers
    (FOLDERD_LOCAL_MEMORY_BUDGET, e.g. "2GB", or set_memory_budget(); by default half the
    machine's or the cgroup's memory). A job that could never fit fails with an ImageError
    that says so; one that fits, but not beside the jobs now running, waits for them.

Inputs and metadata
    Any format imaging.probe() takes: JPEG (CMYK converted to sRGB through its profile),
    PNG (16-bit scaled to 8 bits, palette, alpha), WebP, TIFF, BMP, GIF, HEIC/HEIF, AVIF.
    Multi-frame files give their FIRST frame or page only (TIFF pages, GIF/WebP animations,
    HEIF sequences: the primary image). EXIF orientation is applied before anything else.
    The output carries the input's ICC profile (when it describes RGB: a CMYK or grey
    profile no longer describes the pixels) and EXIF (orientation 1, pixel dimensions
    updated, a TIFF's layout tags dropped: imaging.exif_for_output).

Several files at once run in the daemon's "local" worker pool (config local_workers, by
default one a core): Pillow releases the GIL while it decodes, resamples, filters and
encodes, so 2 workers beat 1 (bench/local_speed.py).
"""

from __future__ import annotations

import io
import math
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageChops, ImageFilter, ImageOps

from folderd.errors import ImageError
from folderd.imaging import (
    JPEG_EXIF_LIMIT,
    MAX_INPUT_PIXELS,
    _describe,
    exif_for_output,
    flatten_mode,
    icc_for_rgb,
    metadata_of,
)

# Chosen with bench/quality.py --tune (grid and scores in bench/README.md): among radius
# 0.25-0.5 x factor, amount 50-100 % and threshold 0-6, the combination whose worst case
# (2x and 4x; lossless and JPEG-q85 inputs) gains most over plain Lanczos on both PSNR and
# SSIM. The worst case is always 2x from a JPEG: at 0.5 x factor every amount sharpens its
# block noise into a loss (-0.03 dB at 50 %); at 0.4 x factor and 50 % a threshold of 4
# levels turns that into a gain (+0.030 dB, SSIM +0.0018) for 0.03 dB less on lossless
# inputs. Thresholds under 3 do nothing at amounts under 100 % (a 1-level difference times
# 0.5 rounds to 0).
DETAILED_RADIUS_PER_FACTOR = 0.4
DETAILED_PERCENT = 50
DETAILED_THRESHOLD = 4

LANCZOS = Image.Resampling.LANCZOS
LANCZOS_SUPPORT = 3.0
STRIP_BYTES = 8 << 20        # one strip buffer (4 bytes a pixel in memory) is about this big
WEBP_MAX_SIDE = 16_383
PNG_COMPRESS_LEVEL = 3       # as Pillow's compress_level=3: fast, a little larger than 6
_IDAT_CHUNK = 1 << 20
OUTPUT_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


# ---------------------------------------------------------------------------- choices


def output_format(input_format: str, has_alpha: bool) -> str:
    """JPEG stays JPEG, PNG stays PNG, WebP stays WebP; phone formats become JPEG; the rest PNG."""
    if has_alpha:
        return "WEBP" if input_format == "WEBP" else "PNG"
    if input_format in ("JPEG", "HEIF", "AVIF", "MPO"):
        return "JPEG"
    if input_format == "WEBP":
        return "WEBP"
    return "PNG"


def detailed_radius(factor: float) -> float:
    """The unsharp mask's radius (Gaussian sigma, output px) for an upscale by `factor`: 0.8 px at 2x, 1.6 px at 4x."""
    return DETAILED_RADIUS_PER_FACTOR * factor


def _strip_rows(width: int) -> int:
    """Output rows per strip: about STRIP_BYTES a buffer, a multiple of 16 (a JPEG MCU row)."""
    rows = STRIP_BYTES // (4 * max(1, width))
    rows = max(16, min(1024, rows))
    return rows - rows % 16


# ---------------------------------------------------------------------------- rendering
#
# detailed = U + amount x (U - blur(U)) where |U - blur(U)| >= threshold, U the Lanczos result
# and blur a Gaussian of sigma DETAILED_RADIUS_PER_FACTOR x factor output pixels: an unsharp
# mask whose radius grows with the factor. Blurring and resampling are both linear and
# shift-invariant, so blur(U) is computed as Lanczos(blur'(input)) where blur' is the same
# Gaussian at input resolution (sigma DETAILED_RADIUS_PER_FACTOR input px, as the 5x5
# band-limited kernel below): a blur of a factor^2 smaller image, and the strips need no
# extra rows for it. Sharpening a 4 MP output so costs 95 ms instead of the 130 ms of
# Pillow's UnsharpMask on the output (its box blurs alone cost more than the resampling);
# bench/quality.py scores that textbook form beside it (bench/README.md).


@lru_cache(maxsize=8)
def _gaussian_taps(sigma: float) -> tuple[float, ...]:
    """5 taps of a Gaussian of `sigma` px applied to a band-limited (sampled) signal.

    h[n] = integral over |f| < 1/2 of exp(-2 pi^2 sigma^2 f^2) cos(2 pi f n) df, normalised: for
    sigma under a pixel, sampling exp(-n^2 / 2 sigma^2) itself would be nearly the identity.
    """
    steps = 4000
    taps = []
    for n in range(-2, 3):
        total = 0.0
        for step in range(steps):
            f = (step + 0.5) / steps - 0.5
            total += math.exp(-2 * math.pi**2 * sigma**2 * f * f) * math.cos(2 * math.pi * f * n)
        taps.append(total / steps)
    norm = sum(taps)
    return tuple(tap / norm for tap in taps)


def _pad2(piece: Image.Image) -> Image.Image:
    """`piece` with 2 px of its own edge pixels around it (Pillow's 5x5 filter leaves 2 px unfiltered)."""
    width, height = piece.size
    padded = Image.new(piece.mode, (width + 4, height + 4))
    padded.paste(piece, (2, 2))
    for offset in (0, 1):  # the outer rows, then the outer columns (corners included)
        padded.paste(piece.crop((0, 0, width, 1)), (2, offset))
        padded.paste(piece.crop((0, height - 1, width, height)), (2, height + 2 + offset))
    for offset in (0, 1):
        padded.paste(padded.crop((2, 0, 3, height + 4)), (offset, 0))
        padded.paste(padded.crop((width + 1, 0, width + 2, height + 4)), (width + 2 + offset, 0))
    return padded


def blurred_input(image: Image.Image, sigma: float, *, band: int = 256) -> Image.Image:
    """`image` (RGB or RGBA, RGBA blurred premultiplied) under a Gaussian of `sigma` px, edges replicated.

    Made in bands of rows, so that it costs one more copy of the input and no more.
    """
    taps = _gaussian_taps(round(sigma, 4))
    kernel = ImageFilter.Kernel((5, 5), [a * b for a in taps for b in taps], scale=1)
    mode = "RGBa" if image.mode == "RGBA" else image.mode
    width, height = image.size
    blurred = Image.new(mode, image.size)
    for top in range(0, height, band):
        bottom = min(height, top + band)
        first, last = max(0, top - 2), min(height, bottom + 2)
        piece = image.crop((0, first, width, last))
        if mode == "RGBa":
            piece = piece.convert("RGBa")
        filtered = _pad2(piece).filter(kernel)
        blurred.paste(filtered.crop((2, 2 + top - first, width + 2, 2 + bottom - first)), (0, top))
    return blurred.convert("RGBA") if mode == "RGBa" else blurred


@lru_cache(maxsize=8)
def _mask_table(percent: int, threshold: int) -> list[int]:
    """For d = U - blur + 128: 128 + the correction Pillow's UnsharpMask would add, per channel."""
    table = []
    for value in range(256):
        difference = value - 128
        correction = 0 if abs(difference) < threshold else int(difference * percent / 100)
        table.append(max(0, min(255, 128 + correction)))
    return table * 3


def sharpen(sharp: Image.Image, blurred: Image.Image) -> Image.Image:
    """Unsharp-mask `sharp` given its blurred version: colours only, never the alpha edge."""
    alpha = None
    if sharp.mode == "RGBA":
        alpha = sharp.getchannel("A")
        sharp, blurred = sharp.convert("RGB"), blurred.convert("RGB")
    difference = ImageChops.subtract(sharp, blurred, 1.0, 128)
    result = ImageChops.add(sharp, difference.point(_mask_table(DETAILED_PERCENT, DETAILED_THRESHOLD)), 1.0, -128)
    return Image.merge("RGBA", (*result.split(), alpha)) if alpha is not None else result


@dataclass(frozen=True)
class _Geometry:
    source: tuple[int, int]
    target: tuple[int, int]
    sharpen: bool

    @classmethod
    def of(cls, source: tuple[int, int], target: tuple[int, int], strategy: str) -> _Geometry:
        factor = max(target[0] / source[0], target[1] / source[1])
        return cls(source, target, strategy == "detailed" and factor > 1)

    def input_rows(self, first: int, last: int) -> tuple[int, int]:
        """Input rows [r0, r1) that Lanczos reads to make output rows [first, last)."""
        source_height, height = self.source[1], self.target[1]
        scale = source_height / height
        support = LANCZOS_SUPPORT * max(1.0, scale)
        r0 = max(0, math.floor((first + 0.5) * scale - support) - 2)
        r1 = min(source_height, math.ceil((last - 0.5) * scale + support) + 2)
        return r0, r1


def _resample(image: Image.Image, first: int, last: int, geometry: _Geometry) -> Image.Image:
    """Output rows [first, last), resampled from just the input rows they read.

    Horizontal pass then vertical, in premultiplied alpha (RGBa) like Pillow's own resize.
    """
    (source_width, source_height), (width, height) = geometry.source, geometry.target
    r0, r1 = geometry.input_rows(first, last)
    band = image.crop((0, r0, source_width, r1))
    rgba = band.mode == "RGBA"
    if rgba:
        band = band.convert("RGBa")
    if width != source_width:
        band = band.resize((width, r1 - r0), LANCZOS)
    if height != source_height:
        scale = source_height / height
        band = band.resize((width, last - first), LANCZOS, box=(0, first * scale - r0, width, last * scale - r0))
    else:
        band = band.crop((0, first - r0, width, last - r0))
    return band.convert("RGBA") if rgba else band


def render_strips(image: Image.Image, width: int, height: int, strategy: str, *, rows: int | None = None) -> Iterator[tuple[int, Image.Image]]:
    """Yield (top, strip) for the upscaled image, top to bottom; strips are `rows` high but the last.

    `image` is RGB or RGBA (imaging.flatten_mode). Memory: the input (twice for detailed: it
    and its blurred copy) and a few strips, never the whole output.
    """
    geometry = _Geometry.of(image.size, (width, height), strategy)
    blurred = blurred_input(image, DETAILED_RADIUS_PER_FACTOR) if geometry.sharpen else None
    rows = rows or _strip_rows(width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = _resample(image, top, bottom, geometry)
        if blurred is not None:
            band = sharpen(band, _resample(blurred, top, bottom, geometry))
        yield top, band


def render_whole(image: Image.Image, width: int, height: int, strategy: str) -> Image.Image:
    """The same result made at once, the reference the strips are tested against (needs the memory)."""
    geometry = _Geometry.of(image.size, (width, height), strategy)
    result = _resample(image, 0, height, geometry)
    if geometry.sharpen:
        result = sharpen(result, _resample(blurred_input(image, DETAILED_RADIUS_PER_FACTOR), 0, height, geometry))
    return result


def render(image: Image.Image, width: int, height: int, strategy: str) -> Image.Image:
    """The strips assembled into one image (for benchmarks and callers that want an Image)."""
    canvas = Image.new(image.mode, (width, height))
    for top, strip in render_strips(image, width, height, strategy):
        canvas.paste(strip, (0, top))
    return canvas


# ---------------------------------------------------------------------------- memory budget


def _parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30}
    stripped = text.strip().lower().replace(" ", "").replace("_", "")
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number) :]
    if unit not in units or not number:
        raise ValueError(f"not a size: {text!r} (say e.g. 1500MB or 2GB)")
    return int(float(number) * units[unit])


def _machine_memory() -> int:
    """The memory this process may use: physical memory, or less under a cgroup limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        total = 4 << 30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def default_budget() -> int:
    configured = os.environ.get("FOLDERD_LOCAL_MEMORY_BUDGET")
    if configured:
        return _parse_bytes(configured)
    return _machine_memory() // 2


class MemoryBudget:
    """Bytes the local engine's jobs may hold at once; each job reserves its estimate first."""

    def __init__(self, total: int, problem: str | None = None) -> None:
        self.total = total
        self.problem = problem  # a budget setting that could not be read: every job says so
        self.used = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, need: int, what: str, advice: str = "choose a smaller target or raise the budget") -> Iterator[None]:
        if self.problem:
            raise ImageError(f"the local engine's memory budget is not set right: {self.problem}")
        if need > self.total:
            raise ImageError(
                f"{what} needs about {_mb(need)} of memory, over the local engine's budget of {_mb(self.total)} "
                f"(FOLDERD_LOCAL_MEMORY_BUDGET): {advice}"
            )
        with self._changed:
            while self.used + need > self.total:
                self._changed.wait()
            self.used += need
        try:
            yield
        finally:
            with self._changed:
                self.used -= need
                self._changed.notify_all()


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


def _initial_budget() -> MemoryBudget:
    try:
        return MemoryBudget(default_budget())
    except ValueError as error:
        return MemoryBudget(0, f"FOLDERD_LOCAL_MEMORY_BUDGET: {error}")


budget = _initial_budget()


def set_memory_budget(total: int) -> None:
    """Set the bytes all local jobs together may use (the config's local memory budget, if any)."""
    global budget
    budget = MemoryBudget(total)


def estimate_memory(source: tuple[int, int], target: tuple[int, int], strategy: str, kind: str, *, copies: int = 2) -> int:
    """Peak bytes a job needs beyond the interpreter: decoded input, strip buffers, encoder.

    Pillow keeps 4 bytes a pixel for RGB, RGBA and CMYK. `copies`: the decoded input plus one
    converted or rotated copy while it is made. Measured against real peaks by
    bench/local_speed.py (the estimate stays above them).
    """
    (source_width, source_height), (width, height) = source, target
    geometry = _Geometry.of(source, target, strategy)
    rows = _strip_rows(width)
    r0, r1 = geometry.input_rows(0, rows)
    if geometry.sharpen:  # the blurred input
        copies += 1
    input_bytes = copies * 4 * source_width * source_height
    strip_bytes = 4 * (r1 - r0) * (source_width + width) + 6 * 4 * rows * width
    output_bytes = 0
    if kind == "WEBP":  # the whole picture plus libwebp's own copies: 16 B/px measured at 108 MP
        output_bytes = 16 * width * height
    return input_bytes + strip_bytes + output_bytes + (16 << 20)


# ---------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    image: Image.Image          # RGB or RGBA, upright
    format: str                 # the input's format (Pillow's name)
    icc: bytes | None           # the profile the output's pixels are in, if any
    exif: Image.Exif | None


def decode(source: Path) -> Decoded:
    """Decode the first frame upright, as RGB or RGBA, with its profile and EXIF. ImageError if damaged."""
    try:
        opened = Image.open(source)
    except Image.UnidentifiedImageError:
        raise ImageError("not an image folderd can read (the format is not recognised)") from None
    except OSError as error:
        raise ImageError(f"the image cannot be opened ({_describe(error)})") from None
    try:
        fmt = str(opened.format)
        icc, exif = metadata_of(opened)
        if exif is not None:
            for ifd in (0x8769, 0x8825):  # read the sub-IFDs while the file is open
                try:
                    exif.get_ifd(ifd)
                except Exception:
                    pass
        if opened.width * opened.height > MAX_INPUT_PIXELS:
            raise ImageError(f"the image is {opened.width}x{opened.height}, over folderd's limit of {MAX_INPUT_PIXELS:,} pixels")
        try:
            opened.seek(0)
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
            cmyk = opened.mode == "CMYK"
            flat = flatten_mode(opened)
        except ImageError:
            raise
        except MemoryError:
            raise ImageError(f"out of memory decoding a {opened.width}x{opened.height} image") from None
        except Exception as error:
            raise ImageError(f"the image data is damaged or truncated ({_describe(error)})") from None
        # Share the pixels with a new Image object, so closing the file does not free them.
        image = flat._new(flat.im) if flat is opened else flat
        image.info = {}
    finally:
        opened.close()
    return Decoded(image, fmt, None if cmyk else icc_for_rgb(icc), exif)


# ---------------------------------------------------------------------------- encoders


def _jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """A JPEG's header segments up to and including SOS as (marker, bytes), and where its scan data begins."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    position, segments = 2, []
    while True:
        if data[position] != 0xFF:
            raise ValueError("JPEG header out of step")
        marker = data[position + 1]
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        segments.append((marker, data[position : position + 2 + length]))
        position += 2 + length
        if marker == 0xDA:
            return segments, position


def _scan_data(data: bytes) -> bytes:
    _, start = _jpeg_segments(data)
    if data[-2:] != b"\xff\xd9":
        raise ValueError("JPEG strip without EOI")
    return data[start:-2]


_JPEG_MCU = {0: (8, 8), 1: (16, 8), 2: (16, 16)}  # Pillow's subsampling: 4:4:4, 4:2:2, 4:2:0


def _jpeg_rows(width: int, subsampling: int) -> int:
    """Strip rows for JPEG: whole MCU rows, and a restart interval (MCUs a strip) under 65536."""
    mcu_width, mcu_height = _JPEG_MCU[subsampling]
    per_row = -(-width // mcu_width)
    rows = min(_strip_rows(width), (65_535 // per_row) * mcu_height)
    return max(mcu_height, rows - rows % 16)


def _write_jpeg(out: BinaryIO, strips: Iterator[tuple[int, Image.Image]], width: int, height: int, rows: int, options: dict[str, Any]) -> None:
    """Encode strip by strip and join them into one baseline JPEG with a restart marker between strips."""
    subsampling = options["subsampling"]
    mcu_width, mcu_height = _JPEG_MCU[subsampling]
    interval = -(-width // mcu_width) * (rows // mcu_height)
    tables: list[bytes] | None = None
    for index, (_, strip) in enumerate(strips):
        buffer = io.BytesIO()
        if index == 0:
            strip.save(buffer, "JPEG", **options)
            data = buffer.getvalue()
            if strip.height == height:  # one strip: already the whole image
                out.write(data)
                return
            segments, _ = _jpeg_segments(data)
            tables = [segment for marker, segment in segments if marker in (0xC4, 0xDB)]
            header = bytearray(b"\xff\xd8")
            for marker, segment in segments:
                if marker in (0xC0, 0xC1):
                    segment = segment[:5] + struct.pack(">H", height) + segment[7:]
                elif marker == 0xDA:
                    header += b"\xff\xdd" + struct.pack(">HH", 4, interval)
                elif marker in (0xC2, 0xDD):
                    raise ValueError("the JPEG encoder wrote a progressive scan or restart markers")
                header += segment
            out.write(header)
            out.write(data[_jpeg_segments(data)[1] : -2])
            continue
        plain = {key: value for key, value in options.items() if key not in ("icc_profile", "exif", "dpi")}
        strip.save(buffer, "JPEG", **plain)
        data = buffer.getvalue()
        if index == 1:  # joining is only valid with the very same quantisation and Huffman tables
            segments, _ = _jpeg_segments(data)
            if [segment for marker, segment in segments if marker in (0xC4, 0xDB)] != tables:
                raise ValueError("JPEG strips were encoded with different tables")
        out.write(bytes((0xFF, 0xD0 + (index - 1) % 8)))
        out.write(_scan_data(data))
    out.write(b"\xff\xd9")


def _png_chunk(out: BinaryIO, kind: bytes, data: bytes) -> None:
    out.write(struct.pack(">I", len(data)))
    out.write(kind)
    out.write(data)
    out.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF))


def _png_average_filtered(strip: Image.Image, previous: Image.Image | None) -> Image.Image:
    """PNG filter 3 (Average) of every row of `strip`, bytewise: x - floor((left + up) / 2) mod 256."""
    width, height = strip.size
    left = Image.new(strip.mode, strip.size)
    left.paste(strip.crop((0, 0, width - 1, height)), (1, 0))
    up = Image.new(strip.mode, strip.size)
    if previous is not None:
        up.paste(previous, (0, 0))
    if height > 1:
        up.paste(strip.crop((0, 0, width, height - 1)), (0, 1))
    return ImageChops.subtract_modulo(strip, ImageChops.add(left, up, scale=2.0))


def _write_png(out: BinaryIO, strips: Iterator[tuple[int, Image.Image]], width: int, height: int, mode: str, icc: bytes | None, exif: bytes | None) -> None:
    """A PNG written row band by row band: 8-bit RGB(A), Average filter, deflate as the rows come."""
    out.write(b"\x89PNG\r\n\x1a\n")
    _png_chunk(out, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6 if mode == "RGBA" else 2, 0, 0, 0))
    if icc:
        _png_chunk(out, b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc))
    if exif:
        _png_chunk(out, b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    compressor = zlib.compressobj(PNG_COMPRESS_LEVEL)
    pending = bytearray()
    previous: Image.Image | None = None
    stride = width * (4 if mode == "RGBA" else 3)
    for _, strip in strips:
        raw = memoryview(_png_average_filtered(strip, previous).tobytes())
        previous = strip.crop((0, strip.height - 1, width, strip.height))
        rows = bytearray()
        for offset in range(0, len(raw), stride):
            rows += b"\x03"
            rows += raw[offset : offset + stride]
        pending += compressor.compress(bytes(rows))
        while len(pending) >= _IDAT_CHUNK:
            _png_chunk(out, b"IDAT", bytes(pending[:_IDAT_CHUNK]))
            del pending[:_IDAT_CHUNK]
    pending += compressor.flush()
    _png_chunk(out, b"IDAT", bytes(pending))
    _png_chunk(out, b"IEND", b"")


# ---------------------------------------------------------------------------- the job


def upscale(
    source: Path,
    destination: Path,
    width: int,
    height: int,
    strategy: str,
    *,
    jpeg_quality: int = 92,
    output: str = "auto",
) -> str:
    """Upscale the image at `source` to width x height into the new file `destination` (fsynced).

    `output` is the rule's output.format (auto|jpeg|png|webp): writing the wanted format here
    spares deliver a decode and a lossy re-encode. Return the output's format (JPEG, PNG or
    WEBP). Raise ImageError for damaged input, or a job over the memory budget.
    """
    try:
        with Image.open(source) as header:
            input_format, mode, size = str(header.format), header.mode, header.size
            orientation = int(header.getexif().get(0x0112, 1) or 1)
            has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in header.info
    except Exception as error:
        raise ImageError(f"the image header is damaged ({_describe(error)})") from None
    if orientation in (5, 6, 7, 8) and input_format != "TIFF":
        size = size[1], size[0]
    kind = OUTPUT_FORMATS.get(output) or output_format(input_format, has_alpha)
    if kind == "WEBP" and max(width, height) > WEBP_MAX_SIDE:
        raise ImageError(f"WebP is at most {WEBP_MAX_SIDE} px a side; the target is {width}x{height} (choose output.format png or jpeg)")
    need = estimate_memory(size, (width, height), strategy, kind)
    what = f"upscaling {size[0]}x{size[1]} to {width}x{height} ({strategy}, {kind})"
    advice = "choose a smaller target or raise the budget"
    if kind == "WEBP":
        advice = "WebP needs the whole picture in memory: choose output.format jpeg or png (made strip by strip), a smaller target, or raise the budget"
    with budget.reserve(need, what, advice):
        try:
            _upscale(source, destination, width, height, strategy, kind, jpeg_quality)
        except MemoryError:
            raise ImageError(f"{what} ran out of memory") from None
    return kind


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _upscale(source: Path, destination: Path, width: int, height: int, strategy: str, kind: str, jpeg_quality: int) -> None:
    decoded = decode(source)
    image = decoded.image
    if kind == "JPEG" and image.mode == "RGBA":  # JPEG has no alpha: flatten on white
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        image = background
    exif = exif_for_output(decoded.exif, width, height, limit=JPEG_EXIF_LIMIT if kind == "JPEG" else None)
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        _encode(os.fdopen(fd, "wb", buffering=1 << 20), decoded, image, width, height, strategy, kind, jpeg_quality, exif)
    except BaseException:
        _remove(destination)  # ours (O_EXCL): no half-written result is left behind
        raise


def _encode(
    out: BinaryIO, decoded: Decoded, image: Image.Image, width: int, height: int, strategy: str, kind: str, jpeg_quality: int, exif: bytes | None
) -> None:
    with out:
        if kind == "JPEG":
            options: dict[str, Any] = {"quality": jpeg_quality, "subsampling": 0 if jpeg_quality >= 90 else 2, "optimize": False}
            if decoded.icc:
                options["icc_profile"] = decoded.icc
            if exif:
                options["exif"] = exif
            rows = _jpeg_rows(width, options["subsampling"])
            _write_jpeg(out, render_strips(image, width, height, strategy, rows=rows), width, height, rows, options)
        elif kind == "PNG":
            _write_png(out, render_strips(image, width, height, strategy), width, height, image.mode, decoded.icc, exif)
        else:
            canvas = render(image, width, height, strategy)
            extra: dict[str, Any] = {"quality": 95, "method": 3}
            if exif:
                extra["exif"] = exif
            if decoded.icc:
                extra["icc_profile"] = decoded.icc
            canvas.save(out, "WEBP", **extra)
        out.flush()
        os.fsync(out.fileno())


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
