"""Stage 2 of flux-mini: the FluxTransformer2DModel, every weight trained, through the project's own
LoRA training loop (training.loop.train_parameters): the same cache, packing, sigmoid-normal timesteps
with the dev scheduler's shift, flow-matching loss and guidance input (1.0) as a LoRA training.

Guidance: flux-mini dev is not guidance-distilled (that needs a teacher). Its guidance embedder is
frozen with a zero output weight, so it adds the same constant whatever guidance a request sends:
dev accepts the guidance input and ignores it. That constant is what makes the schnell copy exact
(see schnell_from_dev).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time

import torch

from flux.loading import FluxModels
from toys.mini.short_text import full_length_attention, shortened
from toys.mini.spec import MiniSpec, TransformerPhase
from training.buckets import Sample
from training.cache import build_cache
from training.config import TrainingConfig
from training.loop import LoopResult, StepCallback, TimestepSampler, train_parameters
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


def adaln_zero(transformer: torch.nn.Module) -> None:
    """DiT's adaLN-zero start: every modulation linear and the output projection at zero, so each
    block starts as the identity and the model's first prediction is 0 (issue 13's recipe)."""
    names = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "proj_out")
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and (name.endswith(names) and "attn" not in name):
                if name == "proj_out" or not name.endswith("proj_out"):
                    module.weight.zero_()
                    if module.bias is not None:
                        module.bias.zero_()


def training_samples(spec: MiniSpec, large: int, small: int) -> list[Sample]:
    """`large` samples at image_size then `small` at small_side, numbered like the image list."""
    sides = [spec.image_size] * large + [spec.small_side] * small
    return [Sample(index=i, width=side, height=side, resolution=side) for i, side in enumerate(sides)]


def train_transformer(
    models: FluxModels,
    images: list,
    captions: list[str],
    samples: list[Sample],
    spec: MiniSpec,
    phase: TransformerPhase,
    seed: int,
    max_sequence_length: int,
    on_step: StepCallback | None = None,
    finish_by: float | None = None,
) -> tuple[LoopResult, TransformerPhase]:
    """One phase of full-parameter flow-matching training of models.transformers['dev'] on (image,
    caption) pairs, one sample per image at its bucket size (training_samples). finish_by: a
    time.perf_counter() value; the phase's steps are cut to end by then (fit_steps). Returns the
    run and the phase as run."""
    transformer = models.transformers["dev"]
    # T5 at the length dev reads at inference (512), then cut to the first rows plus the last one;
    # full_length_attention biases the kept pads so each step attends as the 512-row prompt would.
    cache = shortened(
        build_cache(models, images, captions, samples, max_sequence_length, folder=None),
        spec.short_text_tokens,
    )
    scheduler = models.scheduler_configs["dev"]
    with full_length_attention(transformer, max_sequence_length):
        if finish_by is not None:
            phase = fit_steps(transformer, cache, samples, spec, phase, scheduler, finish_by)
        return _train(transformer, cache, samples, spec, phase, seed, scheduler, on_step), phase


FIT_STEPS_ROUNDING = 250
FIT_TRIAL_STEPS = 30


def fit_steps(
    transformer, cache, samples, spec: MiniSpec, phase: TransformerPhase, scheduler, finish_by: float
):
    """The phase with at most as many steps as end by `finish_by`, timed on a throwaway copy of the
    transformer (the copy's steps touch nothing the real run reads, so the run is exactly a build of
    the returned phase). Rounded down to FIT_STEPS_ROUNDING; at least that many."""
    trial = dataclasses.replace(phase, steps=FIT_TRIAL_STEPS, warmup_steps=1)
    started = time.perf_counter()
    _train(copy.deepcopy(transformer), cache, samples, spec, trial, 0, scheduler)
    per_step = (time.perf_counter() - started) / FIT_TRIAL_STEPS
    fitting = int((finish_by - time.perf_counter()) / per_step) // FIT_STEPS_ROUNDING * FIT_STEPS_ROUNDING
    steps = max(FIT_STEPS_ROUNDING, min(phase.steps, fitting))
    log.info(
        "%.3f s/step measured: %d steps end by the deadline (the spec asks %d)", per_step, steps, phase.steps
    )
    return dataclasses.replace(phase, steps=steps)


def _train(
    transformer,
    cache,
    samples,
    spec: MiniSpec,
    phase: TransformerPhase,
    seed: int,
    scheduler_config: dict,
    on_step: StepCallback | None = None,
) -> LoopResult:
    config = TrainingConfig(
        trigger_word="",
        steps=phase.steps,
        learning_rate=phase.learning_rate,
        batch_size=spec.batch,
        resolutions=tuple(sorted({s.resolution for s in samples})),
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
        scheduler_config,
        log_every=50,
        lr_schedule=warmup_cosine(max(1, phase.warmup_steps), phase.steps),
        timesteps=high_noise_timesteps(phase.high_noise_share, spec.high_noise_from),
        what="every flux-mini transformer weight",
        ema_decay=spec.ema_decay,
        on_step=on_step,
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
