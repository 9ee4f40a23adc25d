"""A synthetic world of coloured shapes with captions, for training and checking flux-mini.

Every image is one shape (circle, square, ...) of one named colour, size and position on a plain or
two-tone background, and its caption says exactly that: "a small red circle on a blue background,
top left". Everything is deterministic from a seed, so a dataset is rebuilt rather than stored.

Drawing happens at 4x and is box-filtered down: each output pixel is the exact area coverage of the
shape, so edges are anti-aliased while the interior keeps the pure named colour (a LANCZOS filter
would add ringing halos around edges and along a two-tone split, which the scorer would then see as
foreground). Shapes are never rotated: the world stays small enough for a toy model to learn.

A "concept" (a heart, a shape the base world never has) captioned with a trigger word serves the
check that LoRA training teaches something new.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from errors import UserInputError

# Named colours, chosen far apart in RGB (closest pair: orange/yellow, about 90 apart) so that the
# scorer can name a colour robustly even from a blurry model output.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (250, 230, 20),
    "green": (30, 160, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 210),
    "purple": (130, 40, 180),
    "pink": (245, 130, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")
CONCEPT_SHAPE = "heart"  # never in the base world; the LoRA-learning check teaches it
# Outer extent of the shape as a fraction of the image side. "small" stays at a quarter of the image:
# below that a 64 px star or hexagon is too few pixels to tell from a circle.
SIZES: dict[str, float] = {"small": 0.26, "medium": 0.38, "large": 0.52}
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SPLITS = ("plain", "left-right", "top-bottom")  # two-tone backgrounds are split in halves

DEFAULT_SIZE = 64
MIN_SIZE, MAX_SIZE = 32, 1024
SUPERSAMPLE = 4
_SIZE_JITTER = 0.07  # radius varies +-7 %: variety without blurring the size words
_TWO_TONE_PROB = 0.35
_DEFAULT_DROP = 0.25
_MIN_BLEND_DISTANCE = 60.0  # chance to leave out the size or the position words in a caption


@dataclass(frozen=True)
class Attributes:
    """What one image shows; the caption is built from this alone."""

    shape: str
    color: str
    size: str
    position: str
    background: tuple[str, ...]  # one colour, or two for a two-tone background
    split: str  # one of SPLITS; "plain" when background has one colour
    center: tuple[float, float]  # shape centre in pixels (x, y)
    radius: float  # half the shape's outer extent, in pixels
    image_size: int


@dataclass(frozen=True)
class Example:
    image: Image.Image
    caption: str
    attributes: Attributes


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UserInputError("size", size, f"an integer number of pixels from {MIN_SIZE} to {MAX_SIZE}")
    return size


def _check_pairs(field: str, pairs: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    result = frozenset(tuple(p) for p in pairs)
    for pair in result:
        if len(pair) != 2 or pair[0] not in COLORS or pair[1] not in SHAPES + (CONCEPT_SHAPE,):
            raise UserInputError(
                field, pair, f"(colour, shape) pairs with colours {sorted(COLORS)} and shapes {SHAPES}"
            )
    return result


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Geometry: every shape is a list of (polygon, filled) in unit coordinates whose bounding box is
# centred on 0 with a largest half-extent of 1. The scorer fits the same outlines as templates.


def _regular(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(math.radians(start_deg + 360 * k / n)),
            radius * math.sin(math.radians(start_deg + 360 * k / n)),
        )
        for k in range(n)
    ]


def _normalise(
    polys: list[tuple[list[tuple[float, float]], bool]],
) -> list[tuple[list[tuple[float, float]], bool]]:
    xs = [x for poly, _ in polys for x, _ in poly]
    ys = [y for poly, _ in polys for _, y in poly]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return [([((x - cx) / half, (y - cy) / half) for x, y in poly], filled) for poly, filled in polys]


@cache
def outline(shape: str) -> tuple[tuple[tuple[tuple[float, float], ...], bool], ...]:
    """The shape as (polygon, filled) parts; a hole is drawn after its outer part with filled=False."""
    if shape == "circle":
        polys = [(_regular(96, 1.0, 0), True)]
    elif shape == "ring":
        polys = [(_regular(96, 1.0, 0), True), (_regular(96, 0.55, 0), False)]
    elif shape == "square":
        polys = [([(-1, -1), (1, -1), (1, 1), (-1, 1)], True)]
    elif shape == "diamond":
        polys = [([(0, -1), (1, 0), (0, 1), (-1, 0)], True)]
    elif shape == "triangle":  # equilateral, pointing up (y grows downwards)
        polys = [(_regular(3, 1.0, -90), True)]
    elif shape == "hexagon":  # flat top and bottom
        polys = [(_regular(6, 1.0, 0), True)]
    elif shape == "star":  # five points, one up; a fat inner radius keeps small stars star-like
        outer, inner = _regular(5, 1.0, -90), _regular(5, 0.48, -90 + 36)
        polys = [([p for pair in zip(outer, inner, strict=True) for p in pair], True)]
    elif shape == "cross":  # a plus sign with arms a third of the width
        a = 1 / 3
        polys = [
            (
                [
                    (-a, -1),
                    (a, -1),
                    (a, -a),
                    (1, -a),
                    (1, a),
                    (a, a),
                    (a, 1),
                    (-a, 1),
                    (-a, a),
                    (-1, a),
                    (-1, -a),
                    (-a, -a),
                ],
                True,
            )
        ]
    elif shape == CONCEPT_SHAPE:  # the classic parametric heart, lobes up
        ts = np.linspace(0, 2 * np.pi, 120, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        polys = [(list(zip(xs.tolist(), ys.tolist(), strict=True)), True)]
    else:
        raise UserInputError("shape", shape, f"one of {SHAPES + (CONCEPT_SHAPE,)}")
    return tuple((tuple(poly), filled) for poly, filled in _normalise(polys))


def place(
    shape: str, center: tuple[float, float], radius: float
) -> list[tuple[list[tuple[float, float]], bool]]:
    """The outline of `shape` in pixel coordinates: centred on `center`, half-extent `radius`."""
    cx, cy = center
    return [
        ([(cx + x * radius, cy + y * radius) for x, y in poly], filled) for poly, filled in outline(shape)
    ]


def hard_mask(
    parts: list[tuple[list[tuple[float, float]], bool]], size: tuple[int, int], scale: int = SUPERSAMPLE
) -> np.ndarray:
    """Boolean mask of placed `parts` drawn at `scale` times `size` (width, height)."""
    big = Image.new("1", (size[0] * scale, size[1] * scale), 0)
    pen = ImageDraw.Draw(big)
    for poly, filled in parts:
        pen.polygon([(x * scale, y * scale) for x, y in poly], fill=1 if filled else 0)
    return np.asarray(big, dtype=bool)


def segment_distance(pixels: np.ndarray, a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """RGB distance of each pixel (..., 3) to the segment of blends between colours a and b (single
    colours, or one per pixel)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    t = np.clip(
        np.sum((pixels - a) * (b - a), axis=-1) / np.maximum(np.sum((b - a) ** 2, axis=-1), 1e-6), 0, 1
    )
    return np.linalg.norm(pixels - (a + t[..., None] * (b - a)), axis=-1)


