"""The VAE's round trip on held-out whole images, scored like generated images: the ceiling of every
flux-mini quality bar (a colour the VAE cannot give back, the transformer cannot draw either).

The build fails below MiniSpec.vae_gate_color / vae_gate_shape (issue 13); the quick test build sets
them to 0, which skips the scoring.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from toys.mini.spec import MiniSpec
from toys.mini.vae_training import train_vae
from toys.shape_scorer import score_image
from toys.shapes import held_out_prompts
from training.recipe import image_to_pixels

log = logging.getLogger(__name__)


class VaeGateError(RuntimeError):
    """The trained VAE cannot give held-out images back well enough to serve."""


@dataclass(frozen=True)
class RoundTrip:
    color: float  # share of round-tripped images whose scored colour is the true one
    shape: float
    median_error: float  # median |pixel difference| over all images, in 0-255 units
    count: int


def pixels_to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image."""
    data = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(data))


@torch.no_grad()
def round_trip(vae, count: int, side: int, seed: int = 0, two_tone: float = 0.0) -> RoundTrip:
    """Encode and decode `count` held-out images (pairs never trained on) at side x side; score them."""
    examples = held_out_prompts(count, seed=seed, size=side, two_tone=two_tone)
    device = next(vae.parameters()).device
    colors, shapes, errors = [], [], []
    for example in examples:
        pixels = image_to_pixels(example.image).unsqueeze(0).to(device)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample[0].cpu()
        image = pixels_to_image(decoded)
        score = score_image(image)
        colors.append(score.color == example.attributes.color)
        shapes.append(score.shape == example.attributes.shape)
        diff = np.abs(np.asarray(image, np.float32) - np.asarray(example.image.convert("RGB"), np.float32))
        errors.append(diff.ravel())
    return RoundTrip(
        color=float(np.mean(colors)),
        shape=float(np.mean(shapes)),
        median_error=float(np.median(np.concatenate(errors))),
        count=count,
    )


def train_checked_vae(vae, images: list[Image.Image], spec: MiniSpec) -> tuple[list[float], RoundTrip | None]:
    """Train the VAE (spec.vae_phases), then score it; below the gate, train spec.vae_retry_phase at
    vae_lr * vae_retry_lr and score again, up to spec.vae_retries times, then raise VaeGateError."""
    losses = train_vae(vae, images, spec, spec.seed)
    for retry in range(spec.vae_retries + 1):
        try:
            return losses, check_vae(vae, spec, final=retry == spec.vae_retries)
        except _BelowGate:
            vae.train().requires_grad_(True)
            extra = dataclasses.replace(
                spec, vae_phases=(spec.vae_retry_phase,), vae_lr=spec.vae_lr * spec.vae_retry_lr
            )
            log.info(
                "VAE below the gate: %d more steps (retry %d of %d)",
                extra.vae_phases[0][1],
                retry + 1,
                spec.vae_retries,
            )
            losses += train_vae(vae, images, extra, spec.seed + 1 + retry)
    raise AssertionError("unreachable")


class _BelowGate(Exception):
    pass


def check_vae(vae, spec: MiniSpec, final: bool = True) -> RoundTrip | None:
    """Score the round trip and raise VaeGateError below the spec's thresholds (None: gate off);
    final=False raises _BelowGate instead, so the caller may train on."""
    if spec.vae_gate_color <= 0 and spec.vae_gate_shape <= 0:
        log.info("VAE gate off (vae_gate_color = vae_gate_shape = 0)")
        return None
    result = round_trip(vae, spec.vae_gate_images, spec.image_size, spec.held_out_seed, spec.two_tone)
    log.info(
        "VAE round trip of %d held-out %d px images: colour %.1f %%, shape %.1f %%, median error %.1f/255",
        result.count,
        spec.image_size,
        100 * result.color,
        100 * result.shape,
        result.median_error,
    )
    if result.color < spec.vae_gate_color or result.shape < spec.vae_gate_shape:
        if not final:
            raise _BelowGate()
        raise VaeGateError(
            f"VAE round trip colour {result.color:.1%} / shape {result.shape:.1%} on {result.count} "
            f"held-out images is below the gate {spec.vae_gate_color:.0%} / {spec.vae_gate_shape:.0%}: "
            "train the VAE longer (MiniSpec.vae_phases)"
        )
    return result
