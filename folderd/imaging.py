"""Images: is a file a whole image yet, what is in it, and turning it into what an endpoint takes.

Everything here reads headers before pixels, so a decompression bomb (a tiny file that
declares 30000x30000) is refused before a single pixel is allocated.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from folderd.errors import ImageError

try:  # HEIC/HEIF from phones; AVIF is in Pillow itself.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - optional at run time
    pillow_heif = None

# Pillow's own bomb check warns at 89 MP and raises at twice that; folderd decides itself,
# from the header, with a limit that also bounds the local engine's memory.
Image.MAX_IMAGE_PIXELS = None
MAX_INPUT_PIXELS = 120_000_000
MAX_INPUT_BYTES = 200_000_000

# Magic bytes of the formats folderd takes: (offset, bytes, format).
_MAGIC = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"BM", "BMP"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "TIFF": "image/tiff", "BMP": "image/bmp"}
EXTENSION = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif", "BMP": ".bmp", "HEIF": ".heic", "AVIF": ".avif"}
SMALL_FILE = 4 * 1024 * 1024


def sniff(head: bytes) -> str | None:
    """Given a file's first bytes, return its format by magic bytes, or None."""
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF"
    return None


def completeness(path: Path) -> tuple[str, str]:
    """Is the file at `path` a whole image yet? Return (verdict, reason).

    verdict: "complete", "incomplete" (may still be being written: wait), or "invalid"
    (can never become an image we take: fail it now). Only reads headers and tails.
    """
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return "incomplete", "the file is empty"
            head = handle.read(64)
            kind = sniff(head)
            if kind is None:
                if size < 16:
                    return "incomplete", "too short to be an image yet"
                return "invalid", "not an image folderd can read (unknown format: neither JPEG, PNG, WebP, TIFF, BMP, GIF, HEIC nor AVIF)"
            reason = _tail_check(kind, handle, size, head)
    except OSError as error:
        return "incomplete", f"cannot read: {error.strerror}"
    if reason:
        return "incomplete", reason
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header parsed
            if size <= SMALL_FILE:
                image.load()  # small files: decode fully, the surest check of a whole image
    except Exception as error:  # Pillow raises many types for damaged data
        return "incomplete", f"the image data is incomplete or damaged ({_describe(error)})"
    return "complete", ""


def _tail_check(kind: str, handle: BinaryIO, size: int, head: bytes) -> str:
    """Return why a file of `kind` looks cut short, or '' if its end is where it should be."""
    if kind == "JPEG":
        handle.seek(max(0, size - 256 * 1024))
        if b"\xff\xd9" not in handle.read():
            return "the JPEG end marker (EOI) is missing: the file is truncated or still being written"
    elif kind == "PNG":
        handle.seek(max(0, size - 64))
        if b"IEND" not in handle.read():
            return "the PNG end chunk (IEND) is missing: the file is truncated or still being written"
    elif kind == "GIF":
        handle.seek(size - 1)
        if handle.read(1) != b";":
            return "the GIF trailer is missing: the file is truncated or still being written"
    elif kind == "WEBP":
        declared = struct.unpack("<I", head[4:8])[0] + 8
        if size < declared:
            return f"the WebP file declares {declared} bytes but has {size}"
    elif kind == "BMP" and len(head) >= 6:
        declared = struct.unpack("<I", head[2:6])[0]
        if size < declared:
            return f"the BMP file declares {declared} bytes but has {size}"
    elif kind in ("HEIF", "AVIF"):
        return _bmff_check(handle, size)
    return ""


def _bmff_check(handle: BinaryIO, size: int) -> str:
    """HEIC/AVIF are ISO-BMFF: top-level boxes must add up to the file size."""
    position = 0
    while position < size:
        handle.seek(position)
        header = handle.read(16)
        if len(header) < 8:
            return "a box header is cut short"
        box_size = struct.unpack(">I", header[:4])[0]
        if box_size == 1:
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:
            return ""
        if box_size < 8:
            return "a box has an impossible size"
        position += box_size
    return "" if position == size else "the last box is cut short: the file is truncated or still being written"


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


