"""The pieces of the FLUX.1 LoRA recipe, as small functions the training loop composes.

Choices, and why (the public trainers agree on them; ANCHORS.md "The training recipe"):
- LoRA targets: every Linear inside the double blocks (`transformer_blocks.*`: attention q/k/v/out,
  the added-context projections, both feed-forwards, the adaLN norm linears) and the single blocks
  (`single_transformer_blocks.*`: q/k/v, proj_mlp, proj_out, norm linear). The embedders and the final
  layer stay frozen: they are shared by every prompt and easy to damage. alpha = rank (scale 1).
- Latents: the VAE posterior mean (deterministic, so the cache is reproducible; FLUX.1's VAE variance
  is tiny), normalised as (z - shift_factor) * scaling_factor, packed into 2x2 patches (64 channels a
  token) with (0, row, col) ids on the half-resolution grid, exactly as the inference pipeline does.
- Flow matching: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0, plain MSE.
- Timesteps: t = sigmoid(n), n ~ N(0, 1) (more weight on mid noise levels than uniform), then shifted
  by the same resolution-dependent rule the dev scheduler samples with (mu from the image token count),
  so larger images train at the higher noise levels they are generated at.
- dev is guidance-distilled: it is trained with the guidance input at 1.0 (3.5 bakes the guidance
  into the LoRA and gives over-saturated results at inference).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from errors import UserInputError

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
TRAINING_GUIDANCE = 1.0
FIELD_REGEX = "layers_to_optimize_regex"


def block_linear_names(transformer: torch.nn.Module) -> list[str]:
    """Names of every Linear in the double and single blocks, in module order."""
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(BLOCK_PREFIXES)
    ]


def select_lora_targets(transformer: torch.nn.Module, regex: str | None) -> list[str]:
    """The block linears to train; with a regex, those whose name (with or without the
    `transformer.` prefix users see in LoRA files) it matches. Matching nothing is an error."""
    names = block_linear_names(transformer)
    if not regex:
        return names
    pattern = re.compile(regex)
    chosen = [n for n in names if pattern.search(f"transformer.{n}") or pattern.search(n)]
    if not chosen:
        raise UserInputError(
            FIELD_REGEX, regex, f"a regex matching some of the layers: {summarise_layers(names)}"
        )
    return chosen


def summarise_layers(names: list[str]) -> str:
    """'transformer.transformer_blocks.{0..18}.attn.to_q, ...': one entry per layer kind, blocks abbreviated."""
    kinds: dict[str, list[int]] = {}
    for name in names:
        prefix, index, rest = name.split(".", 2)
        kinds.setdefault(f"{prefix}.{{}}.{rest}", []).append(int(index))
    parts = []
    for template, indices in kinds.items():
        span = str(indices[0]) if len(indices) == 1 else f"{min(indices)}..{max(indices)}"
        parts.append("transformer." + template.format(span))
    return ", ".join(parts)


def lora_config(rank: int, targets: list[str], rank_pattern: dict[str, int] | None = None):
    """alpha = rank everywhere (an update at scale 1); rank_pattern: layers of another rank (a LoRA
    continued from a file whose layers differ)."""
    from peft import LoraConfig

    # Full module names, so `proj_out` of a single block never also catches the final `proj_out`;
    # the patterns are regexes matched at the end of a name, so they are anchored the same way.
    pattern = {re.escape(name): r for name, r in (rank_pattern or {}).items()}
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        init_lora_weights=True,
        target_modules=targets,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
    )


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float tensor in [-1, 1], the VAE's input range."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    pixels = data.view(image.height, image.width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> normalised latents [B, 16, H/8, W/8] (fp32)."""
    param = next(vae.parameters())
    with torch.no_grad():
        posterior = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        latents = posterior.mode().float()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: diffusers' own packing, so training matches inference."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids of the packed tokens of an h x w latent: (0, row, col) on the h/2 x w/2 grid."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def timestep_shift_mu(image_seq_len: int, scheduler_config: dict) -> float | None:
    """mu of the dev scheduler's dynamic shift for this many image tokens; None when it shifts statically."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


def sample_timesteps(
    batch: int, image_seq_len: int, scheduler_config: dict, generator: torch.Generator
) -> torch.Tensor:
    """Noise levels t in (0, 1): sigmoid of a standard normal, at every image size alike.

    The public trainer's rule (ai-toolkit's `timestep_type: sigmoid`, as flux-fine-tuner pins it):
    median t 0.5, about 20 % of the steps below t = 0.3, where fine detail and likeness are learnt.
    The arguments after `batch` are those of every sampler (training.loop.TimestepSampler)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return t.clamp(1e-4, 1 - 1e-4)  # at the ends the target is degenerate


