"""bench/gpu_speed.py's issue-32 sections: step caching at each level, and setup with a saved compile cache.

step_cache_section: dev 28 steps and schnell 4 steps at 1024x1024 (--tiny: 256x256, 8 and 4 steps) with
go_fast, uncached and at each level: time per image, cached steps, PSNR against the uncached go_fast image
of the same seed and prompt.

compile_cache_section: bench/compile_cache_probe.py twice in fresh processes, each with an empty Inductor
cache folder: cold (compiles, saves the file), then with the saved file (should compile nothing).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse on a cliff at sunset, waves below, photograph"


def step_cache_section(bench, models) -> None:
    from flux.fast.step_cache import LEVELS, prepare_step_cache
    from flux.generate import generate
    from flux.request import build_request
    from toys.mini.quality import psnr

    prepare_step_cache()
    side = 256 if bench.args.tiny else 1024
    results: dict = {}

    def one(model: str, steps: int, level: str):
        request = build_request(
            prompt=PROMPT,
            model=model,
            aspect_ratio="custom",
            width=side,
            height=side,
            num_inference_steps=steps,
            seed=3,
            go_fast=True,
            step_cache=level,
            output_format="png",
        )
        bench.sync()
        started = time.perf_counter()
        result = generate(models, request)
        bench.sync()
        return result, time.perf_counter() - started

    for model, steps in (("dev", 8 if bench.args.tiny else 28), ("schnell", 4)):
        one(
            model, steps, "off"
        )  # the prompt's embeddings cached, kernels warm: the rows compare denoising alone
        reference, reference_s = one(model, steps, "off")
        base = np.asarray(reference.images[0])
        rows = {"off": {"s": reference_s}}
        for level in LEVELS:
            result, seconds = one(model, steps, level)
            rows[level] = {
                "s": seconds,
                "speedup": reference_s / seconds,
                "cached_steps": result.step_cache.cached_steps,
                "block_forwards_skipped": round(result.step_cache.skipped_share, 3),
                "psnr_vs_uncached_db": round(psnr(np.asarray(result.images[0]), base), 2),
            }
            bench.log("step_cache", model, level, rows[level])
        results[f"{model}_{steps}"] = rows
    bench.results["step_cache"] = results


def compile_cache_section(bench) -> None:
    probe = [sys.executable, str(ROOT / "bench" / "compile_cache_probe.py")] + (
        ["--tiny"] if bench.args.tiny else []
    )
    with tempfile.TemporaryDirectory(prefix="compile-cache-") as folder:
        runs = {}
        for name in ("cold", "with_saved_cache"):
            env = {
                **os.environ,
                "FLUX_COMPILE_CACHE": str(Path(folder) / "artifacts"),
                "TORCHINDUCTOR_CACHE_DIR": str(Path(folder) / f"inductor-{name}"),
            }
            done = subprocess.run(
                probe, env=env, capture_output=True, text=True, timeout=max(bench.left(), 60)
            )
            if done.returncode != 0:
                raise RuntimeError(f"probe {name} failed: {done.stderr[-1500:]}")
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
            bench.log("compile cache", name, runs[name])
        saved = sorted((Path(folder) / "artifacts").glob("*.bin"))
        runs["file"] = saved[0].name if saved else None
        runs["file_MB"] = round(saved[0].stat().st_size / 1e6, 1) if saved else None
    bench.results["compile_cache"] = runs


def table_rows(results: dict) -> list[tuple]:
    """Rows for gpu_speed's table: (what, project s, reference s, target)."""
    rows = []
    for key, levels in results.get("step_cache", {}).items():
        model, steps = key.split("_")
        for level, row in levels.items():
            if level == "off":
                continue
            what = f"{model} {steps}, go_fast, step_cache={level}"
            rows.append((what, row["s"], levels["off"]["s"], f"PSNR {row['psnr_vs_uncached_db']} dB"))
    compile_cache = results.get("compile_cache", {})
    if "cold" in compile_cache:
        cold, warm = compile_cache["cold"], compile_cache["with_saved_cache"]
        misses = warm["fxgraph_cache_miss"]
        rows.append(("setup 1+1 blocks, cold", cold["setup_s"], None, "recorded"))
        rows.append(
            ("setup 1+1 blocks, saved compile cache", warm["setup_s"], cold["setup_s"], f"{misses} compiled")
        )
    return rows
