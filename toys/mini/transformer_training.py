"""Stage 2 of flux-mini: the FluxTransformer2DModel, every weight trained, through the project's own
LoRA training loop (training.loop.train_parameters): the same cache, packing, sigmoid-normal timesteps
with the dev scheduler's shift, flow-matching loss and guidance input (1.0) as a LoRA training.

Guidance: flux-mini dev is not guidance-distilled (that needs a teacher). Its guidance embedder is
frozen with a zero output weight, so it adds the same constant whatever guidance a request sends:
dev accepts the guidance input and ignores it. That constant is what makes the schnell copy exact
(see schnell_from_dev).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from flux.loading import FluxModels
from toys.mini.spec import MiniSpec
from training.buckets import Sample
from training.cache import TensorStore, TrainingCache, build_cache
from training.config import TrainingConfig
from training.loop import LoopResult, TimestepSampler, train_parameters
from training.recipe import sample_timesteps

log = logging.getLogger(__name__)

GUIDANCE_EMBEDDER = "time_text_embed.guidance_embedder."


def build_transformer(spec: MiniSpec, guidance_embeds: bool, seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed in 2x2 patches
        num_layers=spec.double_blocks,
        num_single_layers=spec.single_blocks,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.t5_dim,
        pooled_projection_dim=spec.clip_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=list(spec.rope_axes),
    )
    if guidance_embeds:
        with torch.no_grad():
            transformer.time_text_embed.guidance_embedder.linear_2.weight.zero_()
    return transformer


def trainable_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every weight but the guidance embedder (frozen: its output must stay one constant)."""
    chosen = []
    for name, param in transformer.named_parameters():
        param.requires_grad_(not name.startswith(GUIDANCE_EMBEDDER))
        if param.requires_grad:
            chosen.append(param)
    return chosen


def warmup_cosine(warmup: int, total: int, floor: float = 0.05):
    def schedule(step: int) -> float:
        if step <= warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def high_noise_timesteps(share: float, low: float) -> TimestepSampler:
    """The recipe's noise levels, with `share` of each batch (on average) drawn uniformly in (low, 1)
    instead: the noise levels at which the transformer can only learn the colours from the text."""

    def draw(batch: int, image_seq_len: int, scheduler_config: dict, generator: torch.Generator):
        recipe = sample_timesteps(batch, image_seq_len, scheduler_config, generator)
        high = low + (1 - low) * torch.rand(batch, generator=generator)
        chosen = torch.rand(batch, generator=generator) < share
        return torch.where(chosen, high, recipe).clamp(1e-4, 1 - 1e-4)

    return draw


def train_transformer(
    models: FluxModels, images: list, captions: list[str], spec: MiniSpec, max_sequence_length: int
) -> LoopResult:
    """Full-parameter flow-matching training of models.transformers['dev'] on (image, caption) pairs."""
    transformer = models.transformers["dev"]
    side = spec.image_size
    samples = [Sample(index=i, width=side, height=side, resolution=side) for i in range(len(images))]
    # T5 at the length dev reads at inference (512). Its pads embed to exact zeros (toys.mini.text),
    # so the first 32 positions of these embeddings are exactly what a 32-token prompt gives.
    cache = build_cache(models, images, captions, samples, max_sequence_length, folder=None)
    # Phase 1, short text: the ~500 identical pad tokens of a 512-token prompt take most of the
    # attention at first and make a step 3-4x dearer; with 32 tokens the transformer learns to read
    # the words sooner. Phase 2, full length: it adapts to the pads it meets at inference.
    first = _train_phase(
        transformer,
        shortened(cache, spec.short_text_tokens),
        samples,
        spec,
        models,
        spec.steps,
        spec.learning_rate,
        spec.seed,
        spec.warmup_steps,
    )
    second = _train_phase(
        transformer,
        cache,
        samples,
        spec,
        models,
        spec.adapt_steps,
        spec.adapt_learning_rate,
        spec.seed + 1,
        spec.adapt_steps // 10,
    )
    return LoopResult(
        losses=first.losses + second.losses,
        optimizer=first.optimizer,
        gradient_checkpointing=first.gradient_checkpointing,
        seconds=first.seconds + second.seconds,
    )


def shortened(cache: TrainingCache, tokens: int) -> TrainingCache:
    """The same cache with every T5 sequence cut to its first `tokens` positions."""
    texts = TensorStore(None)
    for number in range(max(*cache.caption_of_sample, cache.empty_caption) + 1):
        entry = cache.texts.get(str(number))
        texts.put(str(number), {"prompt": entry["prompt"][:tokens], "pooled": entry["pooled"]})
    return dataclasses.replace(cache, texts=texts)


def _train_phase(
    transformer,
    cache,
    samples,
    spec: MiniSpec,
    models: FluxModels,
    steps: int,
    learning_rate: float,
    seed: int,
    warmup: int,
) -> LoopResult:
    side = spec.image_size
    config = TrainingConfig(
        trigger_word="",
        steps=steps,
        learning_rate=learning_rate,
        batch_size=spec.batch,
        resolutions=(side,),
        lora_rank=1,  # unused in full-parameter mode
        caption_dropout_rate=spec.caption_dropout,
        optimizer="adamw",
        cache_latents_to_disk=False,
        layers_to_optimize_regex=None,
        gradient_checkpointing=False,
        seed=seed,
        hf_repo_id=None,
    )
    return train_parameters(
        transformer,
        trainable_parameters(transformer),
        cache,
        samples,
        config,
        models.scheduler_configs["dev"],
        log_every=25,
        lr_schedule=warmup_cosine(max(1, warmup), steps),
        timesteps=high_noise_timesteps(spec.high_noise_share, spec.high_noise_from),
        what="every flux-mini transformer weight",
    )


def schnell_from_dev(dev: torch.nn.Module, spec: MiniSpec, seed: int):
    """The same network without a guidance embedder. dev's embedder outputs one constant (its
    linear_2 bias); adding it to the text projection's bias gives a transformer that computes exactly
    what dev computes: no second training, no distillation (so schnell's 4 steps are coarse)."""
    schnell = build_transformer(spec, guidance_embeds=False, seed=seed)
    state = {k: v for k, v in dev.state_dict().items() if not k.startswith(GUIDANCE_EMBEDDER)}
    constant = dev.time_text_embed.guidance_embedder.linear_2.bias.detach()
    state["time_text_embed.text_embedder.linear_2.bias"] = (
        state["time_text_embed.text_embedder.linear_2.bias"] + constant
    )
    schnell.load_state_dict(state, strict=True)
    return schnell.eval().requires_grad_(False)
