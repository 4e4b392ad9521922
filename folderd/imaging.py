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
    pillow_heif = None  # type: ignore[assignment]

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
            width, height = image.size  # the header parsed
            # Small files: decode fully, the surest check of a whole image -- but never one
            # whose header declares more pixels than folderd takes (a decompression bomb:
            # a few KB declaring 30000x30000); probe() refuses it with the reason.
            if size <= SMALL_FILE and width * height <= MAX_INPUT_PIXELS:
                image.load()
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
            # Pillow's TIFF plugin already reports the upright size (it transposes on load);
            # every other format reports the stored size, which orientations 5-8 turn sideways.
            if orientation in (5, 6, 7, 8) and image.format != "TIFF":
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
    if image.mode == "P" and "transparency" not in image.info and getattr(image.palette, "mode", "RGB") != "RGBA":
        return image.convert("RGB")  # an opaque palette image needs no alpha channel
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


# ---------------------------------------------------------------------- metadata out
#
# Results carry the input's colour profile and EXIF. EXIF is rewritten for the new pixels:
# orientation 1 (they are upright now), PixelX/YDimension set to the output size, and the
# tags that describe a TIFF file's own layout (strip offsets, bits per sample, its embedded
# ICC tag, ...) or a stale thumbnail dropped: they would lie about the output.

ORIENTATION = 0x0112
EXIF_IFD = 0x8769
PIXEL_X_DIMENSION = 0xA002
PIXEL_Y_DIMENSION = 0xA003
MAKER_NOTE = 0x927C
JPEG_EXIF_LIMIT = 65_533  # an APP1 segment's payload, "Exif\0\0" included
_LAYOUT_TAGS = {
    0x00FE, 0x00FF, 0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0107, 0x0108, 0x0109, 0x010A, 0x0111, 0x0115,
    0x0116, 0x0117, 0x0118, 0x0119, 0x011C, 0x0122, 0x0123, 0x0124, 0x0125, 0x013D, 0x0140, 0x0142, 0x0143,
    0x0144, 0x0145, 0x014A, 0x0152, 0x0153, 0x0154, 0x0155, 0x0156, 0x0157, 0x0158, 0x0159, 0x015B, 0x0200,
    0x0201, 0x0202, 0x0203, 0x0205, 0x0206, 0x0207, 0x0208, 0x0209, 0x0211, 0x0212, 0x0214, 0x02BC, 0x83BB,
    0x8649, 0x8773, 0x935C, 0xC612,
}


def icc_for_rgb(profile: bytes | None) -> bytes | None:
    """The profile if it describes RGB pixels (the only kind folderd writes), else None."""
    if not profile or len(profile) < 128:
        return None
    return profile if profile[16:20] == b"RGB " else None


def exif_for_output(exif: Image.Exif | bytes | None, width: int, height: int, *, limit: int | None = None) -> bytes | None:
    """EXIF for a result of width x height: orientation 1, pixel dimensions updated, layout tags dropped.

    `exif` is an input's Image.getexif() or raw EXIF bytes (with or without the "Exif\\0\\0"
    header). Return bytes starting with "Exif\\0\\0" (what Pillow's JPEG, PNG and WebP
    encoders take), or None when there is nothing to carry or it cannot be kept under
    `limit` bytes even without the maker note.
    """
    if exif is None:
        return None
    try:
        if isinstance(exif, (bytes, bytearray)):
            raw = bytes(exif)
            loaded = Image.Exif()
            loaded.load(raw if raw.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + raw)
            exif = loaded
        if not len(exif):
            return None
        for tag in list(exif):
            if tag in _LAYOUT_TAGS:
                del exif[tag]
        exif[ORIENTATION] = 1
        sub = exif.get_ifd(EXIF_IFD)
        sub[PIXEL_X_DIMENSION] = width
        sub[PIXEL_Y_DIMENSION] = height
        data = exif.tobytes()
        if limit is not None and len(data) > limit and MAKER_NOTE in sub:
            del sub[MAKER_NOTE]  # maker notes are the usual bulk, and their offsets rarely survive anyway
            data = exif.tobytes()
    except Exception:  # a damaged EXIF block is no reason to fail the image: drop it
        return None
    if limit is not None and len(data) > limit:
        return None
    return data


def metadata_of(image: Image.Image) -> tuple[bytes | None, Image.Exif | None]:
    """(ICC profile, EXIF) of an opened image, before load (TIFF drops its orientation tag on load)."""
    icc = image.info.get("icc_profile") or None
    try:
        exif: Image.Exif | None = image.getexif()
    except Exception:
        exif = None
    return icc, exif


# ---------------------------------------------------------------------- metadata for API results
#
# The Clipdrop API's results carry no colour profile and no EXIF. reattach_metadata() copies
# the original's into the downloaded result by splicing segments/chunks into the file, so the
# pixels are not decoded or re-encoded (no generation loss, little memory).

_ICC_CHUNK = 65_519  # an APP2 segment's payload after "ICC_PROFILE\0" + sequence + count


