"""flux-mini's learning curve: held-out colour and shape accuracy against samples seen, scored on the
EMA checkpoints a build saves (`python -m toys.mini.build OUT --checkpoint-every N`).

    .venv/bin/python bench/flux_mini_curve.py --checkpoints OUT/checkpoints [--weights weights/flux-mini]
        [--score-weights] [--prompts 40]

Each checkpoint goes into the dev transformer of the build in --weights (same VAE and text encoders:
the build it resumed works while the new one still runs) and draws the same held-out prompts as
bench/flux_mini_quality.py's text-to-image check (256x256, 28 steps, seeds 1000...). --score-weights
scores that build's own transformer first (where a resumed build started). One JSON line a point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toys.mini import quality  # noqa: E402
from toys.mini.build import keep_freed_memory  # noqa: E402
from toys.mini.resume import phase_runs  # noqa: E402
from toys.mini.spec import DEFAULT_DIR  # noqa: E402


def load_models(folder: Path):
    os.environ["FLUX_WEIGHTS_DIR"] = str(folder.resolve())
    from flux.loading import load_flux

    return load_flux(("dev",))


def samples_seen(build: Path) -> int:
    info = json.loads((build / "build_info.json").read_text(encoding="utf-8"))
    return sum(run["samples"] for run in phase_runs(info)[1])


def score(models, prompts, label: str, samples: int | None) -> None:
    accuracy, _ = quality.accuracy(models, prompts, seed=1000)
    print(
        json.dumps(dict(point=label, samples=samples, color=accuracy.color, shape=accuracy.shape)), flush=True
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--score-weights", action="store_true", help="score --weights' transformer first")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    os.environ.setdefault("FLUX_ALLOW_DOWNLOAD", "0")
    prompts = quality.prompts_of(quality.held_out_examples(args.prompts, args.weights))
    from safetensors.torch import load_file

    models = load_models(args.weights)
    if args.score_weights:
        score(models, prompts, str(args.weights), samples_seen(args.weights))
    transformer = models.transformers["dev"]
    for path in sorted(args.checkpoints.glob("*.safetensors")):
        state = load_file(path)
        transformer.load_state_dict({k: v.to(transformer.dtype) for k, v in state.items()})
        samples = int(re.search(r"samples(\d+)", path.name).group(1))
        score(models, prompts, path.name, samples)


if __name__ == "__main__":
    main()
