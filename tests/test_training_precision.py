"""bf16 autocast on a bf16 base: LoRA math in bf16, master weights fp32, less memory kept for backward."""

from contextlib import nullcontext

import torch

from tests.training_helpers import SAMPLES, synthetic_cache
from toys.tiny import SCHEDULERS, build_transformer
from training.config import build_training_config
from training.loop import lora_adapter, lora_parameters, train_parameters
from training.precision import base_dtype, forward_precision, keep_lora_inputs_in_base_dtype
from training.recipe import block_linear_names, flow_matching_loss

LORA_A = "transformer_blocks.0.attn.to_q.lora_A.trained"


def bf16_transformer() -> torch.nn.Module:
    return build_transformer(guidance_embeds=True, seed=0).requires_grad_(False).to(torch.bfloat16)


def input_dtypes_seen(transformer: torch.nn.Module) -> list[torch.dtype]:
    seen = []
    transformer.get_submodule(LORA_A).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].dtype)
    )
    return seen


def test_lora_on_a_bf16_base_computes_in_bf16_and_keeps_fp32_master_weights():
    transformer = bf16_transformer()
    config = build_training_config(
        steps=3, lora_rank=2, seed=0, optimizer="adamw", gradient_checkpointing=True
    )
    with lora_adapter(transformer, 2, block_linear_names(transformer), seed=0):
        seen = input_dtypes_seen(transformer)
        params = lora_parameters(transformer)
        before = [p.detach().clone() for p in params]
        result = train_parameters(
            transformer, params, synthetic_cache(SAMPLES), SAMPLES, config, SCHEDULERS["dev"]
        )
        assert all(p.dtype == torch.float32 for p in params)
        assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))  # it trained
    assert base_dtype(transformer) == torch.bfloat16
    assert seen and set(seen) == {torch.bfloat16}  # peft no longer casts the input up to fp32
    assert all(0 < loss < 10 for loss in result.losses)


def test_an_fp32_base_trains_in_fp32_as_before():
    transformer = build_transformer(guidance_embeds=True, seed=0).requires_grad_(False)
    with lora_adapter(transformer, 2, block_linear_names(transformer), seed=0):
        seen = input_dtypes_seen(transformer)
        assert isinstance(forward_precision(transformer), nullcontext)
        config = build_training_config(steps=3, lora_rank=2, seed=0, optimizer="adamw")
        train_parameters(
            transformer,
            lora_parameters(transformer),
            synthetic_cache(SAMPLES),
            SAMPLES,
            config,
            SCHEDULERS["dev"],
        )
    assert set(seen) == {torch.float32}


def saved_for_backward_bytes(transformer: torch.nn.Module, precision) -> int:
    """Bytes autograd keeps for backward over one loss (distinct storages), measured on the CPU."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 16, 32, 32, generator=g), torch.randn(1, 16, 32, 32, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), precision:
        flow_matching_loss(
            transformer,
            latents,
            noise,
            torch.rand(1, generator=g),
            torch.randn(1, 7, 32),
            torch.randn(1, 32),
            1.0,
        )
    return sum(storages.values())


def test_autocast_keeps_less_for_backward_than_fp32_lora_inputs():
    transformer = bf16_transformer()
    with lora_adapter(transformer, 2, block_linear_names(transformer), seed=0):
        # What peft does on a bf16 base without autocast: each LoRA layer's input cast to fp32 and kept.
        fp32_math = saved_for_backward_bytes(transformer, nullcontext())
        restore = keep_lora_inputs_in_base_dtype(transformer)
        bf16_math = saved_for_backward_bytes(transformer, forward_precision(transformer))
        restore()
        assert saved_for_backward_bytes(transformer, nullcontext()) == fp32_math  # the cast is back
    print(
        f"kept for backward, 256x256 tiny model: fp32 LoRA inputs {fp32_math} B, bf16 autocast {bf16_math} B"
    )
    assert bf16_math < 0.8 * fp32_math


def test_a_forward_inside_the_step_report_runs_on_a_bf16_base():
    """W&B samples generate mid-training, while peft's input cast is off: the report's context must
    give them the loop's precision too, or the bf16 input meets the fp32 LoRA weights."""
    transformer = bf16_transformer()
    config = build_training_config(steps=3, lora_rank=2, seed=0, optimizer="adamw")
    cache = synthetic_cache(SAMPLES)
    losses = []

    def forward_like_a_sample(report):
        latents = cache.latents.get("0")["latents"][None].to(torch.bfloat16)
        text = cache.texts.get(str(cache.caption_of_sample[0]))
        with report.averaged_weights(), torch.no_grad():
            loss = flow_matching_loss(
                transformer,
                latents,
                torch.randn_like(latents),
                torch.tensor([0.5]),
                text["prompt"][None].to(torch.bfloat16),
                text["pooled"][None].to(torch.bfloat16),
                1.0,
            )
        losses.append(float(loss))

    with lora_adapter(transformer, 2, block_linear_names(transformer), seed=0):
        train_parameters(
            transformer,
            lora_parameters(transformer),
            cache,
            SAMPLES,
            config,
            SCHEDULERS["dev"],
            ema_decay=0.99,
            on_step=forward_like_a_sample,
        )
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
