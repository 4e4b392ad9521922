"""Quality of the local engine's strategies: PSNR and SSIM against the original photo.

    .venv/bin/python bench/quality.py           # the table (about half a minute)
    .venv/bin/python bench/quality.py --tune    # also the parameter grid behind local.py's choice (a few minutes)

Each photo is box-downscaled by 2 and by 4 (Pillow's reduce(): the mean of each 2x2 / 4x4
block), then upscaled back to its size by plain Lanczos (Pillow's resize), by folderd's
smooth and by folderd's detailed (folderd.local.render: the very strip pipeline the daemon
runs), and by Pillow's UnsharpMask on the Lanczos output with the same parameters (the
textbook form of detailed, for reference), and compared with the original. Every case is run twice: from the lossless
downscale, and from that downscale saved as a JPEG at quality 85 (the noise a threshold
must not amplify). Scores are means over the photos.

Photos: scikit-image's sample data (dev-only: `pip install scikit-image`); without it,
synthetic images, and without numpy, PSNR only.

Target (issue 5): detailed beats plain Lanczos on PSNR and on SSIM at 2x and at 4x.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image, ImageChops, ImageDraw, ImageFilter  # noqa: E402

from folderd import local  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "brick", "grass", "gravel")
SCALES = (2, 4)
JPEG_QUALITY = 85


def load_photos() -> tuple[str, list[tuple[str, Image.Image]]]:
    try:
        from skimage import data

        photos = [(name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in PHOTOS]
        source = "scikit-image sample photos"
    except Exception:
        photos = [(f"synthetic-{index}", synthetic(index)) for index in range(6)]
        source = "synthetic images (pip install scikit-image for real photos)"
    cropped = []
    for name, image in photos:  # a multiple of 4 on both sides, so both downscales are exact
        width, height = image.size
        cropped.append((name, image.crop((0, 0, width - width % 4, height - height % 4))))
    return source, cropped


def synthetic(index: int) -> Image.Image:
    """Edges, text-like strokes, gradients and texture, for when there are no photos."""
    size = (480, 360)
    image = Image.merge("RGB", (Image.linear_gradient("L").resize(size), Image.radial_gradient("L").resize(size), Image.linear_gradient("L").rotate(90).resize(size)))
    draw = ImageDraw.Draw(image)
    for step in range(12):
        x = (step * 37 + index * 53) % 440
        draw.rectangle((x, 20 + step * 25, x + 30 + step * 3, 40 + step * 25), fill=((step * 50) % 256, 255 - step * 20, (index * 70) % 256))
        draw.line((0, step * 30, 479, 359 - step * 30 + index), fill=(255, 255, 255), width=1 + step % 3)
        draw.ellipse((200 + step * 5, 100, 260 + step * 9, 160 + step * 4), outline=(0, 0, 0), width=2)
    texture = Image.effect_noise(size, 30 + index * 5).filter(ImageFilter.GaussianBlur(1)).convert("RGB")
    return ImageChops.add(image, texture, scale=1, offset=-128)


# ---------------------------------------------------------------------------- metrics


def psnr(reference: Image.Image, image: Image.Image) -> float:
    histogram = ImageChops.difference(reference, image).histogram()
    squares = sum(count * (value % 256) ** 2 for value, count in enumerate(histogram))
    mse = squares / (reference.width * reference.height * len(reference.getbands()))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def ssim_function() -> Callable[[Image.Image, Image.Image], float] | None:
    try:
        import numpy as np
    except ImportError:
        return None
    try:
        from skimage.metrics import structural_similarity

        return lambda first, second: float(structural_similarity(np.asarray(first), np.asarray(second), channel_axis=2, data_range=255))
    except ImportError:
        pass

    def ssim(first: Image.Image, second: Image.Image) -> float:  # 7x7 uniform window, as scikit-image's default
        from numpy.lib.stride_tricks import sliding_window_view

        a, b = (np.asarray(image, dtype=np.float64) for image in (first, second))
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

        def mean(x: np.ndarray) -> np.ndarray:
            return sliding_window_view(x, (7, 7), axis=(0, 1)).mean(axis=(-1, -2))

        mu_a, mu_b = mean(a), mean(b)
        cov = 49 / 48
        var_a, var_b = cov * (mean(a * a) - mu_a**2), cov * (mean(b * b) - mu_b**2)
        covar = cov * (mean(a * b) - mu_a * mu_b)
        value = ((2 * mu_a * mu_b + c1) * (2 * covar + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return float(value.mean())

    return ssim


# ---------------------------------------------------------------------------- methods


def lanczos(small: Image.Image, size: tuple[int, int]) -> Image.Image:
    return small.resize(size, Image.Resampling.LANCZOS)


def bicubic(small: Image.Image, size: tuple[int, int]) -> Image.Image:
    return small.resize(size, Image.Resampling.BICUBIC)


def folderd(strategy: str) -> Callable[[Image.Image, tuple[int, int]], Image.Image]:
    return lambda small, size: local.render(small, size[0], size[1], strategy)


def unsharp_on_output(small: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The textbook form of detailed: Pillow's UnsharpMask on the Lanczos output, same parameters.

    folderd blurs at input resolution instead (the same Gaussian, commuted with the linear
    resampling: see local.py), which is 2.5x faster; this shows what that costs in quality.
    """
    factor = max(size[0] / small.width, size[1] / small.height)
    mask = ImageFilter.UnsharpMask(radius=local.detailed_radius(factor), percent=local.DETAILED_PERCENT, threshold=local.DETAILED_THRESHOLD)
    return small.resize(size, Image.Resampling.LANCZOS).filter(mask)


