"""Training under the memory plans: a LoRA step on an 8-bit stored base with the GPU played by `meta`,
and the whole job on the CPU with the 8-bit base (values: the LoRA is trained and exported as for bf16)."""

import tarfile

import pytest
import torch
from safetensors.torch import load_file

from flux.eight_bit import EightBitLinear, store_in_eight_bit
from flux.loading import load_flux
from flux.memory_plan import choose_plan
from tests.training_helpers import SAMPLES, make_zip, synthetic_cache
from toys.tiny import SCHEDULERS, build_transformer
from training.config import build_training_config
from training.job import run_training
from training.loop import lora_adapter, lora_parameters, train_parameters
from training.previews import PreviewSettings
from training.recipe import block_linear_names

META = torch.device("meta")
CPU = torch.device("cpu")


@pytest.mark.parametrize(("storage", "checkpointing"), [("fp8", False), ("int8", True)])
def test_lora_step_on_an_eight_bit_base_runs_on_the_device(storage, checkpointing):
    transformer = build_transformer(guidance_embeds=True, seed=0).requires_grad_(False)
    store_in_eight_bit(transformer, storage, home=META, work=CPU)
    transformer.to(META)
    eight_bit = [m for m in transformer.modules() if isinstance(m, EightBitLinear)]
    assert eight_bit and all(m.codes.is_meta and m.original.device == CPU for m in eight_bit)
    config = build_training_config(
        steps=3, lora_rank=2, seed=1, batch_size=2, optimizer="adamw", gradient_checkpointing=checkpointing
    )
    targets = block_linear_names(transformer)
    with lora_adapter(transformer, 2, targets, seed=1):
        params = lora_parameters(transformer)
        wrapped = [m for m in transformer.modules() if hasattr(m, "base_layer")]
        # peft wrapped the 8-bit modules themselves: the LoRA trains against the stored base
        assert wrapped and all(isinstance(m.base_layer, EightBitLinear) for m in wrapped)
        assert all(p.is_meta and p.dtype == torch.float32 for p in params)
        result = train_parameters(
            transformer, params, synthetic_cache(SAMPLES), SAMPLES, config, SCHEDULERS["dev"]
        )
    assert len(result.losses) == 3
    assert all(isinstance(m, EightBitLinear) for m in eight_bit)  # unwrapped again, still 8-bit


def test_the_training_job_on_an_eight_bit_base_exports_a_lora_for_the_bf16_base(
    tmp_path, offline_tiny_environment
):
    """The training plans through run_training (T5, CLIP and the VAE visiting for the cache and the preview):
    the tar's LoRA has the same modules and shapes as one trained on the unquantized base, and
    differs from it only as much as the base does."""
    data_zip = make_zip(tmp_path / "data.zip")
    config = build_training_config(steps=3, lora_rank=2, resolution="256", seed=5, optimizer="adamw")
    previews = PreviewSettings(count=1, steps=1, width=256, height=256)
    loras = {}
    for name in ("resident", "8bit"):
        plan = choose_plan(None, ("dev",), training=True, has_fp8=True, forced=name)
        models = load_flux(("dev",), device=CPU, fast=False, training=True, plan=plan)
        assert not plan.t5_on_gpu and not plan.vae_and_clip_on_gpu
        assert not any(models.placement.on_device(name) for name in ("t5", "clip", "vae"))
        tar_path = run_training(config, data_zip, tmp_path / name, models=models, previews=previews)
        with tarfile.open(tar_path) as tar:
            assert "previews/preview-0.webp" in tar.getnames()
            (tmp_path / f"{name}.safetensors").write_bytes(tar.extractfile("lora.safetensors").read())
        loras[name] = load_file(tmp_path / f"{name}.safetensors")
    assert {k: v.shape for k, v in loras["8bit"].items()} == {
        k: v.shape for k, v in loras["resident"].items()
    }
    up = [k for k in loras["8bit"] if "lora_B" in k]
    assert any(not torch.equal(loras["8bit"][k], loras["resident"][k]) for k in up)  # trained on another base
    for key in up:
        assert torch.allclose(loras["8bit"][key], loras["resident"][key], atol=0.05)
