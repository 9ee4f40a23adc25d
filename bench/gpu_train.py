"""The training part of the GPU run (bench/gpu_speed.py calls train_section last).

A few steps of the project's real loop (training.loop: lora_adapter + train_lora with the default
optimizer, adamw8bit, through its trial step) on a freshly built bf16 FLUX.1 dev transformer, at
512x512 and 1024x1024, gradient checkpointing off and on, rank 16, batch 1, T5 at 512 tokens. The
cache is synthetic (random latents and embeddings on the CPU, as build_cache leaves them): compute
does not depend on the values. Per case: median step time (optimizer step to optimizer step, after
the first), peak memory (torch.cuda.max_memory_allocated), memory resident before the step, the
step memory training/memory.py predicts, and what the loop really used (optimizer after any
fallback, checkpointing after the automatic rule). The peft baseline's steps come from
diffusers_baseline.py in the same run (gpu_speed.py runs it with its training part).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

CASES = ((512, False), (512, True), (1024, False), (1024, True))
TINY_SIDES = {512: 64, 1024: 128}  # --tiny: the same cases at toy size on the CPU
TEXT_TOKENS = 512


def free_inference_models(bench, models) -> None:
    """Drop the inference models, fp8 copies and compiled code before training builds its own."""
    if models is not None:
        models.fast = None
        models.transformers.clear()
        for name in ("text_encoder", "text_encoder_2", "vae"):
            setattr(models, name, None)
    torch._dynamo.reset()  # compiled graphs hold the modules they were traced with
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        bench.results["train_gpu_mem_left_from_inference_GB"] = torch.cuda.memory_allocated() / 2**30


def build_dev_transformer(bench, architecture: dict):
    from diffusers import FluxTransformer2DModel

    from toys.tiny import build_transformer

    if bench.args.tiny:
        return build_transformer(guidance_embeds=True, seed=0).requires_grad_(False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built on the GPU in bf16: seconds
    try:
        with torch.device(bench.device):
            torch.manual_seed(0)
            transformer = FluxTransformer2DModel(guidance_embeds=True, **architecture)
    finally:
        torch.set_default_dtype(previous)
    return transformer.eval().requires_grad_(False)


def synthetic_cache(side: int, count: int, text_dim: int, pooled_dim: int, text_tokens: int):
    from training.buckets import Sample
    from training.cache import TensorStore, TrainingCache

    g = torch.Generator().manual_seed(0)
    latents, texts = TensorStore(None), TensorStore(None)
    for number in range(count):
        latents.put(str(number), {"latents": torch.randn(16, side // 8, side // 8, generator=g)})
    for number in range(2):
        texts.put(
            str(number),
            {
                "prompt": torch.randn(text_tokens, text_dim, generator=g),
                "pooled": torch.randn(pooled_dim, generator=g),
            },
        )
    samples = [Sample(i, side, side, side) for i in range(count)]
    cache = TrainingCache(latents=latents, texts=texts, caption_of_sample=[0] * count, dropout_caption=1)
    return cache, samples


def one_case(bench, transformer, side: int, checkpointing: bool, steps: int) -> dict:
    from toys.tiny import SCHEDULERS
    from training.config import build_training_config
    from training.loop import lora_adapter, train_lora
    from training.memory import activation_scale, step_memory_gib
    from training.recipe import block_linear_names

    config = transformer.config
    tokens = 32 if bench.args.tiny else TEXT_TOKENS
    cache, samples = synthetic_cache(
        side, 2, config.joint_attention_dim, config.pooled_projection_dim, tokens
    )
    # The default optimizer (adamw8bit) and rank; resolution is not read by the loop (samples are given).
    training = build_training_config(steps=steps, seed=0, gradient_checkpointing=checkpointing)
    stamps: list[float] = []

    def stamp(*_):
        bench.sync()
        stamps.append(time.perf_counter())

    hook = register_optimizer_step_post_hook(stamp)
    try:
        with lora_adapter(transformer, training.lora_rank, block_linear_names(transformer), seed=0):
            if bench.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated() / 2**30
            result = train_lora(transformer, cache, samples, training, SCHEDULERS["dev"], log_every=1)
    finally:
        hook.remove()
    # The first stamp is the optimizer's trial step (training/optimizer_trial.py; absent for AdamW).
    steps_s = [b - a for a, b in zip(stamps[-steps:], stamps[-steps + 1 :], strict=False)]
    out = {
        "side": side,
        "checkpointing_asked": checkpointing,
        "checkpointing_used": result.gradient_checkpointing,
        "optimizer_used": result.optimizer,
        "steps": steps,
        "step_s": statistics.median(steps_s) if steps_s else None,
        "all_s": steps_s,
        "loss": result.losses,
        "predicted_step_GB_no_checkpointing": step_memory_gib(side * side / 1e6, 1, activation_scale(config)),
    }
    if bench.device.type == "cuda":
        out["peak_GB"] = torch.cuda.max_memory_allocated() / 2**30
        out["resident_GB"] = resident
        out["step_GB"] = out["peak_GB"] - resident
    return out


def train_section(bench, models, architecture: dict) -> None:
    """All training cases; results saved after each (a timeout keeps what was measured)."""
    free_inference_models(bench, models)
    t = time.perf_counter()
    transformer = build_dev_transformer(bench, architecture)
    bench.results["train_build_s"] = time.perf_counter() - t
    steps = 3 if bench.args.tiny else 5
    for side, checkpointing in CASES:
        name = f"train_{side}_gc{int(checkpointing)}"
        if not bench.section(name, 3 if bench.args.tiny else (40 if side == 1024 else 20)):
            continue
        try:
            actual = TINY_SIDES[side] if bench.args.tiny else side
            bench.results[name] = one_case(bench, transformer, actual, checkpointing, steps)
        except Exception as exc:  # an OOM or fault in one case still leaves the others
            bench.results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
        bench.log(name, bench.results[name])
        bench.save()


def table_rows(results: dict) -> list[tuple]:
    """(what, project s, reference s, target) rows for gpu_speed's table, plus memory in the name."""
    base = results.get("baseline", {})
    rows = []
    for side, checkpointing in CASES:
        ours = results.get(f"train_{side}_gc{int(checkpointing)}", {})
        ref = base.get(f"train_step_{side}_gc{int(checkpointing)}")
        ref = ref if isinstance(ref, (int, float)) else None
        peak = ours.get("peak_GB")
        ref_peak = base.get(f"train_step_{side}_gc{int(checkpointing)}_peak_GB")
        memory = f"{peak:.0f}" if peak else "-"
        memory += f"/{ref_peak:.0f} GB" if ref_peak else " GB"
        rows.append(
            (
                f"train {side}, gc {'on' if checkpointing else 'off'}, {ours.get('optimizer_used', '?')}, {memory}",
                ours.get("step_s"),
                ref,
                "<= baseline",
            )
        )
    return rows
