"""Cog adapter for FLUX.1 inference: declare the inputs, call flux/, return the image files."""

import logging
import os
import sys
import tempfile
from pathlib import Path as LocalPath

from cog import BaseRunner, Input, Path

from flux.generate import generate
from flux.loading import load_flux
from flux.output import save_images
from flux.request import MAX_OUTPUTS, OUTPUT_FORMATS, build_request
from flux.safety import SafetyChecker, screen_images
from flux.sizes import ASPECT_RATIOS, CUSTOM, MAX_SIDE, MEGAPIXELS, MIN_SIDE
from flux.variants import VARIANTS, parse_variant_list
from lora.serving import SCALE_RANGE, LoraManager, choose_loras
from weights.lora_cache import default_lora_cache

# Which variants setup() loads; each one more costs a transformer's memory (24 GB in bf16).
ENV_VARIANTS = "FLUX_VARIANTS"
DEFAULT_VARIANTS = "dev,schnell"


class Runner(BaseRunner):
    def setup(self) -> None:
        # Library logs (seed, warnings, loading) go to stdout, which Cog returns as the request's logs.
        logging.basicConfig(
            level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s"
        )
        self.models = load_flux(parse_variant_list(os.environ.get(ENV_VARIANTS, DEFAULT_VARIANTS)))
        self.loras = LoraManager(self.models.transformers, default_lora_cache())
        self.safety = SafetyChecker.load(self.models.device)

    def run(
        self,
        prompt: str = Input(description="What the image shows."),
        model: str = Input(
            description="schnell: 1-4 steps, fast. dev: up to 50 steps, guidance, higher quality.",
            default="dev",
            choices=list(VARIANTS),
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio of the output; 'custom' uses width and height.",
            default="1:1",
            choices=[*ASPECT_RATIOS, CUSTOM],
        ),
        megapixels: str = Input(
            description="Approximate megapixels; '0.25' halves both sides.",
            default="1",
            choices=list(MEGAPIXELS),
        ),
        width: int = Input(
            description=f"Width with aspect_ratio=custom ({MIN_SIDE}-{MAX_SIDE}, rounded to a multiple of 16).",
            default=None,
            ge=MIN_SIDE,
            le=MAX_SIDE,
        ),
        height: int = Input(
            description=f"Height with aspect_ratio=custom ({MIN_SIDE}-{MAX_SIDE}, rounded to a multiple of 16).",
            default=None,
            ge=MIN_SIDE,
            le=MAX_SIDE,
        ),
        num_outputs: int = Input(description="Number of images.", default=1, ge=1, le=MAX_OUTPUTS),
        num_inference_steps: int = Input(
            description="Denoising steps. Default: schnell 4 (at most 4), dev 28 (at most 50).",
            default=None,
            ge=1,
            le=50,
        ),
        guidance: float = Input(
            description="Guidance for dev (schnell ignores it).", default=3.0, ge=0, le=10
        ),
        seed: int = Input(description="Random seed; empty draws one (printed in the logs).", default=None),
        output_format: str = Input(
            description="Image file format.", default="webp", choices=list(OUTPUT_FORMATS)
        ),
        output_quality: int = Input(
            description="Quality for webp and jpg (png ignores it).", default=80, ge=0, le=100
        ),
        image: Path = Input(
            description="Source image for img2img; the output takes its aspect ratio.", default=None
        ),
        prompt_strength: float = Input(
            description="With image: 0 keeps the image, 1 replaces it.", default=0.8, ge=0, le=1
        ),
        mask: Path = Input(
            description="Inpainting mask for image: white is repainted, black kept.", default=None
        ),
        lora_weights: str = Input(
            description="A LoRA: Hugging Face repo or file, Replicate model, CivitAI URL, https URL to a"
            " .safetensors or a trained .tar/.zip, or a data: URL.",
            default=None,
        ),
        replicate_weights: str = Input(
            description="Same as lora_weights (the name trained versions on Replicate use).", default=None
        ),
        lora_scale: float = Input(
            description="Strength of the LoRA; 0 gives the base model.",
            default=1.0,
            ge=SCALE_RANGE[0],
            le=SCALE_RANGE[1],
        ),
        extra_lora: str = Input(description="A second LoRA applied together with the first.", default=None),
        extra_lora_scale: float = Input(
            description="Strength of extra_lora.", default=1.0, ge=SCALE_RANGE[0], le=SCALE_RANGE[1]
        ),
        disable_safety_checker: bool = Input(
            description="Skip the NSFW check of generated images (it drops flagged images).", default=False
        ),
        go_fast: bool = Input(
            description="fp8 and compiled on GPUs that support it (faster, not bit-reproducible); false: bf16.",
            default=True,
        ),
    ) -> list[Path]:
        request = build_request(
            prompt=prompt,
            model=model,
            aspect_ratio=aspect_ratio,
            megapixels=megapixels,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance=guidance,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            image=_local(image),
            prompt_strength=prompt_strength,
            mask=_local(mask),
            go_fast=go_fast,
        )
        loras = choose_loras(lora_weights, replicate_weights, lora_scale, extra_lora, extra_lora_scale)
        self.loras.activate(request.variant.name, loras)
        result = generate(self.models, request)
        images = screen_images(result.images, self.safety, disable_safety_checker)
        out_dir = LocalPath(tempfile.mkdtemp(prefix="flux-out-"))
        paths = save_images(images, out_dir, request.output_format, request.output_quality)
        return [Path(p) for p in paths]


def _local(path: Path | None) -> LocalPath | None:
    return None if path is None else LocalPath(path)
