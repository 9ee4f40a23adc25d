"""Output sizes: the fixed Replicate table, custom sizes, and sizes that follow an input image."""

import logging

from errors import UserInputError

log = logging.getLogger(__name__)

# Sizes at megapixels "1": a fixed table (what users get on Replicate), not a formula.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
CUSTOM = "custom"
MEGAPIXELS = ("1", "0.25")
MIN_SIDE, MAX_SIDE, MULTIPLE = 256, 1440, 16


def round_up_to_multiple(value: float, multiple: int = MULTIPLE) -> int:
    """The public predictors round custom and img2img sides up (1000 -> 1008)."""
    return max(multiple, -(-int(value) // multiple) * multiple)


def normalize_megapixels(megapixels: object) -> str:
    """The megapixels choice as its string; API callers also send it as the number 1 or 0.25."""
    if isinstance(megapixels, (int, float)) and not isinstance(megapixels, bool):
        megapixels = {1.0: "1", 0.25: "0.25"}.get(float(megapixels), megapixels)
    if megapixels not in MEGAPIXELS:
        raise UserInputError("megapixels", megapixels, f"allowed: {', '.join(MEGAPIXELS)}")
    return megapixels


def resolve_size(
    aspect_ratio: str, megapixels: str, width: int | None, height: int | None
) -> tuple[int, int]:
    """(width, height) of the output for a text-to-image request."""
    megapixels = normalize_megapixels(megapixels)
    if aspect_ratio == CUSTOM:
        return _custom_side("width", width), _custom_side("height", height)
    if aspect_ratio not in ASPECT_RATIOS:
        allowed = ", ".join([*ASPECT_RATIOS, CUSTOM])
        raise UserInputError("aspect_ratio", aspect_ratio, f"allowed: {allowed}")
    ignored = [
        f"{name}={value}" for name, value in (("width", width), ("height", height)) if value is not None
    ]
    if ignored:
        log.warning(
            "%s ignored: used only with aspect_ratio=custom (got %s)", ", ".join(ignored), aspect_ratio
        )
    w, h = ASPECT_RATIOS[aspect_ratio]
    if megapixels == "0.25":  # a quarter of the pixels: both sides halved
        w, h = w // 2, h // 2
    return w, h


def _custom_side(name: str, value: int | None) -> int:
    if value is None:
        raise UserInputError(name, value, f"required with aspect_ratio=custom ({MIN_SIDE}-{MAX_SIDE})")
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserInputError(name, value, f"an integer from {MIN_SIDE} to {MAX_SIDE}")
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise UserInputError(
            name, value, f"allowed: {MIN_SIDE}-{MAX_SIDE} (rounded to a multiple of {MULTIPLE})"
        )
    return round_up_to_multiple(value)


def size_for_image(image_size: tuple[int, int]) -> tuple[int, int]:
    """Output size for img2img/inpainting: the input's own size, scaled down to fit MAX_SIDE x MAX_SIDE,
    each side rounded up to a multiple of 16 (what the public predictors do; megapixels does not apply)."""
    iw, ih = image_size
    scale = min(MAX_SIDE / iw, MAX_SIDE / ih, 1.0)
    # Rounding up never passes MAX_SIDE: it is itself a multiple of 16.
    return round_up_to_multiple(iw * scale), round_up_to_multiple(ih * scale)
