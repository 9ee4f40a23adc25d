"""Training steps per second on the tiny FLUX.1 dev model, on the CPU: the loop's own overhead.

    python bench/train_tiny.py                       # 512 and 256 px, 1 and 2 threads
    python bench/train_tiny.py --steps 30 --warmup 3 --threads 1,2 --sizes 512,256

The library path the trainer runs: the real cache (VAE latents, both text encoders at dev's T5 length
512), lora_adapter on every block linear (rank 16), train_lora with AdamW, batch 1. The tiny model has
random weights at toy width, so this measures per-step overhead (peft wrappers, autograd, optimizer,
Python), not FLUX.1 compute. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flux.loading import load_flux  # noqa: E402
from toys.tiny import ensure_tiny_model  # noqa: E402
from training.buckets import assign_buckets  # noqa: E402
from training.cache import build_cache  # noqa: E402
from training.config import build_training_config  # noqa: E402
from training.loop import lora_adapter, train_lora  # noqa: E402
from training.recipe import select_lora_targets  # noqa: E402


def measure(models, size: int, threads: int, steps: int, warmup: int, rank: int) -> float:
    """Steps per second of train_lora at one square bucket, after `warmup` untimed steps."""
    torch.set_num_threads(threads)
    transformer = models.transformers["dev"]
    image = Image.new("RGB", (size, size), "red")
    image.paste("white", (size // 4, size // 4, size // 2, size // 2))
    samples = assign_buckets([image.size], (size,))
    cache = build_cache(models, [image], ["a photo of TOK"], samples, 512, None)
    common = dict(lora_rank=rank, resolution=str(size), seed=0, optimizer="adamw", caption_dropout_rate=0.0)
    scheduler = models.scheduler_configs["dev"]
    with lora_adapter(transformer, rank, select_lora_targets(transformer, None), seed=0):
        train_lora(transformer, cache, samples, build_training_config(steps=warmup, **common), scheduler)
        started = time.perf_counter()
        train_lora(transformer, cache, samples, build_training_config(steps=steps, **common), scheduler)
        return steps / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="512,256", help="comma-separated square bucket sides")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 3)")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    os.environ.setdefault("FLUX_WEIGHTS_DIR", str(ensure_tiny_model()))
    os.environ.setdefault("FLUX_ALLOW_DOWNLOAD", "0")
    models = load_flux(("dev",))
    sizes = [int(s) for s in args.sizes.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]

    print(f"tiny FLUX.1 dev, CPU, batch 1, rank {args.rank}, AdamW, {args.steps} steps after {args.warmup}")
    print()
    print(
        "| bucket | image tokens + text tokens | "
        + " | ".join(f"{t} thread(s)" for t in thread_counts)
        + " |"
    )
    print("|---|---|" + "---|" * len(thread_counts))
    for size in sizes:
        rates = [measure(models, size, t, args.steps, args.warmup, args.rank) for t in thread_counts]
        tokens = (size // 16) ** 2
        cells = " | ".join(f"{r:.1f} steps/s ({1000 / r:.0f} ms/step)" for r in rates)
        print(f"| {size}x{size} | {tokens} + 512 | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
