"""A text-to-image request as plain Python, validated in one place."""

import math
from dataclasses import dataclass
from pathlib import Path

from errors import UserInputError
from flux.sizes import normalize_megapixels, resolve_size
from flux.variants import VariantSpec, get_variant

OUTPUT_FORMATS = ("webp", "jpg", "png")
MAX_OUTPUTS = 4
MAX_SEED = 2**32 - 1  # torch generators take any 64-bit value; keep seeds portable and printable


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    variant: VariantSpec
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    guidance: float
    seed: int | None
    output_format: str
    output_quality: int
    megapixels: str = "1"  # also sizes img2img/inpainting outputs, which follow the input's aspect ratio
    image: Path | None = None
    prompt_strength: float = 0.8
    mask: Path | None = None
    # fp8 + compiled blocks where the GPU supports it (not bit-reproducible); false: the bf16 eager path.
    go_fast: bool = True


def build_request(
    *,
    prompt: str,
    model: str = "dev",
    aspect_ratio: str = "1:1",
    megapixels: str = "1",
    width: int | None = None,
    height: int | None = None,
    num_outputs: int = 1,
    num_inference_steps: int | None = None,
    guidance: float = 3.0,
    seed: int | None = None,
    output_format: str = "webp",
    output_quality: int = 80,
    image: Path | None = None,
    prompt_strength: float = 0.8,
    mask: Path | None = None,
    go_fast: bool = True,
) -> GenerationRequest:
    """Check every input against its rules; raise UserInputError naming the first bad field.

    The Cog server does not validate inputs without the schema that `cog build` generates, so
    every range and choice is checked here, not only declared on the Cog Input.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserInputError("prompt", prompt, "a non-empty text")
    variant = get_variant(model)
    w, h = resolve_size(aspect_ratio, megapixels, width, height)
    _int_in_range("num_outputs", num_outputs, 1, MAX_OUTPUTS)
    if num_inference_steps is None:
        num_inference_steps = variant.default_steps
    _int_in_range(
        "num_inference_steps", num_inference_steps, 1, variant.max_steps, f" for model={variant.name}"
    )
    _number_in_range("guidance", guidance, 0, 10)
    if seed is not None:
        _int_in_range("seed", seed, 0, MAX_SEED)
    if output_format not in OUTPUT_FORMATS:
        raise UserInputError("output_format", output_format, f"allowed: {', '.join(OUTPUT_FORMATS)}")
    _int_in_range("output_quality", output_quality, 0, 100)
    _number_in_range("prompt_strength", prompt_strength, 0, 1)
    if mask is not None and image is None:
        raise UserInputError("mask", str(mask), "a mask needs an image to inpaint; send image too")
    if image is not None and denoising_steps(num_inference_steps, prompt_strength) < 1:
        raise UserInputError(
            "prompt_strength",
            prompt_strength,
            f"with {num_inference_steps} steps it leaves no denoising step; use a larger prompt_strength",
        )
    if not isinstance(go_fast, bool):
        raise UserInputError("go_fast", go_fast, "true or false")
    return GenerationRequest(
        prompt=prompt,
        variant=variant,
        width=w,
        height=h,
        num_outputs=num_outputs,
        num_inference_steps=num_inference_steps,
        guidance=float(guidance),
        seed=seed,
        output_format=output_format,
        output_quality=output_quality,
        megapixels=normalize_megapixels(megapixels),
        image=image,
        prompt_strength=float(prompt_strength),
        mask=mask,
        go_fast=go_fast,
    )


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """How many steps img2img/inpainting really runs (the diffusers rule: the first steps are skipped)."""
    skipped = int(max(num_inference_steps - num_inference_steps * strength, 0))
    return num_inference_steps - skipped


def _int_in_range(field: str, value: object, low: int, high: int, context: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserInputError(field, value, f"an integer from {low} to {high}{context}")


def _number_in_range(field: str, value: object, low: float, high: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise UserInputError(field, value, f"a number from {low} to {high}")
