"""One go_fast setup in a fresh process, timed: what a server's boot pays to compile, with or without a saved
compile cache (flux/fast/compile_cache.py). bench/gpu_speed.py runs it twice (cold, then with the file the
first run saved), each with an empty Inductor cache folder, as a new machine has.

    python bench/compile_cache_probe.py [--tiny]   # env: FLUX_COMPILE_CACHE, TORCHINDUCTOR_CACHE_DIR

The transformer has FLUX.1's full width but one double and one single block: the compiled graphs are one
per block class and batch kind whatever the depth (flux/fast/compiled.py), so this compiles what the
57-block model compiles, in a fraction of the memory (the models of the main run stay loaded); one warm-up
shape (batch 1), so 2 of the 4 graphs a real setup compiles: about half its compile time.
Prints one JSON line: setup seconds, Inductor cache hits and misses, whether a cache file was loaded.
--tiny: the tiny transformer on the CPU with Inductor (fp8 support answered yes), for a dry run; its fp8
products are the float32 emulation (torch 2.11's CPU _scaled_mm takes per-tensor scales only, not rowwise).
"""

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_speed import FULL  # noqa: E402

import flux.fast.path as fast_path  # noqa: E402
from flux.fast.capability import FastSupport  # noqa: E402

# FLUX.1's transformer with one block of each kind.
SHALLOW = {**FULL["transformer"], "num_layers": 1, "num_single_layers": 1}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    if args.tiny:
        from toys.tiny import build_transformer

        device, shapes, seq = torch.device("cpu"), ((256, 256, 1),), 16
        transformer = build_transformer(guidance_embeds=True).to(torch.bfloat16)
        fast_path.detect_fast_support = lambda device: FastSupport(True, "cpu dry run")
        fast_path.FastTransformer = functools.partial(fast_path.FastTransformer, backend="emulate")
        torch.cuda.mem_get_info = lambda device=None: (2**40, 2**40)
    else:
        device, shapes, seq = torch.device("cuda"), ((1024, 1024, 1),), 512  # batch 1: 2 of setup's 4 graphs
        with torch.device(device):
            transformer = FluxTransformer2DModel(guidance_embeds=True, **SHALLOW).to(torch.bfloat16)
    transformer.eval().requires_grad_(False)
    started = time.perf_counter()
    path = fast_path.setup_fast({"dev": transformer}, device, {"dev": seq}, mode="auto", warmup_shapes=shapes)
    seconds = time.perf_counter() - started
    inductor = counters["inductor"]
    print(
        json.dumps(
            dict(
                setup_s=seconds,
                compiled=bool(path.transformers) and path.transformers["dev"].compiled,
                fxgraph_cache_miss=inductor["fxgraph_cache_miss"],
                fxgraph_cache_hit=inductor["fxgraph_cache_hit"],
            )
        )
    )


if __name__ == "__main__":
    main()
