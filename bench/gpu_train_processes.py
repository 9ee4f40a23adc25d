"""The multi-GPU row of the GPU run (issue 31): the project's loop on every GPU of the machine at once.

When the lent machine has several GPUs, gpu_speed.py runs this after the one-GPU training cases: one process
per GPU (training.processes, NCCL), each with its own bf16 FLUX.1 dev transformer and rank-16 LoRA (adamw8bit),
batch 1 per process at 512x512, a few optimizer steps of the global batch; the main process records the median
optimizer step. Against the one-GPU 512 px step of the same run: samples per second, N GPUs over one.
--tiny: two gloo processes on the CPU at toy size (a dry run of the wiring).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

SIDE = 512
STEPS = 6


def multi_gpu_section(bench, architecture: dict) -> None:
    from training.processes import run_processes

    count = 2 if bench.args.tiny else torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="multi-gpu-") as folder:
        out = Path(folder) / "main.json"
        run_processes(count, one_process, architecture=architecture, tiny=bench.args.tiny, out=str(out))
        result = json.loads(out.read_text())
    single = (bench.results.get("train_512_gc0") or {}).get("step_s")
    result["processes"] = count
    if single and result.get("step_s"):
        result["samples_per_s_vs_one_gpu"] = (count / result["step_s"]) / (1 / single)
    bench.results["train_multi_gpu"] = result
    bench.log("multi-GPU training", result)


def one_process(processes, architecture: dict, tiny: bool, out: str) -> None:
    from gpu_train import build_dev_transformer, synthetic_cache

    from toys.tiny import SCHEDULERS
    from training.config import build_training_config
    from training.loop import lora_adapter, train_lora
    from training.recipe import block_linear_names

    device = processes.device()
    bench = SimpleNamespace(args=SimpleNamespace(tiny=tiny), device=device)
    transformer = build_dev_transformer(bench, architecture)
    config = transformer.config
    side = 64 if tiny else SIDE
    cache, samples = synthetic_cache(
        side,
        2 * processes.size,
        config.joint_attention_dim,
        config.pooled_projection_dim,
        32 if tiny else 512,
    )
    training = build_training_config(steps=STEPS * processes.size, seed=0)  # one-process steps
    stamps: list[float] = []

    def stamp(*_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    hook = register_optimizer_step_post_hook(stamp)
    try:
        with lora_adapter(transformer, training.lora_rank, block_linear_names(transformer), seed=0):
            result = train_lora(transformer, cache, samples, training, SCHEDULERS["dev"], processes=processes)
    finally:
        hook.remove()
    steps_s = [b - a for a, b in zip(stamps[-STEPS:], stamps[-STEPS + 1 :], strict=False)]
    if processes.main:
        report = {
            "side": side,
            "global_batch": processes.size,
            "optimizer_steps": len(result.losses),
            "optimizer_used": result.optimizer,
            "step_s": statistics.median(steps_s) if steps_s else None,
            "all_s": steps_s,
        }
        if device.type == "cuda":
            report["peak_GB_main_process"] = torch.cuda.max_memory_allocated(device) / 2**30
        Path(out).write_text(json.dumps(report))


def table_rows(results: dict) -> list[tuple]:
    """gpu_speed's table row: the multi-GPU optimizer step against the one-GPU one (a step of N samples)."""
    multi = results.get("train_multi_gpu")
    if not multi or not multi.get("step_s"):
        return []
    single = (results.get("train_512_gc0") or {}).get("step_s")
    ratio = multi.get("samples_per_s_vs_one_gpu")
    target = f"{ratio:.2f}x samples/s" if ratio else "recorded"
    return [(f"train 512, {multi['processes']} processes, step", multi["step_s"], single, target)]
