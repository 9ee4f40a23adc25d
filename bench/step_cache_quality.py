"""Step caching (issue 32) on flux-mini: work skipped, image change and accuracy kept, per level.

    .venv/bin/python bench/step_cache_quality.py [--prompts 40] [--variants dev,schnell]
        [--candidate name=threshold,warmup_share,max_in_a_row ...] [--json out.json]

For each variant at its default steps (dev 28, schnell 4), 256x256, through the container's own request
path (build_request -> generate), the held-out colour/shape prompts of the quality bench (seeds fixed):
- block forwards per image, counted by a pre-hook on every transformer block (not from cache-dit's
  statistics, which are printed beside them as a cross-check);
- PSNR of the cached image against the uncached one at the same seed;
- held-out colour and shape accuracy (the shapes scorer), cached against uncached, as a share kept;
- wall time per image against uncached: CPU figures, one thread, for orientation only.
--candidate adds levels to try beside the named ones (how the named ones were chosen).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux.fast import step_cache  # noqa: E402
from flux.generate import generate  # noqa: E402
from flux.request import build_request  # noqa: E402
from toys.mini import quality  # noqa: E402
from toys.shape_scorer import score_image  # noqa: E402


def measure(models, variant: str, prompts: list[tuple[str, str, str]], levels: list[str]) -> dict:
    counter = quality.BlockCounter(models.transformers[variant])
    runs: dict[str, dict] = {}
    uncached: list[np.ndarray] = []
    for level in ["off", *levels]:
        images, forwards, reported, seconds = [], [], [], 0.0
        for i, (prompt, _, _) in enumerate(prompts):
            request = build_request(
                prompt=prompt,
                model=variant,
                aspect_ratio="custom",
                width=quality.SIDE,
                height=quality.SIDE,
                seed=1000 + i,
                output_format="png",
                step_cache=level,
            )
            started = time.perf_counter()
            result = generate(models, request)
            seconds += time.perf_counter() - started
            images.append(np.asarray(result.images[0]))
            forwards.append(counter.take())
            if result.step_cache is not None:
                reported.append(result.step_cache.block_forwards)
        if level == "off":
            uncached = images
        scores = [score_image(Image.fromarray(image)) for image in images]
        runs[level] = dict(
            block_forwards_per_image=float(np.mean(forwards)),
            reported_block_forwards=float(np.mean(reported)) if reported else None,
            psnr_mean=float(np.mean([quality.psnr(a, b) for a, b in zip(images, uncached, strict=True)])),
            psnr_min=float(np.min([quality.psnr(a, b) for a, b in zip(images, uncached, strict=True)])),
            color=float(np.mean([s.color == c for s, (_, c, _) in zip(scores, prompts, strict=True)])),
            shape=float(np.mean([s.shape == h for s, (_, _, h) in zip(scores, prompts, strict=True)])),
            seconds_per_image=seconds / len(prompts),
        )
    base = runs["off"]
    for run in runs.values():
        run["work_skipped"] = 1 - run["block_forwards_per_image"] / base["block_forwards_per_image"]
        run["accuracy_kept"] = (run["color"] + run["shape"]) / max(base["color"] + base["shape"], 1e-9)
        run["cpu_time_ratio"] = base["seconds_per_image"] / run["seconds_per_image"]
    return runs


def add_candidates(specs: list[str]) -> list[str]:
    names = []
    for spec in specs:
        name, _, numbers = spec.partition("=")
        threshold, warmup, in_a_row = numbers.split(",")
        step_cache.LEVELS[name] = step_cache.CacheLevel(float(threshold), float(warmup), int(in_a_row))
        names.append(name)
    return names


def main() -> None:
    parser = quality.bench_arguments(__doc__)
    parser.add_argument("--candidate", action="append", default=[])
    parser.add_argument("--only-candidates", action="store_true", help="skip the named levels")
    args = parser.parse_args()
    quality.use_bench_arguments(args)
    from flux.loading import load_flux

    named = [] if args.only_candidates else list(step_cache.LEVELS)
    levels = named + add_candidates(args.candidate)
    variants = tuple(args.variants.split(","))
    models = load_flux(variants)
    step_cache.prepare_step_cache()
    prompts = quality.prompts_of(quality.held_out_examples(args.prompts, args.weights))
    results = {}
    for variant in variants:
        results[variant] = measure(models, variant, prompts, levels)
        print(f"\n{variant} ({len(prompts)} held-out prompts, 256x256, default steps)")
        print("level      forwards/img  skipped  PSNR mean/min   colour  shape  kept   CPU x")
        for level, run in results[variant].items():
            print(
                f"{level:10s} {run['block_forwards_per_image']:12.1f}  {100 * run['work_skipped']:6.1f}%"
                f"  {run['psnr_mean']:5.1f}/{run['psnr_min']:5.1f}  {run['color']:6.2f} {run['shape']:6.2f}"
                f"  {100 * run['accuracy_kept']:5.1f}%  {run['cpu_time_ratio']:4.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