@dataclass(frozen=True)
class ImageInfo:
    """What folderd needs to know about an input, read from its header."""

    format: str          # Pillow's format name: JPEG, PNG, WEBP, ...
    width: int           # after EXIF orientation
    height: int
    mode: str
    has_alpha: bool
    orientation: int     # EXIF orientation tag, 1 when upright
    frames: int
    size_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe(path: Path) -> ImageInfo:
    """Read an image's header. Raise ImageError, with a reason for people, if folderd cannot take it."""
    size_bytes = path.stat().st_size
    if size_bytes == 0:
        raise ImageError("the file is empty (0 bytes)")
    if size_bytes > MAX_INPUT_BYTES:
        raise ImageError(f"the file is {size_bytes:,} bytes; folderd takes at most {MAX_INPUT_BYTES:,}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError(f"the image declares an empty size {width}x{height}")
            if width * height > MAX_INPUT_PIXELS:
                raise ImageError(
                    f"the image declares {width}x{height} = {width * height:,} pixels, over folderd's limit of "
                    f"{MAX_INPUT_PIXELS:,} (a decompression bomb or an image too large to upscale safely)"
                )
            orientation = 1
            try:
                orientation = int(image.getexif().get(0x0112, 1) or 1)
            except Exception:  # a damaged EXIF block is no reason to refuse the image
                orientation = 1
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
            return ImageInfo(
                format=str(image.format),
                width=width,
                height=height,
                mode=image.mode,
                has_alpha=has_alpha,
                orientation=orientation if 1 <= orientation <= 8 else 1,
                frames=int(getattr(image, "n_frames", 1) or 1),
                size_bytes=size_bytes,
            )
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image folderd can read (the format is not recognised)") from None
    except Exception as error:
        raise ImageError(f"the image header is damaged ({_describe(error)})") from None


def load_upright(path: Path) -> Image.Image:
    """Decode the first frame, EXIF orientation applied. Raise ImageError on damaged data."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright if upright is not image else image.copy()
    except Exception as error:
        raise ImageError(f"the image data is damaged or truncated ({_describe(error)})") from None


def flatten_mode(image: Image.Image) -> Image.Image:
    """Convert to a mode every encoder and endpoint takes: RGB, or RGBA when there is transparency."""
    if image.mode in ("RGB", "RGBA"):
        return image
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        return image.convert("RGBA")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit and float greyscale: scale to 8 bits rather than clip to white.
        return image.point(lambda value: value / 256).convert("L").convert("RGB") if image.mode != "F" else image.convert("L").convert("RGB")
    return image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            target = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(image, source, target, outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain conversion
            pass
    return image.convert("RGB")


def encode_for_upload(path: Path, destination: Path, *, accepted: tuple[str, ...], max_bytes: int) -> tuple[str, str]:
    """Write an upright copy of the image at `path` in a format the endpoint accepts.

    PNG keeps every pixel; when the PNG would pass `max_bytes`, a JPEG at quality 95 is
    written instead (transparency is then flattened on white). Return (format, mime).
    """
    image = flatten_mode(load_upright(path))
    if "PNG" in accepted:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)
        if buffer.tell() <= max_bytes:
            destination.write_bytes(buffer.getvalue())
            return "PNG", "image/png"
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        image = background
    image.save(destination, "JPEG", quality=95, subsampling=0)
    if destination.stat().st_size > max_bytes:
        raise ImageError(f"even as a quality-95 JPEG the image is over the API's {max_bytes:,}-byte limit")
    return "JPEG", "image/jpeg"


def format_of_bytes(head: bytes) -> str | None:
    """The format an HTTP body really is, from its magic bytes (never trust Content-Type alone)."""
    return sniff(head)
