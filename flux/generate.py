"""Turn a validated GenerationRequest into images with the loaded models."""

import logging
import os
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from PIL import Image

from flux.fast.path import setup_fast
from flux.fast.step_cache import StepCacheReport, step_caching
from flux.images import open_user_image, open_user_mask
from flux.loading import FluxModels
from flux.request import GenerationRequest, denoising_steps
from flux.sizes import size_for_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seed: int
    width: int
    height: int
    step_cache: StepCacheReport | None = None  # what step caching skipped, when the request asked for it


def draw_seed() -> int:
    return int.from_bytes(os.urandom(4), "big")


def generate(models: FluxModels, request: GenerationRequest) -> GenerationResult:
    """Text-to-image, img2img (request.image) or inpainting (request.image + request.mask)."""
    variant = request.variant
    components = dict(
        transformer=models.transformer_for(variant),
        # A fresh scheduler per request: pipelines keep step state on it.
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.scheduler_configs[variant.name]),
        vae=models.vae,
        text_encoder=models.text_encoder,
        text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer,
        tokenizer_2=models.tokenizer_2,
    )
    seed = draw_seed() if request.seed is None else request.seed
    print(f"Using seed: {seed}", flush=True)
    warn_if_truncated(models, request)

    width, height = request.width, request.height
    extra: dict = {}
    if request.image is not None:
        image = open_user_image(request.image, "image")
        width, height = size_for_image(image.size)
        if denoising_steps(request.num_inference_steps, request.prompt_strength) < 1:
            return _source_back(image, request, seed, width, height)
        extra = dict(image=image, strength=request.prompt_strength)
        pipeline_class = FluxImg2ImgPipeline
        if request.mask is not None:
            extra["mask_image"] = open_user_mask(request.mask, "mask", size=image.size)
            pipeline_class = FluxInpaintPipeline
    else:
        pipeline_class = FluxPipeline

    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    if models.fast is None:  # models built without load_flux (benchmarks, notebooks)
        models.fast = setup_fast(models.transformers, models.device)
    # A CPU generator gives the same noise on every device, so a seed means the same image everywhere.
    generator = torch.Generator("cpu").manual_seed(seed)
    # The VAE and CLIP are on the GPU for the whole request unless the plan parks them (training's).
    with (
        torch.inference_mode(),
        models.visiting("vae", "clip"),
        models.fast.session(variant.name, request.go_fast),
    ):
        prompt_embeds, pooled = prompt_embeddings(models, pipe, request)
        with step_caching(pipe.transformer, request.step_cache, request.transformer_calls) as cache_report:
            output = pipe(
                prompt_embeds=prompt_embeds.repeat(request.num_outputs, 1, 1),
                pooled_prompt_embeds=pooled.repeat(request.num_outputs, 1),
                width=width,
                height=height,
                num_images_per_prompt=1,  # the embeddings above are already one per image
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance,
                generator=generator,
                output_type="pil",
                **extra,
            )
    images = list(output.images)
    if "mask_image" in extra:
        images = [keep_unmasked(extra["image"], extra["mask_image"], generated) for generated in images]
    return GenerationResult(images=images, seed=seed, width=width, height=height, step_cache=cache_report)


def _source_back(image: Image.Image, request: GenerationRequest, seed: int, width: int, height: int):
    """A prompt_strength that leaves no denoising step changes nothing: the source comes back, as on
    the public models (where the pipeline runs zero steps), instead of failing the request."""
    log.warning(
        "prompt_strength=%g with %d steps leaves no denoising step: returning the input image",
        request.prompt_strength,
        request.num_inference_steps,
    )
    resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    return GenerationResult(
        images=[resized.copy() for _ in range(request.num_outputs)], seed=seed, width=width, height=height
    )


def prompt_embeddings(
    models: FluxModels, pipe, request: GenerationRequest
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 and pooled CLIP embeddings for one image, reused when the same prompt comes again."""
    variant = request.variant

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=request.prompt,
            prompt_2=None,
            device=models.device,
            num_images_per_prompt=1,
            max_sequence_length=variant.max_sequence_length,
        )
        return prompt_embeds, pooled

    def encode_with_t5_in() -> tuple[torch.Tensor, torch.Tensor]:
        with models.visiting("t5"):  # moved in only on a miss, when the plan keeps it in host memory
            return encode()

    return models.prompt_embeddings.get(
        request.prompt, variant.name, variant.max_sequence_length, encode_with_t5_in
    )


def keep_unmasked(source: Image.Image, mask: Image.Image, generated: Image.Image) -> Image.Image:
    """Paste the source back where the mask is black: the VAE round trip alone would blur what the user keeps.

    Grey mask values blend the two, so soft mask edges stay soft.
    """
    size = generated.size
    return Image.composite(
        generated, source.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.BILINEAR)
    )


def warn_if_truncated(models: FluxModels, request: GenerationRequest) -> None:
    limit = request.variant.max_sequence_length
    count = len(models.tokenizer_2(request.prompt, truncation=False).input_ids)
    if count > limit:
        log.warning(
            "prompt is %d T5 tokens; FLUX.1 %s reads at most %d, so the end of the prompt is ignored",
            count,
            request.variant.name,
            limit,
        )
