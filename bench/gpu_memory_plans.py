"""The memory plans on the lent GPU, each emulating its card (bench/gpu_speed.py calls plans_section).

Per row the GPU is capped with torch.cuda.set_per_process_memory_fraction to the card's memory, the
plan is chosen as setup chooses it (flux/memory_plan.py, from the capped free memory), and full-size
FLUX.1 components with random weights (built on the GPU in bf16, then put in host memory as loading
leaves them) are placed by flux.loading.apply_plan. Then: dev and schnell 1024x1024 through
generate() (a new prompt each: T5 visits where the plan keeps it in host memory; alternating models:
the swap), one LoRA switch (rank 16 on every block Linear) and back with the base image compared
bit for bit, the peak memory against the cap, and one training step under the card's training plan.
--tiny runs the same rows on the CPU with the tiny model (the plan forced, nothing capped).
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch

# (row, card's memory in MiB as nvidia-smi reports it, plan expected, training plan expected,
# storage forced (the card has no fp8 units) or None)
ROWS = (
    ("24 GB, fp8 (RTX 4090, L4)", 24564, "8bit", "8bit", None),
    ("24 GB, int8 (A10)", 23028, "8bit", "8bit", "int8"),
    ("40 GB (A100 40 GB)", 40960, "swap", "resident", None),
)
PROMPT = "a lighthouse on a cliff at dusk, photo"


def plans_section(bench, models, architecture: dict) -> None:
    """Every row; the inference models of the earlier sections are freed first (the caps are small)."""
    from gpu_train import free_inference_models

    free_inference_models(bench, models)
    for row, total_mib, expected, expected_training, storage in ROWS:
        key = f"plan {row}"
        if not bench.section(key, 5 if bench.args.tiny else 100):
            continue
        try:
            bench.results[key] = one_row(
                bench, architecture, total_mib, (expected, expected_training), storage
            )
        except Exception as exc:  # an OOM in one row still leaves the others
            bench.results[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        finally:
            _uncap(bench)
        bench.log(key, bench.results[key])
        bench.save()


def one_row(
    bench, architecture: dict, total_mib: int, expected: tuple[str, str], storage: str | None
) -> dict:
    """expected: the plans setup and training should choose (forced on the CPU, where nothing is capped)."""
    from flux.gpu_memory import gpu_free_bytes
    from flux.loading import apply_plan
    from flux.memory_plan import choose_plan

    expected, expected_training = expected
    out: dict = {"expected_plan": expected, "expected_training_plan": expected_training}
    models = build_host_models(bench, architecture)
    cap = _cap(bench, total_mib)
    free = gpu_free_bytes(bench.device) if bench.device.type == "cuda" else None
    has_fp8 = bench.device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    plan = choose_plan(free, tuple(models.transformers), has_fp8=has_fp8, forced=None if free else expected)
    if storage:
        plan = dataclasses.replace(plan, storage=storage)  # the card has no fp8 units
    out.update(plan=plan.name, storage=plan.storage, line=plan.describe(), cap_GB=(cap or 0) / 2**30)
    started = time.perf_counter()
    apply_plan(models, plan, fast=False)
    bench.sync()
    out["setup_s"] = time.perf_counter() - started
    side = 256 if bench.args.tiny else 1024
    steps = {"dev": 2 if bench.args.tiny else 28, "schnell": 2 if bench.args.tiny else 4}
    for number, model in enumerate(("dev", "schnell", "dev", "dev")):
        moves = models.placement.bytes_moved
        seconds = _generate(bench, models, model, steps[model], side, f"{PROMPT} {number}")
        out[f"{number}_{model}_s"] = seconds
        out[f"{number}_{model}_GB_moved"] = (models.placement.bytes_moved - moves) / 1e9
    out.update(lora_row(bench, models))
    if bench.device.type == "cuda":
        out["peak_GB"] = torch.cuda.max_memory_allocated() / 2**30
        out["under_cap"] = torch.cuda.max_memory_allocated() <= cap
    del models
    _free(bench)
    out.update(training_row(bench, architecture, cap, expected_training, storage))
    return out


def lora_row(bench, models) -> dict:
    """A rank-16 LoRA on every block Linear fused and removed; dev's base image before and after."""
    from lora.apply import LoraFuser
    from lora.formats import LoraUpdate

    transformer = models.transformer_for(_variant("dev"))
    fuser = LoraFuser(transformer, host_originals=lambda name: models.placement.host_weight("dev", name))
    models.placement.on_evict.append(lambda name: fuser.forget_fused() if name == "dev" else None)
    g = torch.Generator().manual_seed(0)
    lora = {
        name: LoraUpdate(
            down=torch.randn(16, m.in_features, generator=g) * 0.01,
            up=torch.randn(m.out_features, 16, generator=g) * 0.01,
            alpha=16.0,
        )
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name
    }
    before = _image(models, "dev")
    bench.sync()
    started = time.perf_counter()
    fuser.set_loras([("random", lora, 1.0)])
    bench.sync()
    switch_s = time.perf_counter() - started
    with_lora = _image(models, "dev")
    started = time.perf_counter()
    fuser.clear()
    bench.sync()
    return {
        "lora_switch_s": switch_s,
        "lora_clear_s": time.perf_counter() - started,
        "lora_changes_image": with_lora != before,
        "base_bit_for_bit_after_lora": _image(models, "dev") == before,
        "lora_backup_GB": fuser.backup_bytes / 1e9,
    }


