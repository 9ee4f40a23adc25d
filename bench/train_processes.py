"""Step time of one training process against two (issue 31), and the all-reduce's share of a step.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_processes.py [--steps 40] [--weights weights/flux-mini]

flux-mini's transformer with a rank-16 LoRA on every block Linear, the heart concept's 15 images cached at
256x256 through the real build_cache, adamw, batch 1 per process (one thread per process: this machine has
two cores). Three runs, each a fresh set of processes:
- 1 process: `steps` optimizer steps of batch 1;
- 2 processes (gloo): `steps` optimizer steps of global batch 2 (2 x steps one-process steps);
- 2 processes with DistributedDataParallel's gradient sync switched off (no all-reduce): the same
  work without communication; the all-reduce's share of a step is 1 - this / the previous.
Prints seconds per optimizer step and per sample, and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.processes import SINGLE, Processes, run_processes  # noqa: E402

RANK = 16


def train(processes: Processes, weights: str, steps: int, sync: bool, out: str) -> None:
    os.environ["FLUX_WEIGHTS_DIR"] = weights
    os.environ.setdefault("FLUX_ALLOW_DOWNLOAD", "0")
    import training.loop as loop
    from flux.loading import load_flux
    from toys.mini import quality
    from training.buckets import assign_buckets
    from training.cache import build_cache
    from training.config import build_training_config
    from training.dataset import load_training_zip
    from training.recipe import block_linear_names

    if not sync:  # the same processes and work, without the all-reduce (bench only)
        original = loop._data_parallel

        def unsynced(transformer, processes, device):
            model = original(transformer, processes, device)
            model.require_backward_grad_sync = False
            return model

        loop._data_parallel = unsynced
    models = load_flux(("dev",), device=torch.device("cpu"), fast=False)
    work = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    examples, _ = load_training_zip(quality.concept_zip(work, 15), work / "images", "TOK")
    samples = assign_buckets([e.image.size for e in examples], (quality.SIDE,), [e.source for e in examples])
    # Several processes share one cache folder (each has its own temp folder); one keeps it in memory.
    folder = Path(out).parent / f"shared-cache-{sync}" if processes.several else None
    cache = build_cache(
        models,
        [e.image for e in examples],
        [e.caption for e in examples],
        samples,
        512,
        folder,
        dropout_caption="TOK",
        processes=processes,
    )
    if processes.several:
        cache = cache.in_memory()
    transformer = models.transformers["dev"]
    config = build_training_config(
        steps=steps * processes.size,
        batch_size=1,
        lora_rank=RANK,
        seed=1,
        optimizer="adamw",
        learning_rate=1e-3,
    )
    with loop.lora_adapter(transformer, RANK, block_linear_names(transformer), seed=1):
        result = loop.train_lora(
            transformer, cache, samples, config, models.scheduler_configs["dev"], processes=processes
        )
    if processes.main:
        Path(out).write_text(json.dumps({"seconds": result.seconds, "optimizer_steps": len(result.losses)}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "flux-mini")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    weights = str(args.weights.resolve())
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, size, sync in (
            ("1 process", 1, True),
            ("2 processes", 2, True),
            ("2 processes, no all-reduce", 2, False),
        ):
            out = str(Path(folder) / f"{size}-{sync}.json")
            if size == 1:
                train(SINGLE, weights, args.steps, sync, out)
            else:
                run_processes(size, train, weights=weights, steps=args.steps, sync=sync, out=out)
            run = json.loads(Path(out).read_text())
            run["s_per_optimizer_step"] = run["seconds"] / run["optimizer_steps"]
            run["s_per_sample"] = run["s_per_optimizer_step"] / size
            results[name] = run
            print(
                f"{name:28s} {run['s_per_optimizer_step']:.3f} s/step  {run['s_per_sample']:.3f} s/sample",
                flush=True,
            )
    one, two, unsynced = (results[k]["s_per_optimizer_step"] for k in results)
    results["samples_per_second_ratio_2_vs_1"] = (2 / two) / (1 / one)
    results["all_reduce_share_of_a_step"] = 1 - unsynced / two
    print(
        f"throughput 2 vs 1 process: {results['samples_per_second_ratio_2_vs_1']:.2f}x; "
        f"all-reduce share of a step: {100 * results['all_reduce_share_of_a_step']:.1f} %"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
