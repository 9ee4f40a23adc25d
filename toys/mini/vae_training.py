"""Stage 1 of flux-mini: an AutoencoderKL with FLUX.1's latent layout, trained on shapes images.

Reconstruction loss (MSE on pixels) plus a tiny KL term, in phases (MiniSpec.vae_phases): 48 px crops
first (cheap, many colours per batch: it learns the colours fast), then whole images at 128 px and at
the 256 px it serves. Crops alone are not enough: AutoencoderKL's GroupNorm takes its statistics over
the whole image, so a crop-trained VAE gave white back pink on whole 256 px images (issue 13). The decoder
decodes slightly noised latents, so it tolerates the small errors of generated latents.
Afterwards FLUX.1's normalisation constants are measured on whole training images: shift_factor =
the latents' mean, scaling_factor = 1 / their standard deviation, so (z - shift) * scale, what the
recipe and the pipelines compute, has zero mean and unit variance, as the transformer expects.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from PIL import Image

from toys.mini.spec import MiniSpec
from training.recipe import image_to_pixels

log = logging.getLogger(__name__)


def build_vae(spec: MiniSpec, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * blocks,  # 4 blocks: 3 halvings = 8x
        up_block_types=("UpDecoderBlock2D",) * blocks,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )


def draw_images(
    images: list[Image.Image], count: int, side: int, crop: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random images of the list at side x side (box-filtered when resized), whole (crop 0)
    or as a random crop x crop square of each; and each image's background colour (its corner pixel:
    the world's backgrounds are plain), [count, 3] in [-1, 1]."""
    batch, backgrounds = [], []
    for _ in range(count):
        image = images[int(rng.integers(len(images)))]
        if image.size != (side, side):
            image = image.resize((side, side), Image.BOX)
        backgrounds.append([v / 127.5 - 1.0 for v in image.convert("RGB").getpixel((0, 0))])
        if crop:
            x, y = (int(v) for v in rng.integers(0, side - crop + 1, size=2))
            image = image.crop((x, y, x + crop, y + crop))
        batch.append(image_to_pixels(image))
    return torch.stack(batch), torch.tensor(backgrounds)


def subject_weights(pixels: torch.Tensor, backgrounds: torch.Tensor, weight: float) -> torch.Tensor:
    """[B, 1, H, W]: 1 on the background, 1 + weight on the subject. The subject is a few percent of
    the pixels, so a plain MSE learns the backgrounds' colours and gets the subjects' wrong (yellow came
    back orange), and the subject's colour is what the scorer reads."""
    differs = (pixels - backgrounds.to(pixels.device)[:, :, None, None]).abs().amax(1, keepdim=True) > 0.1
    return 1.0 + weight * differs.float()


def train_vae(vae, images: list[Image.Image], spec: MiniSpec, seed: int) -> list[float]:
    """spec.vae_phases in order, each on images at its side (whole, or crops); one cosine decay
    over them all."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # posterior sampling draws from the global generator
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    losses = []
    started = time.perf_counter()
    vae.train()
    device = next(vae.parameters()).device
    total = sum(phase[1] for phase in spec.vae_phases)
    step = 0
    for side, steps, batch, crop in spec.vae_phases:
        for _ in range(steps):
            step += 1
            # Cosine decay to 5 %: the last steps settle the fine colour values the scorer reads.
            fraction = 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = spec.vae_lr * fraction
            # Images and noise drawn on the CPU (the same on every device), then moved to the VAE's device.
            pixels, backgrounds = draw_images(images, batch, side, crop, rng)
            pixels = pixels.to(device)
            weights = subject_weights(pixels, backgrounds, spec.vae_subject_weight)
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mode()
            # Noise at a tenth of the latents' spread: the decoder learns to tolerate the small errors
            # of generated latents (sampling the posterior instead stalls a VAE this small).
            noisy = latents + 0.1 * latents.detach().std() * torch.randn(latents.shape).to(device)
            decoded = vae.decode(noisy).sample
            reconstruction = ((decoded - pixels) ** 2 * weights).mean() / weights.mean()
            kl = posterior.kl().mean() / pixels[0].numel()
            loss = reconstruction + spec.vae_kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            losses.append(_value(reconstruction))
            if step % 50 == 0 or step == total:
                elapsed = time.perf_counter() - started
                log.info(
                    "vae step %d/%d (%d px, crop %d, batch %d) | mse %.4f | kl %.1f | %.2f s/step | %.0f s",
                    step,
                    total,
                    side,
                    crop,
                    batch,
                    float(np.mean(losses[-50:])),
                    _value(kl),
                    elapsed / step,
                    elapsed,
                )
    vae.eval().requires_grad_(False)
    return losses


def _value(tensor: torch.Tensor) -> float:
    """A loss as a number for the log; NaN on `meta` (the tests' accelerator stand-in holds no values)."""
    return math.nan if tensor.is_meta else tensor.item()


@torch.no_grad()
def set_latent_normalisation(vae, images: list[Image.Image], batch: int = 16) -> tuple[float, float]:
    """Measure the raw latents' mean and standard deviation; store them as shift/scaling factors."""
    latents = []
    for start in range(0, len(images), batch):
        pixels = torch.stack([image_to_pixels(im) for im in images[start : start + batch]])
        latents.append(vae.encode(pixels).latent_dist.mode())
    stacked = torch.cat(latents)
    shift, scale = float(stacked.mean()), float(1.0 / stacked.std())
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    log.info("VAE latent normalisation: shift_factor %.4f, scaling_factor %.4f", shift, scale)
    return shift, scale