def downscale(image: Image.Image, scale: int, jpeg: bool) -> Image.Image:
    small = image.reduce(scale)
    if jpeg:
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=JPEG_QUALITY)
        small = Image.open(buffer)
        small.load()
    return small


CASES = [(scale, jpeg) for scale in SCALES for jpeg in (False, True)]


def case_name(case: tuple[int, bool]) -> str:
    return f"{case[0]}x {'JPEG q85' if case[1] else 'lossless'}"


def score(methods: dict[str, Callable], photos: list[tuple[str, Image.Image]], ssim) -> dict[tuple[str, tuple[int, bool]], tuple[float, float | None]]:
    inputs = {(name, case): downscale(image, *case) for name, image in photos for case in CASES}
    results = {}
    for method, function in methods.items():
        for case in CASES:
            psnrs, ssims = [], []
            for name, image in photos:
                out = function(inputs[(name, case)], image.size)
                psnrs.append(psnr(image, out))
                if ssim:
                    ssims.append(ssim(image, out))
            results[(method, case)] = (sum(psnrs) / len(psnrs), sum(ssims) / len(ssims) if ssims else None)
    return results


# ---------------------------------------------------------------------------- tuning


# The first grid was wider (radius 0.25-0.6, amount 40-100 %, threshold 0-6: 180
# combinations, 18 min); this one keeps --tune to about 4 minutes around its best region.
# Thresholds 1-2 are left out: at amounts under 100 % they change nothing (a difference of
# 1 level times the amount rounds to 0), so they score as 0 does.
GRID_RADIUS = (0.25, 0.3, 0.4, 0.5)
GRID_PERCENT = (50, 70, 80, 100)
GRID_THRESHOLD = (0, 4, 6)


