"""The training loop really learns (CPU, tiny model): the loss falls, and a one-colour LoRA pulls
generated colours towards that colour.

Both run hundreds of library-level steps (lora_adapter + train_lora on a cache from build_cache),
seeded, so they give the same numbers on every run on a machine.
"""

from __future__ import annotations

import dataclasses
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flux.generate import generate
from flux.request import build_request
from lora.apply import LoraFuser
from lora.formats import read_lora_file
from training.buckets import assign_buckets
from training.cache import build_cache
from training.config import build_training_config
from training.export import lora_metadata, save_lora_file
from training.loop import lora_adapter, train_lora
from training.recipe import flow_matching_loss, select_lora_targets


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's tensors are too small to share between threads: on the shared 2-core machine,
    two OpenMP threads made these loops ~20x slower than one (bench/train_tiny.py measures both)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cache_for(models, images: list[Image.Image], captions: list[str]):
    samples = assign_buckets([image.size for image in images], (256,))
    return build_cache(models, images, captions, samples, max_sequence_length=512, folder=None), samples


# ---------- the loss falls ----------


def fixed_loss(transformer, cache, samples, scheduler_guidance: float) -> float:
    """Mean loss over every sample at 5 fixed noise levels and fixed noise: the same yardstick twice."""
    generator = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad():
        for number in range(len(samples)):
            latents = cache.latents.get(str(number))["latents"].unsqueeze(0)
            text = cache.texts.get(str(cache.caption_of_sample[number]))
            for t in (0.1, 0.3, 0.5, 0.7, 0.9):
                noise = torch.randn(latents.shape, generator=generator)
                loss = flow_matching_loss(
                    transformer,
                    latents,
                    noise,
                    torch.tensor([t]),
                    text["prompt"].unsqueeze(0),
                    text["pooled"].unsqueeze(0),
                    scheduler_guidance,
                )
                losses.append(loss.item())
    return statistics.mean(losses)


def test_loss_falls_over_a_few_hundred_steps(tiny_models):
    transformer = tiny_models.transformers["dev"]
    colours = ["red", "blue", "green", "yellow"]
    images = []
    for index, colour in enumerate(colours):
        image = Image.new("RGB", (64, 64), colour)
        image.paste("white", (8 * index, 16, 8 * index + 24, 40))  # a white block at a different place each
        images.append(image)
    cache, samples = cache_for(
        tiny_models, images, [f"TOK, a {c} square with a white block" for c in colours]
    )
    config = build_training_config(
        steps=300,
        lora_rank=16,
        learning_rate=3e-3,
        resolution="256",
        seed=0,
        optimizer="adamw",
        caption_dropout_rate=0.0,
    )
    with lora_adapter(transformer, config.lora_rank, select_lora_targets(transformer, None), config.seed):
        before = fixed_loss(transformer, cache, samples, 1.0)
        result = train_lora(transformer, cache, samples, config, tiny_models.scheduler_configs["dev"])
        after = fixed_loss(transformer, cache, samples, 1.0)

    first, last = statistics.mean(result.losses[:20]), statistics.mean(result.losses[-20:])
    assert len(result.losses) == 300 and all(np.isfinite(result.losses))
    # The training losses (random noise levels each step) fall by more than a fifth ...
    assert last < 0.8 * first, (first, last)
    # ... and so does the loss at fixed noise levels and noise, measured before and after.
    assert after < 0.75 * before, (before, after)


# ---------- a one-colour LoRA moves generated colours towards it ----------


