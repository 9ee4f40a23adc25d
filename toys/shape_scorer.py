"""Name the dominant shape and colour in an image by plain image analysis (no learned model).

Used to measure flux-mini: does an image show the prompted colour and shape? The steps:
1. background: the one or two dominant colours of the border pixels (two-tone backgrounds);
2. foreground: pixels far from every background colour; the largest connected blob is the subject;
3. colour: the named colour (toys.shapes.COLORS) nearest to the blob's median colour;
4. shape: each pixel near the blob gets a coverage (where it lies between the background and the
   subject's colour); every outline of the vocabulary is placed and scaled to match the centroid
   and spread of that coverage, optionally blurred (a Gaussian blur keeps the centroid and adds its
   variance to the spread, so soft model outputs fit too), and the best soft intersection-over-union
   names the shape. The fit makes the match independent of size and position.
A blob too small, too large or matching no outline well (noise, an empty image) gets shape "none".
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageFilter

from toys.shapes import COLORS, CONCEPT_SHAPE, SHAPES, hard_mask, outline, place, segment_distance

SHAPE_VOCABULARY: tuple[str, ...] = SHAPES + (CONCEPT_SHAPE,)
NONE = "none"
MIN_IOU = 0.6  # below this the blob is no shape of the vocabulary
MIN_AREA, MAX_AREA = 0.004, 0.6  # blob area as a fraction of the image
MAX_CLUTTER = 0.1  # share of the image that stands out away from the subject
MAX_SIDE = 256  # larger images are box-filtered down first: the shapes are large and plain
_MIN_CONTRAST = 30.0  # RGB distance from the background below which nothing stands out
_PAD = 3  # pixels around the subject that may hold its soft (blurred) edge
_BLURS = (0.0, 1.0, 2.0)  # Gaussian blurs tried on each outline, in pixels of a 64 px image
_SECOND_BACKGROUND = 0.3  # share of border pixels a second colour needs to count as background

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Score:
    color: str  # a name of toys.shapes.COLORS, or "none" when nothing stands out
    shape: str  # a name of SHAPE_VOCABULARY, or "none"
    confidence: float  # 0..1: the smaller of the colour and the shape confidences
    color_confidence: float  # 1 - distance to the nearest named colour / distance to the second
    shape_iou: float  # overlap of the blob with the best outline
    runner_up: tuple[str, float]  # second-best shape and its overlap (how close the call was)
    background: tuple[str, ...]  # named colours of the background, one or two
    area: float  # blob area as a fraction of the image
    center: tuple[float, float]  # blob bounding-box centre, as fractions of width and height


def _nearest_color(rgb: np.ndarray) -> tuple[str, float]:
    distances = np.linalg.norm(_PALETTE - rgb[None, :], axis=1)
    first, second = np.argsort(distances)[:2]
    confidence = 1.0 - float(distances[first]) / max(float(distances[second]), 1e-6)
    return _PALETTE_NAMES[int(first)], confidence


def _background(pixels: np.ndarray) -> list[np.ndarray]:
    """The dominant border colour, and a second one when it holds a good share of the border."""
    width = max(1, min(pixels.shape[:2]) // 32)
    border = np.concatenate(
        [
            pixels[:width].reshape(-1, 3),
            pixels[-width:].reshape(-1, 3),
            pixels[width:-width, :width].reshape(-1, 3),
            pixels[width:-width, -width:].reshape(-1, 3),
        ]
    )
    colors = [_mode_color(border)]
    rest = border[np.linalg.norm(border - colors[0], axis=1) > 2 * _MIN_CONTRAST]
    if len(rest) >= _SECOND_BACKGROUND * len(border):
        colors.append(_mode_color(rest))
    return colors


def _mode_color(pixels: np.ndarray) -> np.ndarray:
    """Median colour of the most common 32-level colour bin (robust to anti-aliased edges)."""
    bins = (pixels // 32).astype(np.int32)
    keys = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    return np.median(pixels[keys == values[np.argmax(counts)]], axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of `mask` (an empty mask gives an empty mask)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _shift_all(mask: np.ndarray, combine) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    height, width = mask.shape
    result = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            result = combine(result, padded[dy : dy + height, dx : dx + width])
    return result


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening (3x3): removes lines one or two pixels wide, such as the blend along
    a blurred two-tone split, which could otherwise join the subject or outnumber a small one."""
    return _shift_all(_shift_all(mask, np.logical_and), np.logical_or)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = _shift_all(mask, np.logical_or)
    return mask


@cache
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """Centroid (x, y) and variances (x, y) of `shape`'s area in its own unit coordinates."""
    n = 256
    fine = hard_mask(place(shape, (n / 2, n / 2), n / 2), (n, n), 1)
    ys, xs = np.nonzero(fine)
    ux, uy = (xs + 0.5) / (n / 2) - 1, (ys + 0.5) / (n / 2) - 1
    return float(ux.mean()), float(uy.mean()), float(ux.var()), float(uy.var())


