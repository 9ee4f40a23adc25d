"""flux-mini trains at the noise levels where the prompt matters (issue 5).

The LoRA recipe's sigmoid-normal noise levels put under 1 % of samples above t = 0.95. On the flat
shapes images the noisy latent shows the colours below that, so a transformer trained from scratch
with the recipe's draws learned to ignore its prompt (bench/RESULTS.md). flux-mini draws a share of
each batch uniformly near t = 1, through the training loop's `timesteps` hook.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from toys.mini import transformer_training
from toys.mini.spec import MiniSpec
from toys.mini.transformer_training import build_transformer, high_noise_timesteps, trainable_parameters
from training.buckets import Sample
from training.cache import TensorStore, TrainingCache
from training.config import TrainingConfig
from training.loop import train_parameters
from training.recipe import sample_timesteps

# FLUX.1-dev's dynamic shift, as toys.tiny writes its scheduler.
DEV_SCHEDULER = {
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


def share_above(sampler, threshold: float, draws: int = 20000) -> float:
    t = sampler(draws, 256, DEV_SCHEDULER, torch.Generator().manual_seed(0))
    assert t.shape == (draws,) and bool(((t > 0) & (t < 1)).all())
    return (t > threshold).float().mean().item()


def test_recipe_rarely_reaches_high_noise_and_the_mini_sampler_does():
    assert share_above(sample_timesteps, 0.95) < 0.01  # why the prompt went unlearned
    spec = MiniSpec()
    mini = high_noise_timesteps(spec.phases[0].high_noise_share, spec.high_noise_from)
    assert share_above(mini, 0.95) > 0.15
    assert share_above(mini, 0.99) > 0.03
    assert 0.3 < share_above(mini, 0.5) < 0.9  # the other noise levels stay trained too


def test_mini_sampler_is_seeded():
    draw = high_noise_timesteps(0.5, 0.85)
    a = draw(16, 256, DEV_SCHEDULER, torch.Generator().manual_seed(3))
    b = draw(16, 256, DEV_SCHEDULER, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def tiny_world(side: int = 4, captions: int = 3):
    g = torch.Generator().manual_seed(0)
    texts, latents = TensorStore(None), TensorStore(None)
    for number in range(captions + 1):
        texts.put(
            str(number),
            {
                "prompt": torch.randn(8, 64, generator=g),
                "pooled": torch.randn(MiniSpec().clip_dim, generator=g),
            },
        )
    for number in range(captions * 2):
        latents.put(str(number), {"latents": torch.randn(16, side, side, generator=g)})
    samples = [
        Sample(index=i, width=side * 8, height=side * 8, resolution=side * 8) for i in range(captions * 2)
    ]
    cache = TrainingCache(latents, texts, [i % captions for i in range(captions * 2)], captions)
    return cache, samples


def config(steps: int) -> TrainingConfig:
    return TrainingConfig(
        trigger_word="",
        steps=steps,
        learning_rate=1e-3,
        batch_size=2,
        resolutions=(32,),
        lora_rank=1,
        caption_dropout_rate=0.0,
        optimizer="adamw",
        cache_latents_to_disk=False,
        layers_to_optimize_regex=None,
        gradient_checkpointing=False,
        seed=0,
        hf_repo_id=None,
    )


def test_training_loop_draws_from_the_given_sampler():
    spec = dataclasses.replace(MiniSpec(), double_blocks=1, single_blocks=1)
    transformer = build_transformer(spec, guidance_embeds=True, seed=0)
    cache, samples = tiny_world()
    calls = []

    def recording(batch, seq_len, scheduler_config, generator):
        calls.append((batch, seq_len))
        return torch.full((batch,), 0.97)

    train_parameters(
        transformer,
        trainable_parameters(transformer),
        cache,
        samples,
        config(3),
        DEV_SCHEDULER,
        timesteps=recording,
    )
    assert calls == [(2, 4)] * 3  # batch 2, a 4x4 latent packs into 2x2 = 4 image tokens


def test_mini_training_uses_the_high_noise_sampler_and_the_ema(monkeypatch):
    seen = []

    def fake_loop(*args, **kwargs):
        seen.append(kwargs)
        return None

    monkeypatch.setattr(transformer_training, "train_parameters", fake_loop)
    spec = MiniSpec()
    transformer = build_transformer(dataclasses.replace(spec, double_blocks=1, single_blocks=1), True, 0)
    samples = transformer_training.training_samples(spec, 2, 3)
    for phase in spec.phases:
        transformer_training._train(transformer, None, samples, spec, phase, 0, DEV_SCHEDULER)
    assert len(seen) == len(spec.phases)
    assert all(share_above(kwargs["timesteps"], 0.95) > 0.15 for kwargs in seen)
    assert seen[0]["ema_decay"] == spec.ema_decay == 0.999
    assert [s.resolution for s in samples] == [256, 256, 128, 128, 128]


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_share_bounds(share):
    draw = high_noise_timesteps(share, 0.85)
    above = share_above(draw, 0.85)
    assert above == pytest.approx(share, abs=0.2 if share == 0.0 else 1e-9)