# ---------------------------------------------------------------------------------------------
# Sampling, drawing and captions


def allowed_pairs(exclude: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Every (colour, shape) pair of the base world except `exclude`, in a fixed order."""
    excluded = _check_pairs("exclude", exclude)
    return [(c, s) for s in SHAPES for c in COLORS if (c, s) not in excluded]


def sample_attributes(
    seed: int | np.random.Generator,
    size: int = DEFAULT_SIZE,
    pairs: Sequence[tuple[str, str]] | None = None,
    backgrounds: Sequence[str] | None = None,
    sizes: Sequence[str] | None = None,
    two_tone: float = _TWO_TONE_PROB,
) -> Attributes:
    """Random attributes: a (colour, shape) from `pairs` (default: all), size, position, background
    (two-tone with probability `two_tone`; 0 gives plain backgrounds only, as flux-mini trains)."""
    size = _check_size(size)
    rng = _rng(seed)
    pairs = allowed_pairs() if pairs is None else list(pairs)
    if not pairs:
        raise UserInputError("pairs", pairs, "at least one (colour, shape) pair")
    color, shape = pairs[int(rng.integers(len(pairs)))]
    size_names = list(SIZES) if sizes is None else list(sizes)
    if not size_names or not set(size_names) <= set(SIZES):
        raise UserInputError("sizes", sizes, f"one or more of {', '.join(SIZES)}")
    size_name = size_names[int(rng.integers(len(size_names)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    others = [c for c in (COLORS if backgrounds is None else backgrounds) if c != color]
    # Two-tone only with halves whose blend could not pass for the shape's colour (orange lies
    # between red and yellow): a blurred split line must never look like the subject.
    two_tones = [
        (a, b)
        for a in others
        for b in others
        if a != b and segment_distance(np.array(COLORS[color]), COLORS[a], COLORS[b]) >= _MIN_BLEND_DISTANCE
    ]
    if rng.random() < two_tone and two_tones:
        split = SPLITS[1 + int(rng.integers(2))]
        background = two_tones[int(rng.integers(len(two_tones)))]
    else:
        split = "plain"
        background = (others[int(rng.integers(len(others)))],)
    radius = SIZES[size_name] * size / 2 * (1 + _SIZE_JITTER * (2 * rng.random() - 1))
    # The centre range along each axis keeps a margin to the border; it is cut in thirds and the
    # centre falls in the middle part of its third, so neighbouring position words never meet.
    margin = max(2.0, 0.05 * size)
    low, high = margin + radius, size - margin - radius
    third = (high - low) / 3
    row, col = divmod(POSITIONS.index(position), 3)
    cx = low + third * (col + 0.2 + 0.6 * rng.random())
    cy = low + third * (row + 0.2 + 0.6 * rng.random())
    return Attributes(shape, color, size_name, position, background, split, (cx, cy), radius, size)


def render(attrs: Attributes) -> Image.Image:
    """The image that `attrs` describes (RGB, image_size x image_size)."""
    n, s = attrs.image_size, SUPERSAMPLE
    canvas = np.empty((n * s, n * s, 3), dtype=np.uint8)
    canvas[:] = COLORS[attrs.background[0]]
    if attrs.split == "left-right":
        canvas[:, n * s // 2 :] = COLORS[attrs.background[1]]
    elif attrs.split == "top-bottom":
        canvas[n * s // 2 :, :] = COLORS[attrs.background[1]]
    # Composite at 4x with a hard mask, then box-filter: edges become exact coverage blends.
    canvas[hard_mask(place(attrs.shape, attrs.center, attrs.radius), (n, n))] = COLORS[attrs.color]
    return Image.fromarray(canvas, "RGB").resize((n, n), Image.Resampling.BOX)


def caption(
    attrs: Attributes, with_size: bool = True, with_position: bool = True, shape_word: str | None = None
) -> str:
    """'a small red circle on a blue background, top left'; two-tone: 'on a blue and white background'.

    The article follows the next word ("an orange square", "on an orange background")."""
    words = ([attrs.size] if with_size else []) + [attrs.color, shape_word or attrs.shape]
    text = f"{_article(words[0])} {' '.join(words)} on {_article(attrs.background[0])} {' and '.join(attrs.background)} background"
    return text + (f", {attrs.position}" if with_position else "")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def generate_example(
    seed: int | np.random.Generator,
    size: int = DEFAULT_SIZE,
    exclude: Iterable[tuple[str, str]] = (),
    drop: float = _DEFAULT_DROP,
) -> Example:
    """One captioned image. `drop` is the chance to leave out the size words and, separately, the
    position words, so that a model trained on these captions also follows the short prompts users
    type ("a red circle on a white background")."""
    rng = _rng(seed)
    attrs = sample_attributes(rng, size, pairs=allowed_pairs(exclude))
    with_size, with_position = rng.random() >= drop, rng.random() >= drop
    return Example(render(attrs), caption(attrs, with_size, with_position), attrs)


def generate_dataset(
    n: int,
    seed: int | Sequence[int] = 0,
    size: int = DEFAULT_SIZE,
    exclude: Iterable[tuple[str, str]] = (),
    drop: float = _DEFAULT_DROP,
    two_tone: float = _TWO_TONE_PROB,
    sizes: Sequence[str] | None = None,
) -> list[Example]:
    """`n` captioned images, none showing a (colour, shape) pair in `exclude`, their shapes in one of
    `sizes` (default: all). Deterministic; `seed` is anything numpy's default_rng takes (a tuple for
    one chunk of a larger draw, toys.mini.dataset)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserInputError("n", n, "a whole number of images, 0 or more")
    pairs = allowed_pairs(exclude)  # validates once, not per image
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        attrs = sample_attributes(rng, size, pairs=pairs, sizes=sizes, two_tone=two_tone)
        with_size, with_position = rng.random() >= drop, rng.random() >= drop
        examples.append(Example(render(attrs), caption(attrs, with_size, with_position), attrs))
    return examples


