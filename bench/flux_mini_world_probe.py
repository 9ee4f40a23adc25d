"""Which part of the shapes world keeps flux-mini from drawing shapes? Trains a fresh flux-mini
transformer (the build's architecture, recipe and adaLN-zero start) on a narrowed world, on the VAE and
text encoders of an existing build, then scores 40 prompts of that same world by their drawn shape.

    OMP_NUM_THREADS=1 .venv/bin/python bench/flux_mini_world_probe.py --encoders-from BUILD \
        --world WORLD [--steps 3000] [--images 800] [--prompts 40] \
        [--set FIELD=VALUE ...]

Worlds (every one: plain backgrounds, 8 shapes, 256 px only):
- easy: large, centred, 4 colours (red, blue, green, black) on white;
- place: every size and position, the same 4 colours on white;
- position: large, every position, the same 4 colours on white;
- place_no_small: medium and large, every position, the same 4 colours on white;
- size: centred, every size, the same 4 colours on white;
- colour: large and centred, every colour on every background.
The full world is every size and position with every colour on every background. The test prompts are
drawn from the world with another seed (new images of seen pairs: the probe asks whether the outline is
drawn at all, not whether it generalises to held-out pairs). ~20 min for 3,000 steps on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from flux.loading import FluxModels  # noqa: E402
from flux.variants import VARIANTS  # noqa: E402
from toys.mini.quality import draw  # noqa: E402
from toys.mini.resume import load_build  # noqa: E402
from toys.mini.spec import MiniSpec, TransformerPhase, with_overrides  # noqa: E402
from toys.mini.transformer_training import (  # noqa: E402
    adaln_zero,
    build_transformer,
    train_transformer,
    training_samples,
)
from toys.shape_scorer import score_image  # noqa: E402
from toys.shapes import COLORS, SHAPES, SIZES, Attributes, caption, render, sample_attributes  # noqa: E402
from toys.tiny import SCHEDULERS  # noqa: E402

FEW_COLORS = ("red", "blue", "green", "black")
SIDE = 256


class World(NamedTuple):
    all_colours: bool  # every colour on every background, else FEW_COLORS on white
    sizes: tuple[str, ...]
    centred: bool  # centre position only


WORLDS: dict[str, World] = {
    "easy": World(False, ("large",), True),
    "place": World(False, tuple(SIZES), False),
    "position": World(False, ("large",), False),
    "place_no_small": World(False, ("medium", "large"), False),
    "size": World(False, tuple(SIZES), True),
    "colour": World(True, ("large",), True),
}


def world_attributes(name: str, rng: np.random.Generator) -> Attributes:
    world = WORLDS[name]
    if world.all_colours:
        pairs, backgrounds = [(c, s) for c in COLORS for s in SHAPES], None
    else:
        pairs, backgrounds = [(c, s) for c in FEW_COLORS for s in SHAPES], ["white"]
    while True:  # rejection keeps the draw order of sample_attributes
        attrs = sample_attributes(
            rng, SIDE, pairs=pairs, backgrounds=backgrounds, sizes=list(world.sizes), two_tone=0.0
        )
        if not world.centred or attrs.position == "center":
            return attrs


def probe(
    encoders_from: Path, world: str, steps: int, images: int, prompts: int, settings: list[str]
) -> dict:
    spec = with_overrides(MiniSpec(), settings)
    rng = np.random.default_rng(spec.seed)
    train_attrs = [world_attributes(world, rng) for _ in range(images)]
    vae, clip, t5, clip_tok, t5_tok, _ = load_build(encoders_from)
    transformer = build_transformer(spec, guidance_embeds=True, seed=spec.seed + 1)
    adaln_zero(transformer)
    models = FluxModels(
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
        text_encoder=clip,
        text_encoder_2=t5,
        vae=vae,
        transformers={"dev": transformer},
        scheduler_configs={"dev": dict(FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"]).config)},
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    phase = TransformerPhase(
        steps=steps,
        images=images,
        small_images=0,
        learning_rate=spec.phases[-1].learning_rate,
        warmup_steps=spec.phases[-1].warmup_steps,
        high_noise_share=spec.phases[-1].high_noise_share,
    )
    started = time.perf_counter()
    run, _ = train_transformer(
        models,
        [render(a) for a in train_attrs],
        [caption(a) for a in train_attrs],
        training_samples(spec, images, 0),
        spec,
        phase,
        seed=spec.seed,
        max_sequence_length=VARIANTS["dev"].max_sequence_length,
    )
    trained = time.perf_counter() - started
    transformer.eval().requires_grad_(False)
    test_rng = np.random.default_rng(12345)
    kept = []  # (colour right, shape right) per prompt
    asked, drawn = Counter(), Counter()  # prompts and right shapes per size
    for index in range(prompts):
        attrs = world_attributes(world, test_rng)
        prompt = caption(attrs)
        score = score_image(draw(models, prompt, seed=500 + index))
        kept.append((score.color == attrs.color, score.shape == attrs.shape))
        asked[attrs.size] += 1
        drawn[attrs.size] += score.shape == attrs.shape
        logging.info("%s -> drawn %s %s", prompt, score.color, score.shape)
    return dict(
        world=world,
        steps=steps,
        samples=steps * spec.batch,
        images=images,
        train_seconds=round(trained),
        final_loss=round(float(np.mean(run.losses[-50:])), 4),
        color=float(np.mean([c for c, _ in kept])),
        shape=float(np.mean([s for _, s in kept])),
        shape_by_size={size: f"{drawn[size]}/{asked[size]}" for size in WORLDS[world].sizes},
        prompts=prompts,
        settings=settings,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders-from", type=Path, required=True, help="a flux-mini build folder")
    parser.add_argument("--world", choices=tuple(WORLDS), required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="as build.py --set, for the transformer and its training (e.g. heads=8)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(json.dumps(probe(args.encoders_from, args.world, args.steps, args.images, args.prompts, args.set)))


if __name__ == "__main__":
    main()
