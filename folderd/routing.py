"""Routing: from a rule and an input's size, the output size and the endpoint that makes it.

Limits are the API's, read as decimal where it says MP and MB: 16 MP = 16,000,000 px,
30 MB = 30,000,000 bytes. The sync endpoint makes outputs up to 4096x4096 from inputs up
to 16 MP (PNG, JPEG, WebP); the async one makes up to 12,000x12,000 from PNG or JPEG
inputs up to 8192 px a side, and is the only one with the detailed strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from folderd.config import FolderRule, Target
from folderd.errors import ImageError
from folderd.imaging import ImageInfo

SYNC_MAX_SIDE = 4096
SYNC_MAX_INPUT_PIXELS = 16_000_000
SYNC_FORMATS = ("PNG", "JPEG", "WEBP")
ASYNC_MAX_SIDE = 12_000
ASYNC_MAX_INPUT_SIDE = 8192
ASYNC_FORMATS = ("PNG", "JPEG")
MAX_UPLOAD_BYTES = 30_000_000
LOCAL_MAX_SIDE = ASYNC_MAX_SIDE


@dataclass(frozen=True)
class Route:
    """Where and how one image goes: output size, endpoint, whether it must be converted first."""

    width: int
    height: int
    mode: str             # sync | async | local
    strategy: str
    convert: bool         # upload a converted (PNG/JPEG, upright) copy instead of the original
    clamped: bool         # the rule asked for more than the endpoint makes; the ratio was kept
    credits_estimate: str  # Decimal as text; "0" for the local engine

    def describe(self) -> str:
        return f"{self.width}x{self.height} {self.mode}/{self.strategy}"


def target_size(target: Target, width: int, height: int) -> tuple[int, int]:
    """Given a rule's target and an input's (upright) size, return the output size asked for."""
    if target.scale is not None:
        factor = target.scale
    elif target.long_edge is not None:
        factor = target.long_edge / max(width, height)
    elif target.width is not None and target.height is not None:
        if target.fit == "exact":
            return target.width, target.height
        factor = min(target.width / width, target.height / height)
    elif target.width is not None:
        return target.width, max(1, round(height * target.width / width))
    else:
        assert target.height is not None
        return max(1, round(width * target.height / height)), target.height
    return round(width * factor), round(height * factor)


def _clamp(width: int, height: int, limit: int, exact: bool) -> tuple[int, int, bool]:
    if width <= limit and height <= limit:
        return width, height, False
    if exact:
        raise ImageError(f"the exact target {width}x{height} is over the endpoint's {limit}x{limit} limit and cannot be shrunk without changing its shape")
    factor = min(limit / width, limit / height)
    return max(1, min(limit, round(width * factor))), max(1, min(limit, round(height * factor))), True


def detailed_cost(width: int, height: int) -> Decimal:
    """Credits for a detailed async upscale: 1 per output megapixel (decimal MP)."""
    return (Decimal(width * height) / Decimal(1_000_000)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _unusual(info: ImageInfo) -> bool:
    """Pixel modes an image service may read wrongly (CMYK, 16-bit and float greyscale): send 8-bit RGB(A) instead."""
    return info.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "1")


def route(rule: FolderRule, info: ImageInfo) -> Route:
    """Decide output size and endpoint for `info` under `rule`. Raise ImageError with a reason to refuse."""
    width, height = target_size(rule.target, info.width, info.height)
    if width < 1 or height < 1:
        raise ImageError(f"the target works out at {width}x{height} px for a {info.width}x{info.height} input")
    exact = rule.target.fit == "exact" and rule.target.width is not None and rule.target.height is not None
    upright = info.orientation == 1
    if rule.backend == "local":
        if width > LOCAL_MAX_SIDE or height > LOCAL_MAX_SIDE:
            raise ImageError(f"the target {width}x{height} is over the largest output folderd makes ({LOCAL_MAX_SIDE}x{LOCAL_MAX_SIDE})")
        return Route(width, height, "local", rule.strategy, False, False, "0")

    fits_sync = width <= SYNC_MAX_SIDE and height <= SYNC_MAX_SIDE and info.pixels <= SYNC_MAX_INPUT_PIXELS
    if rule.mode == "sync" or (rule.mode == "auto" and rule.strategy == "smooth" and fits_sync):
        if info.pixels > SYNC_MAX_INPUT_PIXELS:
            raise ImageError(f"the input has {info.pixels:,} pixels; the sync endpoint takes at most {SYNC_MAX_INPUT_PIXELS:,} (use mode auto or async)")
        width, height, clamped = _clamp(width, height, SYNC_MAX_SIDE, exact)
        convert = info.format not in SYNC_FORMATS or not upright or info.frames > 1 or _unusual(info) or info.size_bytes > MAX_UPLOAD_BYTES
        return Route(width, height, "sync", "smooth", convert, clamped, "1")

    if width > ASYNC_MAX_SIDE or height > ASYNC_MAX_SIDE:
        if rule.mode == "async" or exact:
            width, height, clamped = _clamp(width, height, ASYNC_MAX_SIDE, exact)
        else:
            raise ImageError(f"the target {width}x{height} is over the largest output the API makes ({ASYNC_MAX_SIDE}x{ASYNC_MAX_SIDE})")
    else:
        clamped = False
    if info.width > ASYNC_MAX_INPUT_SIDE or info.height > ASYNC_MAX_INPUT_SIDE:
        raise ImageError(f"the input is {info.width}x{info.height}; the async endpoint takes at most {ASYNC_MAX_INPUT_SIDE} px a side")
    convert = info.format not in ASYNC_FORMATS or not upright or info.frames > 1 or _unusual(info) or info.size_bytes > MAX_UPLOAD_BYTES
    cost = detailed_cost(width, height) if rule.strategy == "detailed" else Decimal(1)
    return Route(width, height, "async", rule.strategy, convert, clamped, str(cost))
