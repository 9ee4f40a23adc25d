"""The training step with the transformer on another device than the CPU, which draws the noise.

No GPU here, so the `meta` device stands in for CUDA: like CUDA it refuses to mix its tensors with
non-0-dim CPU tensors and runs autograd, but holds no values. These tests run the real loop
(training.loop.train_parameters: timesteps, guidance, ids, loss, backward, clipping, optimizer step)
with the model and its trainable parameters on meta, gradient checkpointing off and on; a tensor left
on the CPU anywhere in the step fails them.
"""

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tests.training_helpers import SAMPLES, meta_transformer, synthetic_cache
from toys.mini.transformer_training import high_noise_timesteps, trainable_parameters, warmup_cosine
from toys.tiny import SCHEDULERS, build_transformer
from training.config import build_training_config
from training.loop import EMA_DECAY, lora_adapter, lora_parameters, loss_value, train_parameters
from training.recipe import block_linear_names

META = torch.device("meta")


def count_optimizer_steps():
    """Counts every optimizer.step() that ran to its end (a global hook; remove it after)."""
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    return steps, handle


@pytest.mark.parametrize(
    "model, checkpointing, preserved",
    [("dev", False, False), ("dev", True, False), ("schnell", False, False), ("dev", False, True)],
)
def test_lora_training_step_runs_with_the_model_on_another_device(model, checkpointing, preserved):
    """preserved: with diff_output_preservation's second forward (the base's, adapters off) and backward."""
    transformer = meta_transformer(guidance_embeds=model == "dev")
    config = build_training_config(
        steps=3,
        lora_rank=2,
        seed=1,
        batch_size=2,
        optimizer="adamw",
        caption_dropout_rate=0.5,  # the dropout mask is drawn on the CPU too
        gradient_checkpointing=checkpointing,
        diff_output_preservation_class="person, man" if preserved else None,  # two: the draw runs too
    )
    steps, handle = count_optimizer_steps()
    forwards = []
    counter = transformer.register_forward_hook(lambda *_: forwards.append(1))
    try:
        with lora_adapter(transformer, 2, block_linear_names(transformer), seed=1):
            params = lora_parameters(transformer)
            assert params and all(p.is_meta and p.dtype == torch.float32 for p in params)
            reports = []

            def on_step(report):  # what W&B tracking does: the EMA weights swapped in and out
                with report.averaged_weights():
                    reports.append(report.step)

            result = train_parameters(
                transformer,
                params,
                synthetic_cache(SAMPLES, preserved=preserved),
                SAMPLES,
                config,
                SCHEDULERS[model],
                ema_decay=EMA_DECAY,  # as train_lora: the EMA update and swap run on the device too
                on_step=on_step,
            )
            assert all(p.is_meta for p in params) and reports == [1, 2, 3]
    finally:
        handle.remove()
        counter.remove()
    assert len(steps) == 3 and len(result.losses) == 3
    assert len(forwards) == 3 * (3 if preserved else 1)  # + the base's and the LoRA's on the class caption
    assert result.gradient_checkpointing is checkpointing
    assert not transformer.is_gradient_checkpointing  # switched off again after the loop


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_parameter_training_runs_with_the_model_on_another_device(checkpointing):
    """flux-mini's path: every weight trained, its own timestep sampler and learning-rate schedule."""
    transformer = meta_transformer()
    config = build_training_config(steps=3, seed=2, optimizer="adamw", gradient_checkpointing=checkpointing)
    steps, handle = count_optimizer_steps()
    try:
        result = train_parameters(
            transformer,
            trainable_parameters(transformer),
            synthetic_cache(SAMPLES),
            SAMPLES,
            config,
            SCHEDULERS["dev"],
            lr_schedule=warmup_cosine(1, 3),
            timesteps=high_noise_timesteps(0.5, 0.8),
        )
    finally:
        handle.remove()
    assert len(steps) == 3 and len(result.losses) == 3


def test_loss_value_is_read_where_the_device_holds_values():
    assert loss_value(torch.tensor(0.25), 1) == 0.25
    assert math.isnan(loss_value(torch.tensor(0.25, device=META), 1))  # no value to read on meta
    with pytest.raises(RuntimeError, match="the loss became nan at step 4; lower learning_rate"):
        loss_value(torch.tensor(float("nan")), 4)
    with pytest.raises(RuntimeError, match="the loss became inf"):
        loss_value(torch.tensor(float("inf")), 4)


def test_flux_mini_vae_training_runs_with_the_vae_on_another_device():
    """flux-mini's first stage (toys.mini.vae_training) draws images and noise on the CPU too."""
    import dataclasses

    from PIL import Image

    from toys.mini.spec import MiniSpec
    from toys.mini.vae_training import build_vae, train_vae

    spec = dataclasses.replace(MiniSpec(), vae_phases=((16, 1, 2, 0), (32, 1, 2, 16)))
    vae = build_vae(spec, seed=0).to(META)
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    steps, handle = count_optimizer_steps()
    try:
        losses = train_vae(vae, images, spec, seed=0)
    finally:
        handle.remove()
    assert len(losses) == 2 and len(steps) == 2  # one step per phase


@pytest.mark.parametrize("shifted", [False, True])
def test_train_lora_draws_noise_levels_as_the_config_says(shifted, monkeypatch):
    """The public trainer's unshifted sampling by default; the resolution shift only when asked."""
    import training.loop as loop

    used = []
    for name in ("sample_timesteps", "sample_shifted_timesteps"):
        real = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
    transformer = build_transformer(guidance_embeds=True).requires_grad_(False)  # CPU: the LoRA is read back
    config = build_training_config(
        steps=3, lora_rank=2, seed=1, optimizer="adamw", shift_timesteps_by_resolution=shifted
    )
    with lora_adapter(transformer, 2, block_linear_names(transformer), seed=1):
        loop.train_lora(transformer, synthetic_cache(SAMPLES), SAMPLES, config, SCHEDULERS["dev"])
    assert used == ["sample_shifted_timesteps" if shifted else "sample_timesteps"] * 3
    assert config.to_json()["shift_timesteps_by_resolution"] is shifted
