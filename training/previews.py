"""Preview images generated with the freshly trained LoRA, from fixed prompts with the trigger word.

They go into the weights tar and the Hugging Face model card, so a user sees what the LoRA does
before loading it. Generated through the same flux.generate path as predict.py, on the transformer
that still carries the trained adapter. A failure here is logged and never costs the training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flux.generate import generate
from flux.loading import FluxModels
from flux.request import build_request

log = logging.getLogger(__name__)

ENV_PREVIEW_STEPS = "LORA_PREVIEW_STEPS"

PREVIEW_PROMPTS = (
    "a photo of {trigger}",
    "{trigger} in a sunlit garden, detailed 35mm photograph",
    "a watercolor painting of {trigger}",
)


@dataclass(frozen=True)
class PreviewSettings:
    count: int = 3  # how many of PREVIEW_PROMPTS
    megapixels: str = "0.25"  # 512x512: enough to judge, cheap next to the training
    width: int | None = None  # set both (256-1440) for another size, e.g. small previews in tests
    height: int | None = None
    steps: int = 20
    guidance: float = 3.5  # the inference default of trained FLUX.1 dev versions
    output_format: str = "webp"


def preview_settings_from_env() -> PreviewSettings:
    """Operators can make previews cheaper: LORA_PREVIEW_STEPS=N denoising steps (0: no previews)."""
    raw = os.environ.get(ENV_PREVIEW_STEPS, "").strip()
    if not raw:
        return PreviewSettings()
    if not raw.isdigit() or int(raw) > 50:
        raise ValueError(f"{ENV_PREVIEW_STEPS}={raw!r}: expected an integer from 0 to 50")
    steps = int(raw)
    return PreviewSettings(count=0) if steps == 0 else PreviewSettings(steps=steps)


def preview_prompts(trigger_word: str, count: int) -> list[str]:
    return [" ".join(p.format(trigger=trigger_word).split()) for p in PREVIEW_PROMPTS[:count]]


def render_previews(
    models: FluxModels, trigger_word: str, out_dir: Path, settings: PreviewSettings | None = None
) -> list[tuple[Path, str]]:
    """[(image file, prompt)]; empty (logged) when generation fails."""
    settings = settings or PreviewSettings()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    try:
        for index, (prompt, image) in enumerate(
            generate_samples(models, preview_prompts(trigger_word, settings.count), settings)
        ):
            path = out_dir / f"preview-{index}.{settings.output_format}"
            image.save(path, quality=90)
            written.append((path, prompt))
            log.info("preview %d: %r -> %s", index, prompt, path.name)
    except Exception:
        log.exception("preview generation failed; the trained LoRA is kept without (all) previews")
    return written


def generate_samples(models: FluxModels, prompts: list[str], settings: PreviewSettings):
    """Yield (prompt, image) for each prompt with the preview settings, seeds 0, 1, ...; the transformer
    generates with whatever adapter it carries (the trained LoRA, during or after training)."""
    for index, prompt in enumerate(prompts):
        request = build_request(
            prompt=prompt,
            model="dev",
            aspect_ratio="1:1" if settings.width is None else "custom",
            megapixels=settings.megapixels,
            width=settings.width,
            height=settings.height,
            num_inference_steps=settings.steps,
            guidance=settings.guidance,
            seed=index,
            output_format=settings.output_format,
        )
        yield prompt, generate(models, request).images[0]
