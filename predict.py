"""Cog adapter for FLUX.1 inference: declare the inputs, call flux/ and lora/, return the image files.

`cog build` reads the Input(...) declarations below as text (no import), so they hold only literals;
tests/test_cog_schema.py checks them against the library's constants and against cog's reading.
"""

import logging
import os
import sys
from pathlib import Path as LocalPath

from cog import BaseRunner, Input, Path, Secret

from flux.attention import configure_attention_backends
from flux.fast.step_cache import prepare_step_cache
from flux.generate import generate
from flux.host_memory import release_free_host_memory
from flux.loading import load_flux
from flux.output import OUTPUT_PREFIX, save_images
from flux.request import build_request
from flux.safety import SafetyChecker, screen_images
from flux.variants import parse_variant_list
from lora.serving import LoraManager, choose_loras, warn_if_trigger_missing
from weights.lora_cache import default_lora_cache
from weights.lora_tokens import LoraTokens
from weights.owned_folders import OwnedFolder, remove_abandoned
from weights.version_lora import fetch_version_lora

# Which variants setup() loads; each one more costs a transformer's memory (24 GB in bf16).
ENV_VARIANTS = "FLUX_VARIANTS"
DEFAULT_VARIANTS = "dev,schnell"


class Runner(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """`weights`: COG_WEIGHTS, which cog sets on a trained version (the training's output tar);
        that LoRA is then every request's LoRA unless the request names its own."""
        # Library logs (seed, warnings, loading) go to stdout, which Cog returns as the request's logs.
        logging.basicConfig(
            level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s"
        )
        configure_attention_backends()
        prepare_step_cache()
        cache = default_lora_cache()
        # What killed servers left behind: their output folders and partial LoRA downloads.
        remove_abandoned(OUTPUT_PREFIX)
        cache.remove_abandoned()
        # One output folder for the server's life: each request empties it first (Cog has sent the
        # previous request's files by then; requests run one at a time), so outputs never pile up.
        self.outputs = OwnedFolder(OUTPUT_PREFIX)
        # Fetched before the models load: a trained version whose weights are unreachable fails at once.
        self.version = fetch_version_lora(weights, cache) if weights else None
        self.models = load_flux(parse_variant_list(os.environ.get(ENV_VARIANTS, DEFAULT_VARIANTS)))
        self.loras = LoraManager(self.models.transformers, cache, self.models.placement)
        if self.version is not None:
            self.loras.prepare_version(self.version)
        self.safety = SafetyChecker.load(self.models.device)

    def run(
        self,
        prompt: str = Input(description="What the image shows. Empty: an image without a prompt."),
        model: str = Input(
            description="dev: up to 50 steps with guidance, higher quality. schnell: 4 steps, fast.",
            default="dev",
            choices=["dev", "schnell"],
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio of the output; custom uses width and height. Ignored with image.",
            default="1:1",
            choices=[
                "1:1",
                "16:9",
                "21:9",
                "3:2",
                "2:3",
                "4:5",
                "5:4",
                "3:4",
                "4:3",
                "9:16",
                "9:21",
                "custom",
            ],
        ),
        megapixels: str = Input(
            description="Approximate megapixels; 0.25 halves both sides. Ignored with image.",
            default="1",
            choices=["1", "0.25"],
        ),
        width: int | None = Input(
            description="Width with aspect_ratio=custom (256-1440, rounded up to a multiple of 16); ignored otherwise.",
            default=None,
            ge=256,
            le=1440,
        ),
        height: int | None = Input(
            description="Height with aspect_ratio=custom (256-1440, rounded up to a multiple of 16); ignored otherwise.",
            default=None,
            ge=256,
            le=1440,
        ),
        num_outputs: int = Input(description="Number of images.", default=1, ge=1, le=4),
        num_inference_steps: int | None = Input(
            description="Denoising steps (1-50). Empty: 4 for schnell (distilled for 4), 28 for dev.",
            default=None,
            ge=1,
            le=50,
        ),
        guidance: float | None = Input(
            description="Guidance for dev (schnell ignores it); empty: 3. Same as guidance_scale.",
            default=None,
            ge=0,
            le=10,
        ),
        guidance_scale: float | None = Input(
            description="Same as guidance (the name trained versions use); empty: 3. Send one of the two.",
            default=None,
            ge=0,
            le=10,
        ),
        seed: int | None = Input(
            description="Random seed for reproducible images; empty or negative draws one (printed in the logs).",
            default=None,
        ),
        output_format: str = Input(
            description="Image file format.", default="webp", choices=["webp", "jpg", "png"]
        ),
        output_quality: int = Input(
            description="Quality for webp and jpg (png ignores it).", default=80, ge=0, le=100
        ),
        image: Path | None = Input(
            description="Source image for img2img or inpainting; the output keeps its size (at most 1440x1440).",
            default=None,
        ),
        prompt_strength: float = Input(
            description="With image: 0 keeps the image, 1 replaces it.", default=0.8, ge=0, le=1
        ),
        mask: Path | None = Input(
            description="Inpainting mask for image: white is repainted, black kept.", default=None
        ),
        lora_weights: str | None = Input(
            description="A LoRA: Replicate model (owner/model), Hugging Face repo or file, CivitAI URL, https URL to a .safetensors or a trained .tar/.zip, or a data: URL.",
            default=None,
        ),
        replicate_weights: str | None = Input(
            description="Same as lora_weights (the name trained versions on Replicate use).", default=None
        ),
        lora_scale: float = Input(
            description="Strength of the LoRA; 0 gives the base model.", default=1.0, ge=-1, le=3
        ),
        extra_lora: str | None = Input(
            description="A second LoRA applied together with the first.", default=None
        ),
        extra_lora_scale: float = Input(description="Strength of extra_lora.", default=1.0, ge=-1, le=3),
        hf_api_token: Secret | None = Input(
            description="Hugging Face token for private or gated LoRAs (else HF_TOKEN).", default=None
        ),
        civitai_api_token: Secret | None = Input(
            description="CivitAI token for LoRAs that need one (else CIVITAI_API_TOKEN).", default=None
        ),
        disable_safety_checker: bool = Input(
            description="Skip the NSFW check of generated images (it drops flagged images).", default=False
        ),
        go_fast: bool = Input(
            description="fp8 and compiled on GPUs that support it (faster, not bit-reproducible); false: bf16.",
            default=True,
        ),
        step_cache: str = Input(
            description="Skip transformer work on steps that change little (cache-dit): light, medium or strong trade more speed for more change; off: every step computed.",
            default="off",
            choices=["off", "light", "medium", "strong"],
        ),
    ) -> list[Path]:
        # What the previous request freed (it succeeded or failed) goes back to the system first:
        # sizes that never repeat fragment the allocator, and the footprint would grow without end.
        release_free_host_memory()
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
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            image=_local(image),
            prompt_strength=prompt_strength,
            mask=_local(mask),
            go_fast=go_fast,
            step_cache=step_cache,
        )
        loras = choose_loras(
            lora_weights, replicate_weights, lora_scale, extra_lora, extra_lora_scale, version=self.version
        )
        warn_if_trigger_missing(request.prompt, loras, self.version)
        tokens = LoraTokens(hf=_secret(hf_api_token), civitai=_secret(civitai_api_token))
        self.loras.activate(request.variant.name, loras, tokens=tokens)
        result = generate(self.models, request)
        images = screen_images(result.images, self.safety, disable_safety_checker)
        paths = save_images(images, self.outputs.empty(), request.output_format, request.output_quality)
        return [Path(p) for p in paths]


def _local(path: Path | None) -> LocalPath | None:
    return None if path is None else LocalPath(path)


def _secret(secret: Secret | None) -> str | None:
    return None if secret is None else secret.get_secret_value()