def sample_shifted_timesteps(
    batch: int, image_seq_len: int, scheduler_config: dict, generator: torch.Generator
) -> torch.Tensor:
    """sample_timesteps shifted as the scheduler shifts its sampling steps by image size (dev: more
    noise for larger images): at 1024x1024 the median t is 0.76 and only 2.4 % of the steps fall below
    t = 0.3. It trains composition and large shapes more, fine detail less (the shift_timesteps_by_resolution input)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    mu = timestep_shift_mu(image_seq_len, scheduler_config)
    if mu is not None:
        shifted = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    else:
        shift = float(scheduler_config.get("shift", 1.0))
        shifted = shift * t / (1 + (shift - 1) * t)
    # Keep t strictly inside (0, 1): at the ends the target is degenerate.
    return shifted.clamp(1e-4, 1 - 1e-4)


def flow_matching_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    guidance: float | None,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity at x_t = (1 - t) x0 + t noise (fp32 loss).

    Inputs may come from the CPU (the loop draws every random number there, so the noise is the same
    on every device): each is moved to the transformer's device before it meets another tensor, since
    an accelerator refuses to mix its tensors with CPU ones (only 0-dim CPU tensors may)."""
    noisy, t, velocity = _noised(transformer, latents, noise, t)
    target = pack_latents(velocity)
    prediction = predict_velocity(transformer, noisy, t, prompt_embeds, pooled_embeds, guidance)
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def preservation_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    guidance: float | None,
) -> torch.Tensor:
    """Differential output preservation (ai-toolkit's diff_output_preservation): on the same noisy
    image, with the caption's trigger word replaced by its class word, the model with the LoRA should
    predict what the base model predicts. Without it a LoRA trained on a handful of images of one
    subject learns to draw that subject whatever the prompt says; this term gives it the one negative
    example it lacks (a prompt without the trigger keeps the base's behaviour)."""
    noisy, t, _ = _noised(transformer, latents, noise, t)
    with torch.no_grad(), adapters_disabled(transformer):
        base = predict_velocity(transformer, noisy, t, prompt_embeds, pooled_embeds, guidance)
    prediction = predict_velocity(transformer, noisy, t, prompt_embeds, pooled_embeds, guidance)
    return torch.nn.functional.mse_loss(prediction.float(), base.float())


@contextmanager
def adapters_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model's forward, on a transformer carrying a LoRA (peft's adapters bypassed); also
    through a DistributedDataParallel wrapper (its `module` is the transformer)."""
    transformer = getattr(transformer, "module", transformer)
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def _noised(
    transformer: torch.nn.Module, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the transformer's device, fp32, unpacked: x_t = (1 - t) x0 + t noise, t, and the true
    velocity noise - x0 (each input moved there once)."""
    device = next(transformer.parameters()).device
    latents = latents.to(device=device, dtype=torch.float32)
    noise = noise.to(device=device, dtype=torch.float32)
    t = t.to(device=device, dtype=torch.float32)
    t_b = t.view(latents.shape[0], 1, 1, 1)
    return (1 - t_b) * latents + t_b * noise, t, noise - latents


def predict_velocity(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    guidance: float | None,
) -> torch.Tensor:
    """The transformer's velocity for unpacked noisy latents [B, 16, h, w] at t, packed [B, tokens, 64]."""
    batch, _, height, width = noisy.shape
    param = next(p for p in transformer.parameters())
    device, dtype = param.device, param.dtype
    guidance_input = None if guidance is None else torch.full((batch,), guidance, device=device, dtype=dtype)
    return transformer(
        hidden_states=pack_latents(noisy).to(device=device, dtype=dtype),
        timestep=t.to(dtype),
        guidance=guidance_input,
        pooled_projections=pooled_embeds.to(device=device, dtype=dtype),
        encoder_hidden_states=prompt_embeds.to(device=device, dtype=dtype),
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        img_ids=latent_image_ids(height, width, device, dtype),
        return_dict=False,
    )[0]
