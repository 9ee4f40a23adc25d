"""A text-to-image request as plain Python, validated in one place."""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from errors import UserInputError
from flux.fast.step_cache import STEP_CACHE_OFF, check_step_cache
from flux.sizes import normalize_megapixels, resolve_size
from flux.variants import MAX_STEPS, VariantSpec, get_variant

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("webp", "jpg", "png")
MAX_OUTPUTS = 4
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts; a negative seed means "draw one"
# The public models' default (the base dev model's `guidance` and trained versions' `guidance_scale`).
DEFAULT_GUIDANCE = 3.0
MAX_GUIDANCE = 10.0


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
    megapixels: str = "1"  # text-to-image only: img2img/inpainting outputs keep the input image's size
    image: Path | None = None
    prompt_strength: float = 0.8
    mask: Path | None = None
    # fp8 + compiled blocks where the GPU supports it (not bit-reproducible); false: the bf16 eager path.
    go_fast: bool = True
    # Named level of step caching (flux/fast/step_cache.py); "off" computes every block on every step.
    step_cache: str = STEP_CACHE_OFF

    @property
    def transformer_calls(self) -> int:
        """Denoising steps the pipeline runs: img2img and inpainting skip the first ones."""
        if self.image is None:
            return self.num_inference_steps
        return denoising_steps(self.num_inference_steps, self.prompt_strength)


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
    guidance: float | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    output_format: str = "webp",
    output_quality: int = 80,
    image: Path | None = None,
    prompt_strength: float = 0.8,
    mask: Path | None = None,
    go_fast: bool = True,
    step_cache: str = STEP_CACHE_OFF,
) -> GenerationRequest:
    """Check every input against its rules; raise UserInputError naming the first bad field.

    What the public FLUX predictors accept is accepted here with the same meaning (an empty prompt,
    width/height next to a preset aspect ratio, a mask without an image, schnell above 4 steps);
    where they quietly ignore something, a warning in the logs says so.
    """
    if not isinstance(prompt, str):
        raise UserInputError("prompt", prompt, "a text (an empty one generates without a prompt)")
    if not prompt.strip():
        log.warning("prompt is empty: generating without a prompt (an unconditional image)")
    variant = get_variant(model)
    w, h = resolve_size(aspect_ratio, megapixels, width, height)
    _int_in_range("num_outputs", num_outputs, 1, MAX_OUTPUTS)
    if num_inference_steps is None:
        num_inference_steps = variant.default_steps
    _int_in_range("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
    if num_inference_steps > variant.recommended_max_steps:
        log.warning(
            "num_inference_steps=%d: FLUX.1 %s is distilled for %d steps; more rarely look better",
            num_inference_steps,
            variant.name,
            variant.recommended_max_steps,
        )
    guidance = resolve_guidance(guidance, guidance_scale)
    seed = _seed(seed)
    if output_format not in OUTPUT_FORMATS:
        raise UserInputError("output_format", output_format, f"allowed: {', '.join(OUTPUT_FORMATS)}")
    _int_in_range("output_quality", output_quality, 0, 100)
    _number_in_range("prompt_strength", prompt_strength, 0, 1)
    if mask is not None and image is None:
        log.warning("mask given without an image: ignored, generating from text alone")
        mask = None
    if not isinstance(go_fast, bool):
        raise UserInputError("go_fast", go_fast, "true or false")
    check_step_cache(step_cache)
    return GenerationRequest(
        prompt=prompt,
        variant=variant,
        width=w,
        height=h,
        num_outputs=num_outputs,
        num_inference_steps=num_inference_steps,
        guidance=guidance,
        seed=seed,
        output_format=output_format,
        output_quality=output_quality,
        megapixels=normalize_megapixels(megapixels),
        image=image,
        prompt_strength=float(prompt_strength),
        mask=mask,
        go_fast=go_fast,
        step_cache=step_cache,
    )


def resolve_guidance(guidance: float | None, guidance_scale: float | None) -> float:
    """`guidance` (the base models' name) and `guidance_scale` (trained versions') are one setting."""
    for field, value in (("guidance", guidance), ("guidance_scale", guidance_scale)):
        if value is not None:
            _number_in_range(field, value, 0, MAX_GUIDANCE)
    if guidance is not None and guidance_scale is not None and float(guidance) != float(guidance_scale):
        raise UserInputError(
            "guidance_scale",
            guidance_scale,
            f"the same setting as guidance (got guidance={guidance:g}): send one of the two",
        )
    chosen = guidance if guidance is not None else guidance_scale
    return DEFAULT_GUIDANCE if chosen is None else float(chosen)


def _seed(seed: object) -> int | None:
    """None draws a seed; so does a negative one, as on the public models."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed > MAX_SEED:
        raise UserInputError("seed", seed, f"an integer up to {MAX_SEED} (empty or negative: a random seed)")
    return None if seed < 0 else seed


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
        raise UserInputError(field, value, f"a number from {low:g} to {high:g}")
