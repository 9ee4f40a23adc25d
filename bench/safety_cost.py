"""Cost of the safety checker per generated image: preprocessing + one batched classifier forward.

    python bench/safety_cost.py                           # tiny ViT, CPU (loaded through the real path)
    python bench/safety_cost.py --size full               # ViT-base/16 at 224 px, the real model's shape, CPU
    python bench/safety_cost.py --size full --device cuda # the same in bf16 on the GPU

--size full builds the real checker's architecture (Falconsai/nsfw_image_detection: ViT-base, patch 16,
224 px, two labels; 86M parameters, 343 MB of fp32 safetensors) with random weights: the compute does not
depend on the values. Images are 1024x1024 like FLUX outputs, so the resize is timed too. Download-free.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flux.safety import SafetyChecker  # noqa: E402
from toys.tiny_helpers import build_tiny_safety_checker  # noqa: E402


def full_size_checker(device: torch.device) -> SafetyChecker:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = ViTForImageClassification(
            ViTConfig(id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
        ).to(dtype)
    processor = ViTImageProcessor(size={"height": 224, "width": 224})  # the real preprocessor's size
    return SafetyChecker(model, processor, device)


def time_batches(checker: SafetyChecker, batch: int, repeats: int, device: torch.device) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(
            torch.randint(0, 256, (1024, 1024, 3), generator=generator, dtype=torch.uint8).numpy()
        )
        for _ in range(batch)
    ]
    checker.flagged(images)  # warm-up: first-call allocations, cuDNN/cuBLAS selection
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        checker.flagged(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - start) / batch)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.size == "tiny":
        folder = build_tiny_safety_checker(Path(tempfile.mkdtemp(prefix="safety-bench-")))
        checker = SafetyChecker.load(device, folder=folder)
    else:
        checker = full_size_checker(device)
    parameters = sum(p.numel() for p in checker.model.parameters())
    print(
        f"safety checker: {args.size}, {parameters / 1e6:.2f}M parameters, {device}, torch threads {torch.get_num_threads()}"
    )
    for batch in (1, 4):
        seconds = time_batches(checker, batch, args.repeats, device)
        print(
            f"batch {batch}: {statistics.median(seconds) * 1000:.1f} ms/image median"
            f" (min {min(seconds) * 1000:.1f}, {args.repeats} runs, 1024x1024 inputs)"
        )


if __name__ == "__main__":
    main()