def reattach_metadata(original: Path, result: Path) -> bool:
    """Put the original's ICC profile and EXIF (orientation 1, the result's size) into `result`, in place.

    The replacement is atomic and durable (temp, fsync, rename, fsync dir). Return True if the
    file changed; False when there is nothing to carry or the result is not JPEG, PNG or WebP.
    Metadata is a courtesy: a damaged original or result raises nothing here.
    """
    try:
        with Image.open(original) as source:
            icc, exif = metadata_of(source)
            cmyk = source.mode == "CMYK"
            if exif is not None:
                for ifd in (0x8769, 0x8825):
                    try:
                        exif.get_ifd(ifd)
                    except Exception:
                        pass
        data = result.read_bytes()
        kind = sniff(data[:64])
        if kind not in ("JPEG", "PNG", "WEBP"):
            return False
        with Image.open(io.BytesIO(data)) as produced:
            width, height = produced.size
        profile = None if cmyk else icc_for_rgb(icc)
        exif_bytes = exif_for_output(exif, width, height, limit=JPEG_EXIF_LIMIT if kind == "JPEG" else None)
        if not profile and not exif_bytes:
            return False
        spliced = {"JPEG": _splice_jpeg, "PNG": _splice_png, "WEBP": _splice_webp}[kind](data, profile, exif_bytes)
    except Exception:
        return False
    from folderd.fsutil import atomic_write

    atomic_write(result, spliced)
    return True


def _splice_jpeg(data: bytes, icc: bytes | None, exif: bytes | None) -> bytes:
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    position, kept_app0, others = 2, b"", []
    while True:
        if data[position] != 0xFF:
            raise ValueError("JPEG header out of step")
        marker = data[position + 1]
        if marker == 0xDA or marker == 0xD9:
            break
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        segment = data[position : position + 2 + length]
        payload = segment[4:]
        position += 2 + length
        if marker == 0xE0 and not kept_app0 and not others:
            kept_app0 = segment
        elif marker == 0xE1 and exif and payload.startswith(b"Exif\x00\x00"):
            continue  # replaced
        elif marker == 0xE2 and icc and payload.startswith(b"ICC_PROFILE\x00"):
            continue  # replaced
        else:
            others.append(segment)
    inserted = b""
    if exif:
        inserted += b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    if icc:
        pieces = [icc[offset : offset + _ICC_CHUNK] for offset in range(0, len(icc), _ICC_CHUNK)]
        if len(pieces) > 255:
            raise ValueError("colour profile too large for JPEG")
        for index, piece in enumerate(pieces, 1):
            payload = b"ICC_PROFILE\x00" + bytes((index, len(pieces))) + piece
            inserted += b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload
    return b"\xff\xd8" + kept_app0 + inserted + b"".join(others) + data[position:]


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    chunks, position = [], 8
    while position < len(data):
        length = struct.unpack(">I", data[position : position + 4])[0]
        kind = data[position + 4 : position + 8]
        chunks.append((kind, data[position : position + 12 + length]))
        position += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _splice_png(data: bytes, icc: bytes | None, exif: bytes | None) -> bytes:
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    dropped = set()
    if icc:
        dropped |= {b"iCCP", b"sRGB"}
    if exif:
        dropped.add(b"eXIf")
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, raw in _png_chunks(data):
        if kind in dropped:
            continue
        out.append(raw)
        if kind == b"IHDR":
            if icc:
                out.append(chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
            if exif:
                out.append(chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    return b"".join(out)


def _splice_webp(data: bytes, icc: bytes | None, exif: bytes | None) -> bytes:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WebP")
    chunks, position = [], 12
    while position + 8 <= len(data):
        kind = data[position : position + 4]
        size = struct.unpack("<I", data[position + 4 : position + 8])[0]
        chunks.append((kind, data[position + 8 : position + 8 + size]))
        position += 8 + size + (size & 1)
    if not chunks:
        raise ValueError("an empty WebP")

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return kind + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")

    if chunks[0][0] == b"VP8X":
        flags, rest = chunks[0][1][0], chunks[0][1][1:]
        chunks = chunks[1:]
    else:  # a simple WebP: give it the extended header that metadata needs
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            alpha = "A" in image.getbands()
        flags = 0x10 if alpha else 0
        rest = b"\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    if icc:
        flags |= 0x20
    if exif:
        flags |= 0x08
    body = [chunk(b"VP8X", bytes((flags,)) + rest)]
    if icc:
        body.append(chunk(b"ICCP", icc))
    xmp = []
    for kind, payload in chunks:
        if (kind == b"ICCP" and icc) or (kind == b"EXIF" and exif):
            continue
        if kind == b"XMP ":
            xmp.append(chunk(kind, payload))
            continue
        if kind == b"ICCP":  # an existing profile kept: it must come right after VP8X
            body.insert(1, chunk(kind, payload))
            continue
        body.append(chunk(kind, payload))
    if exif:
        body.append(chunk(b"EXIF", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    payload = b"WEBP" + b"".join(body + xmp)
    return b"RIFF" + struct.pack("<I", len(payload)) + payload