def training_row(bench, architecture: dict, cap: int | None, expected: str, storage: str | None) -> dict:
    """The card's training plan and one real LoRA step (the loop's own rule picks checkpointing)."""
    from gpu_train import build_dev_transformer, one_case

    from flux.gpu_memory import gpu_free_bytes
    from flux.loading import place_transformer
    from flux.memory_plan import choose_plan
    from flux.placement import Placement

    _uncap(bench)
    transformer = build_dev_transformer(bench, architecture).to("cpu")
    _free(bench)
    if cap is not None:
        _cap(bench, cap // 2**20)
    free = gpu_free_bytes(bench.device) if bench.device.type == "cuda" else None
    has_fp8 = bench.device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    plan = choose_plan(free, ("dev",), training=True, has_fp8=has_fp8, forced=None if free else expected)
    if storage and plan.eight_bit:
        plan = dataclasses.replace(plan, storage=storage)
    place_transformer(transformer, "dev", plan, Placement(bench.device, 1))
    case = one_case(bench, transformer, 64 if bench.args.tiny else 1024, False, 3)
    return {
        "train_plan": plan.name,
        "train_storage": plan.storage,
        **{f"train_{k}": v for k, v in case.items()},
    }


def build_host_models(bench, architecture: dict):
    """Both variants, T5, CLIP and the VAE in host memory (as from_pretrained leaves them)."""
    from gpu_speed import build_models

    models = build_models(bench)
    for module in (models.text_encoder, models.text_encoder_2, models.vae, *models.transformers.values()):
        module.to("cpu")
    _free(bench)
    return models


def _generate(bench, models, model: str, steps: int, side: int, prompt: str) -> float:
    from flux.generate import generate
    from flux.request import build_request

    request = build_request(
        prompt=prompt,
        model=model,
        num_inference_steps=steps,
        aspect_ratio="custom",
        width=side,
        height=side,
        seed=1,
    )
    bench.sync()
    started = time.perf_counter()
    generate(models, request)
    bench.sync()
    return time.perf_counter() - started


def _image(models, model: str) -> bytes:
    from flux.generate import generate
    from flux.request import build_request

    request = build_request(
        prompt=PROMPT,
        model=model,
        num_inference_steps=4,
        aspect_ratio="custom",
        width=256,
        height=256,
        seed=2,
    )
    return generate(models, request).images[0].tobytes()


def _variant(name: str):
    from flux.variants import get_variant

    return get_variant(name)


def _cap(bench, total_mib: int) -> int | None:
    if bench.device.type != "cuda":
        return None
    total = torch.cuda.mem_get_info()[1]
    fraction = min(1.0, total_mib * 2**20 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    torch.cuda.reset_peak_memory_stats()
    return int(fraction * total)


def _uncap(bench) -> None:
    _free(bench)
    if bench.device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)


def _free(bench) -> None:
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


def table_rows(results: dict) -> list[tuple]:
    """gpu_speed's table rows: per plan, dev and schnell at 1024 (after a swap where the plan swaps),
    against the uncapped bf16 run's own dev/schnell; the target column carries peak, LoRA, training."""
    rows = []
    for row, *_ in ROWS:
        r = results.get(f"plan {row}")
        if not r:
            continue
        if "error" in r:
            rows.append((f"plan {row}", None, None, f"error: {r['error'][:60]}"))
            continue
        label = f"{r['plan']} {r['storage']}, {row.split(' (')[0]}"
        peak = f"peak {r.get('peak_GB', 0):.1f}/{r['cap_GB']:.1f} GB" if r.get("cap_GB") else "no cap (CPU)"
        rows.append((f"plan {label}: dev 28", r["2_dev_s"], _median(results.get("dev_std_s")), peak))
        exact = "exact" if r["base_bit_for_bit_after_lora"] else "NOT EXACT"
        rows.append(
            (
                f"plan {label}: schnell 4",
                r["1_schnell_s"],
                _median(results.get("schnell_std_s")),
                f"LoRA {r['lora_switch_s']:.2f} s, {exact}",
            )
        )
        rows.append(
            (f"plan {label}: train step ({r['train_plan']})", r.get("train_step_s"), None, "recorded")
        )
    return rows


def _median(value) -> float | None:
    return value.get("median") if isinstance(value, dict) else None  # gpu_speed's {"median", "all"}