def _moments(alpha: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.indices(alpha.shape)
    total = alpha.sum()
    cx, cy = (alpha * (xs + 0.5)).sum() / total, (alpha * (ys + 0.5)).sum() / total
    vx, vy = (alpha * (xs + 0.5 - cx) ** 2).sum() / total, (alpha * (ys + 0.5 - cy) ** 2).sum() / total
    return float(cx), float(cy), float(vx), float(vy)


def _template(
    shape: str, moments: tuple[float, float, float, float], sigma: float, size: tuple[int, int]
) -> np.ndarray:
    """Coverage (0..1) of `shape` placed and scaled so that its centroid and variances, once blurred
    by `sigma`, equal the measured `moments` (a Gaussian blur adds sigma^2 to each variance)."""
    ux, uy, uvx, uvy = _unit_moments(shape)
    cx, cy, vx, vy = moments
    hx, hy = math.sqrt(max(vx - sigma**2, 0.25) / uvx), math.sqrt(max(vy - sigma**2, 0.25) / uvy)
    x0, y0 = cx - ux * hx, cy - uy * hy
    parts = [([(x0 + x * hx, y0 + y * hy) for x, y in poly], filled) for poly, filled in outline(shape)]
    fine = hard_mask(parts, size)
    scale = fine.shape[0] // size[1]
    return _blurred(fine.reshape(size[1], scale, size[0], scale).mean(axis=(1, 3)), sigma)


def _blurred(coverage: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return coverage
    image = Image.fromarray(np.round(coverage * 255).astype(np.uint8), "L")
    return np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32) / 255


def shape_overlaps(alpha: np.ndarray) -> dict[str, float]:
    """Soft intersection-over-union of the subject's coverage `alpha` (0..1, zero away from it)
    with every outline, each placed and scaled to the subject's centroid and spread. Each outline
    is also tried blurred, as a model's output may be soft; the best blur counts for each shape."""
    ys, xs = np.nonzero(alpha > 0)
    top, bottom = max(0, ys.min() - _PAD), min(alpha.shape[0], ys.max() + 1 + _PAD)
    left, right = max(0, xs.min() - _PAD), min(alpha.shape[1], xs.max() + 1 + _PAD)
    crop = alpha[top:bottom, left:right]
    moments = _moments(crop)
    result = {}
    for shape in SHAPE_VOCABULARY:
        best = 0.0
        for sigma in (s * max(1.0, max(alpha.shape) / 64) for s in _BLURS):
            template = _template(shape, moments, sigma, (right - left, bottom - top))
            union = np.maximum(crop, template).sum()
            best = max(best, float(np.minimum(crop, template).sum() / union) if union else 0.0)
        result[shape] = best
    return result


def _nothing(background: tuple[str, ...], color: str = NONE, area: float = 0.0) -> Score:
    return Score(color, NONE, 0.0, 0.0, 0.0, (NONE, 0.0), background, area, (0.5, 0.5))


def score_image(image: Image.Image) -> Score:
    """The dominant foreground colour and shape of `image` (any mode and size)."""
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        factor = MAX_SIDE / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    if min(pixels.shape[:2]) < 8:
        return _nothing(())
    backgrounds = _background(pixels)
    background_names = tuple(_nearest_color(c)[0] for c in backgrounds)
    to_background = np.min([np.linalg.norm(pixels - c, axis=2) for c in backgrounds], axis=0)

    # A first, strict cut finds the subject and its median colour. Then every pixel near it gets a
    # coverage: where it lies between its nearest background colour and the subject's colour.
    peak = float(np.percentile(to_background, 99.5))
    if peak < _MIN_CONTRAST:
        return _nothing(background_names)
    threshold = max(_MIN_CONTRAST, 0.5 * peak)
    candidates = to_background > threshold
    if len(backgrounds) == 2:  # blends along a soft two-tone split are background, not subject
        between = segment_distance(pixels, *backgrounds)
        candidates &= between > 0.5 * threshold
    blob = _largest_component(_open(candidates))
    if not blob.any():
        return _nothing(background_names)
    subject = np.median(pixels[blob], axis=0)
    color, color_confidence = _nearest_color(subject)
    if min(np.linalg.norm(subject - c) for c in backgrounds) < 2 * _MIN_CONTRAST:
        return _nothing(background_names, color)  # a faint blob (smooth noise) is no drawn shape
    nearest = np.argmin([np.linalg.norm(pixels - c, axis=2) for c in backgrounds], axis=0)
    base = np.stack(backgrounds)[nearest]
    direction = subject - base
    alpha = np.sum((pixels - base) * direction, axis=2) / np.maximum(np.sum(direction**2, axis=2), 1e-6)
    alpha = np.where(_dilate(blob, _PAD), np.clip(alpha, 0, 1), 0).astype(np.float32)
    if len(backgrounds) == 2:  # nearer to a blend of the backgrounds than to a subject edge
        alpha[between < segment_distance(pixels, base, subject)] = 0
    mask = _largest_component(alpha >= 0.5)
    area = float(mask.mean())
    if not MIN_AREA <= area <= MAX_AREA:
        return _nothing(background_names, color, area)
    near = _dilate(mask, _PAD)
    alpha = np.where(near, alpha, 0)
    # Other things that stand out from the background make "the" shape a guess (noise, clutter).
    clutter = float((candidates & ~near).mean())
    if clutter > MAX_CLUTTER:
        return _nothing(background_names, color, area)

    overlaps = shape_overlaps(alpha)
    ranked = sorted(overlaps.items(), key=lambda item: -item[1])
    (best, iou), runner_up = ranked[0], ranked[1]
    shape = best if iou >= MIN_IOU else NONE
    ys, xs = np.nonzero(mask)
    center = ((xs.min() + xs.max() + 1) / 2 / mask.shape[1], (ys.min() + ys.max() + 1) / 2 / mask.shape[0])
    confidence = min(color_confidence, iou) if shape != NONE else 0.0
    return Score(
        color,
        shape,
        confidence,
        color_confidence,
        iou,
        runner_up,
        background_names,
        area,
        (float(center[0]), float(center[1])),
    )