def held_out_pairs(seed: int = 0) -> frozenset[tuple[str, str]]:
    """One unseen colour per shape, all colours different: every shape and every colour is still in
    training, only their combination is new (the text-to-image quality bar prompts these)."""
    order = np.random.default_rng(seed).permutation(len(COLORS))
    names = list(COLORS)
    return frozenset((names[int(order[i])], shape) for i, shape in enumerate(SHAPES))


def held_out_prompts(
    n: int = 100,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    two_tone: float = _TWO_TONE_PROB,
    sizes: Sequence[str] | None = None,
) -> list[Example]:
    """`n` examples (prompt, attributes, reference image) whose pairs are all in held_out_pairs(seed),
    their shapes in one of `sizes` (default: all)."""
    pairs = sorted(held_out_pairs(seed))
    rng = np.random.default_rng(seed + 1)
    result = []
    for _ in range(n):
        attrs = sample_attributes(rng, size, pairs=pairs, sizes=sizes, two_tone=two_tone)
        result.append(Example(render(attrs), caption(attrs), attrs))
    return result


def generate_concept_example(
    seed: int | np.random.Generator, size: int = DEFAULT_SIZE, trigger: str = "TOK", background: str = "white"
) -> Example:
    """The new concept (a heart) on a plain background, captioned with `trigger` in place of the
    shape word: "a large red TOK on a white background, top left". Medium or large only."""
    if background not in COLORS:
        raise UserInputError("background", background, f"one of {sorted(COLORS)}")
    rng = _rng(seed)
    pairs = [(c, CONCEPT_SHAPE) for c in COLORS if c != background]
    attrs = sample_attributes(rng, size, pairs=pairs, backgrounds=[background], sizes=["medium", "large"])
    return Example(render(attrs), caption(attrs, shape_word=trigger), attrs)


def generate_concept_dataset(
    n: int, seed: int = 0, size: int = DEFAULT_SIZE, trigger: str = "TOK"
) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [generate_concept_example(rng, size, trigger) for _ in range(n)]


def write_dataset(examples: Iterable[Example], dest: str | Path) -> Path:
    """Write image + same-stem caption pairs (00000.png, 00000.txt, ...): a zip when `dest` ends in
    .zip (the training zip format; fixed timestamps, so the same examples give the same bytes),
    else a folder."""
    dest = Path(dest)
    files: list[tuple[str, bytes]] = []
    for i, example in enumerate(examples):
        png = io.BytesIO()
        example.image.save(png, format="PNG")
        files += [(f"{i:05d}.png", png.getvalue()), (f"{i:05d}.txt", example.caption.encode("utf-8"))]
    if dest.suffix.lower() == ".zip":
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in files:
                archive.writestr(
                    zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED
                )
    else:
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (dest / name).write_bytes(data)
    return dest