def tune(photos: list[tuple[str, Image.Image]], ssim) -> None:
    """Score every (radius per factor, percent, threshold); print the best by the worst case's PSNR gain."""
    saved = (local.DETAILED_RADIUS_PER_FACTOR, local.DETAILED_PERCENT, local.DETAILED_THRESHOLD)
    base = score({"lanczos": lanczos}, photos, ssim)
    rows = []
    try:
        for radius, percent, threshold in itertools.product(GRID_RADIUS, GRID_PERCENT, GRID_THRESHOLD):
            local.DETAILED_RADIUS_PER_FACTOR, local.DETAILED_PERCENT, local.DETAILED_THRESHOLD = radius, percent, threshold
            result = score({"detailed": folderd("detailed")}, photos, ssim)
            gains = [result[("detailed", case)][0] - base[("lanczos", case)][0] for case in CASES]
            ssim_gains = [(result[("detailed", case)][1] or 0) - (base[("lanczos", case)][1] or 0) for case in CASES]
            rows.append((min(gains), min(ssim_gains), radius, percent, threshold, gains, ssim_gains))
    finally:
        local.DETAILED_RADIUS_PER_FACTOR, local.DETAILED_PERCENT, local.DETAILED_THRESHOLD = saved
    rows.sort(key=lambda row: (row[0] > 0 and row[1] > 0, row[0] + 100 * row[1]), reverse=True)
    print()
    print("Tuning: detailed minus Lanczos, per case (" + ", ".join(case_name(case) for case in CASES) + "); best first")
    print(f"{'r/factor':>8} {'amount':>7} {'thresh':>7}  {'dPSNR per case (dB)':36} {'dSSIM per case':36} both>0")
    for worst, worst_ssim, radius, percent, threshold, gains, ssim_gains in rows[:25]:
        print(
            f"{radius:8.2f} {percent:6d}% {threshold:7d}  {' '.join(f'{g:+8.3f}' for g in gains):36} "
            f"{' '.join(f'{g:+8.4f}' for g in ssim_gains):36} {'yes' if worst > 0 and worst_ssim > 0 else 'no'}"
        )
    print(f"({len(rows)} combinations; sorted by: all gains positive, then worst PSNR gain + 100 x worst SSIM gain)")


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="also score the parameter grid")
    args = parser.parse_args()
    started = time.perf_counter()
    source, photos = load_photos()
    ssim = ssim_function()
    print(f"{len(photos)} {source}; box downscale by {' and '.join(map(str, SCALES))}, then upscaled back")
    print(
        f"detailed: unsharp radius {local.DETAILED_RADIUS_PER_FACTOR} x factor, amount {local.DETAILED_PERCENT} %, "
        f"threshold {local.DETAILED_THRESHOLD}"
    )
    if ssim is None:
        print("numpy is missing: SSIM not measured (pip install scikit-image)")
    methods = {
        "bicubic": bicubic,
        "lanczos": lanczos,
        "folderd smooth": folderd("smooth"),
        "folderd detailed": folderd("detailed"),
        "unsharp on output": unsharp_on_output,
    }
    results = score(methods, photos, ssim)
    print()
    print(f"{'case':18} {'method':18} {'PSNR dB':>8} {'SSIM':>8} {'vs Lanczos':>18}")
    verdicts = []
    for case in CASES:
        base_psnr, base_ssim = results[("lanczos", case)]
        for method in methods:
            value_psnr, value_ssim = results[(method, case)]
            delta = f"{value_psnr - base_psnr:+.3f} dB" + (f" {value_ssim - base_ssim:+.4f}" if value_ssim is not None and base_ssim is not None else "")
            ssim_text = f"{value_ssim:8.4f}" if value_ssim is not None else f"{'n/a':>8}"
            print(f"{case_name(case):18} {method:18} {value_psnr:8.3f} {ssim_text} {delta:>18}")
        detailed_psnr, detailed_ssim = results[("folderd detailed", case)]
        verdicts.append((case, detailed_psnr > base_psnr, None if detailed_ssim is None or base_ssim is None else detailed_ssim > base_ssim))
    print()
    print(f"{'target':52} {'measured':>10}")
    for case, psnr_ok, ssim_ok in verdicts:
        print(f"{'detailed PSNR > Lanczos, ' + case_name(case):52} {'PASS' if psnr_ok else 'FAIL':>10}")
        print(f"{'detailed SSIM > Lanczos, ' + case_name(case):52} {('PASS' if ssim_ok else 'FAIL') if ssim_ok is not None else 'n/a':>10}")
    if args.tune:
        tune(photos, ssim)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0 if all(psnr_ok and ssim_ok is not False for _, psnr_ok, ssim_ok in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