class ColourVae(torch.nn.Module):
    """A stand-in VAE that keeps colour: each 8x8 patch's mean RGB times a fixed 16x3 matrix, and back.

    Why not the tiny model's own VAE: its random weights map every solid colour to nearly the same
    latent (red, blue, green, white, black: pairwise distances ~0.05 against a spatial spread of ~0.1
    inside one solid image) and decode every latent to a similar grey-pink. So with it, neither the
    decoded colour nor the distance to the colour's encoded latent can show a LoRA pulling towards
    a colour. This VAE keeps the question well posed in pixels while the transformer, the training
    loop, the exported LoRA file, the fuser and generate() are the real ones. The scale gives
    saturated colours latents of about unit size per channel, like FLUX.1's normalised latents.
    """

    SCALE = 4.0

    def __init__(self, seed: int = 0):
        super().__init__()
        basis, _ = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(seed)))
        self.basis = torch.nn.Parameter(basis * self.SCALE, requires_grad=False)  # orthogonal columns
        self.config = SimpleNamespace(
            shift_factor=0.0, scaling_factor=1.0, block_out_channels=[1, 1, 1, 1], latent_channels=16
        )

    @property
    def device(self) -> torch.device:
        return self.basis.device

    @property
    def dtype(self) -> torch.dtype:
        return self.basis.dtype

    def encode(self, pixels: torch.Tensor):
        latents = torch.einsum("lc,bchw->blhw", self.basis, torch.nn.functional.avg_pool2d(pixels, 8))
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latents))

    def decode(self, latents: torch.Tensor, return_dict: bool = False):
        rgb = torch.einsum("lc,blhw->bchw", self.basis, latents) / self.SCALE**2
        return (torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest"),)


def mean_colours(models, seeds: tuple[int, ...]) -> np.ndarray:
    """The mean RGB (0-255) of the image generate() makes for each seed, one row per seed."""
    rows = []
    for seed in seeds:
        request = build_request(
            prompt="a photo of TOK",
            model="dev",
            aspect_ratio="custom",
            width=256,
            height=256,
            num_inference_steps=8,
            guidance=3.5,
            seed=seed,
            output_format="png",
        )
        image = generate(models, request).images[0]
        rows.append(np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0))
    return np.array(rows)


def test_a_one_colour_lora_pulls_generated_colours_towards_it(tiny_models, tmp_path):
    models = dataclasses.replace(tiny_models, vae=ColourVae())
    transformer = models.transformers["dev"]
    red = (220, 30, 30)
    images = [Image.new("RGB", size, red) for size in ((64, 64), (96, 64), (64, 96))]
    cache, samples = cache_for(models, images, ["a photo of TOK", "TOK", "TOK, a plain colour"])
    config = build_training_config(
        steps=300,
        lora_rank=16,
        learning_rate=1e-2,
        resolution="256",
        seed=0,
        optimizer="adamw",
        caption_dropout_rate=0.0,
    )
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    seeds = (0, 1, 2, 3)
    before = mean_colours(models, seeds)

    targets = select_lora_targets(transformer, None)
    with lora_adapter(transformer, config.lora_rank, targets, config.seed):
        result = train_lora(transformer, cache, samples, config, models.scheduler_configs["dev"])
    # Applied the way predict.py applies a user's LoRA: the exported file, read and fused.
    path = save_lora_file(
        result.lora_state, tmp_path / "lora.safetensors", lora_metadata(config, result.target_modules, 300)
    )
    fuser = LoraFuser(transformer)
    fuser.set_loras([("red", read_lora_file(path, transformer), 1.0)])
    try:
        after = mean_colours(models, seeds)
    finally:
        fuser.clear()
    assert all(torch.equal(transformer.state_dict()[k], v) for k, v in base.items())

    target = np.array(red, dtype=np.float64)
    distance_before = np.linalg.norm(before - target, axis=1)
    distance_after = np.linalg.norm(after - target, axis=1)
    # Before, every image is far from red (the untrained model makes noise, which averages to grey).
    assert (distance_before > 100).all(), distance_before
    # With the LoRA every seed's image is closer to red by more than 15% (about 28% on the reference
    # machine: the tiny model's frozen, random output layer limits how far it can follow) ...
    assert (distance_after < 0.85 * distance_before).all(), (distance_before, distance_after)
    # ... and it moved towards red, not just anywhere: the change points at red (cosine > 0.9).
    moved, wanted = after - before, target - before
    cosine = (moved * wanted).sum(axis=1) / np.linalg.norm(moved, axis=1) / np.linalg.norm(wanted, axis=1)
    assert (cosine > 0.9).all(), cosine
