"""The embedded local engine: upscaling with no network and nothing to pay.

smooth: Lanczos resampling. detailed: Lanczos followed by an unsharp mask whose radius
grows with the upscale factor, with a small threshold so JPEG noise is not amplified.
The colour profile and EXIF (orientation reset to upright) are carried to the output.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter

from folderd.fsutil import write_file
from folderd.imaging import flatten_mode, load_upright

# Chosen with bench/quality.py (PSNR/SSIM against originals after a box downscale).
DETAILED_RADIUS_PER_FACTOR = 0.5
DETAILED_PERCENT = 80
DETAILED_THRESHOLD = 2


def output_format(input_format: str, has_alpha: bool) -> str:
    """JPEG stays JPEG, PNG stays PNG, WebP stays WebP; phone formats become JPEG; the rest PNG."""
    if has_alpha:
        return "WEBP" if input_format == "WEBP" else "PNG"
    if input_format in ("JPEG", "HEIF", "AVIF", "MPO"):
        return "JPEG"
    if input_format == "WEBP":
        return "WEBP"
    return "PNG"


def _exif_for_output(image: Image.Image, width: int, height: int) -> bytes | None:
    try:
        exif = image.getexif()
    except Exception:
        return None
    if not exif:
        return None
    exif[0x0112] = 1  # the pixels are upright now
    try:
        sub = exif.get_ifd(0x8769)
        if sub:
            sub[0xA002] = width
            sub[0xA003] = height
    except Exception:
        pass
    try:
        return exif.tobytes()
    except Exception:
        return None


def upscale(source: Path, destination: Path, width: int, height: int, strategy: str, *, jpeg_quality: int = 92) -> str:
    """Upscale the image at `source` to width x height into the new file `destination` (fsynced).

    Return the output's format (JPEG, PNG or WEBP). Raise ImageError for damaged input.
    """
    with Image.open(source) as original:
        input_format = str(original.format)
        icc = original.info.get("icc_profile")
        exif_source = original
        exif = _exif_for_output(exif_source, width, height)
    image = load_upright(source)
    if image.mode == "CMYK":
        icc = None  # converted to sRGB; the CMYK profile no longer describes the pixels
    image = flatten_mode(image)
    has_alpha = image.mode == "RGBA"
    factor = max(width / image.width, height / image.height)
    result = image.resize((width, height), Image.Resampling.LANCZOS)
    del image
    if strategy == "detailed" and factor > 1:
        radius = max(0.5, DETAILED_RADIUS_PER_FACTOR * factor)
        result = result.filter(ImageFilter.UnsharpMask(radius=radius, percent=DETAILED_PERCENT, threshold=DETAILED_THRESHOLD))
    kind = output_format(input_format, has_alpha)
    options: dict[str, Any] = {}
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = exif
    if kind == "JPEG":
        options.update(quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2, optimize=False)
    elif kind == "WEBP":
        options.update(quality=95, method=3)
    else:
        options.update(compress_level=3)
    buffer = io.BytesIO()
    result.save(buffer, kind, **options)
    write_file(destination, buffer.getvalue())
    return kind


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
