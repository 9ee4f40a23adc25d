"""flux-mini's quality bars (issue 5), measured through the container's own request path.

    .venv/bin/python bench/flux_mini_quality.py [--weights weights/flux-mini] [--prompts 100]

Prints: the VAE's round-trip ceiling on held-out images; text-to-image colour/shape accuracy on held-out
(unseen) colour/shape pairs and, for reference, on seen pairs; seed variety (spread of the scored shape
centres); img2img at low and high prompt_strength; inpainting (each shape masked and recoloured red:
change inside the mask, difference outside); recovery (held-out images noised to prompt_strength
0.5/0.7/0.9, redrawn with their caption: is the shape kept); go_fast off and on (20 held-out prompts
each, and whether the fp8 path ran); and "training teaches": a LoRA trained through the real Cog trainer
(train.py in `python -m cog.server.http`) on 15 hearts captioned TOK (with diff_output_preservation_class
the world's eight shape words unless --lora-preservation-class says otherwise, '' for none), then the
share of hearts drawn for prompts that ask for one, and held-out accuracy with the LoRA against without.
All at 256x256, dev, its default 28 steps, seeds fixed; img2img and inpainting call the diffusers
pipelines on the loaded components directly (quality.edit), at exactly 256x256.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from toys.mini import quality  # noqa: E402
from toys.mini.build import keep_freed_memory  # noqa: E402
from toys.shape_scorer import score_image  # noqa: E402
from toys.shapes import COLORS, caption, held_out_pairs, sample_attributes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def known_prompts(count: int, seed: int) -> list[tuple[str, str, str]]:
    """Short prompts for pairs seen in training, on a white background."""
    rng = np.random.default_rng(seed)
    unseen = held_out_pairs(0)
    pairs = [
        (c, s)
        for c in COLORS
        for s in ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")
        if (c, s) not in unseen and c != "white"
    ]
    chosen = [pairs[int(i)] for i in rng.choice(len(pairs), size=count, replace=False)]
    return [(f"a {c} {s} on a white background", c, s) for c, s in chosen]


def text_to_image(models, count: int, build: Path) -> dict:
    examples = quality.held_out_examples(count, build)
    held, scores = quality.accuracy(models, quality.prompts_of(examples), seed=1000)
    background = np.mean(
        [s.background == e.attributes.background for s, e in zip(scores, examples, strict=True)]
    )
    seen, _ = quality.accuracy(models, known_prompts(20, seed=5), seed=2000)
    return {
        "held_out": held.__dict__,
        "held_out_background": float(background),
        "seen_pairs_short_prompts": seen.__dict__,
    }


def vae_ceiling(models, count: int) -> dict:
    """The VAE's round trip of held-out images: what the transformer's images can reach at best."""
    from toys.mini.vae_gate import round_trip

    return round_trip(models.vae, count, quality.SIDE).__dict__


def seed_variety(models, seeds: int = 8) -> dict:
    prompt = "a red circle on a white background"
    scores = [score_image(quality.draw(models, prompt, seed)) for seed in range(seeds)]
    centres = np.array([s.center for s in scores])
    return {
        "prompt": prompt,
        "centres": [tuple(round(float(v), 2) for v in c) for c in centres],
        "std_x": round(float(centres[:, 0].std()), 3),
        "std_y": round(float(centres[:, 1].std()), 3),
        "distinct_cells": len({(int(x * 3), int(y * 3)) for x, y in centres}),  # of the 3x3 grid
        "red": sum(s.color == "red" for s in scores),
        "circle": sum(s.shape == "circle" for s in scores),
    }


def go_fast_off_on(models, count: int, build: Path) -> dict:
    """Held-out prompts drawn with go_fast off and on (the same seeds): accuracy of each, and whether
    the fp8 + compiled path ran at all (it needs a CUDA GPU with fp8; elsewhere go_fast falls back)."""
    prompts = quality.prompts_of(quality.held_out_examples(count, build))
    result = {}
    for go_fast in (False, True):
        accuracy, _ = quality.accuracy(models, prompts, seed=1000, go_fast=go_fast)
        result[f"go_fast_{str(go_fast).lower()}"] = accuracy.__dict__
    off, on = (
        np.asarray(quality.draw(models, prompts[0][0], 1000, go_fast=flag), np.int16)
        for flag in (False, True)
    )
    result["max_pixel_difference_first_prompt"] = int(np.abs(off - on).max())
    fast = models.fast
    result["fp8_path_ran"] = bool(fast is not None and fast.transformers)
    result["why_not"] = None if result["fp8_path_ran"] else (fast.support.reason if fast else "not set up")
    return result


def sources(count: int) -> list:
    rng = np.random.default_rng(7)
    pairs = [("blue", "square"), ("green", "triangle"), ("purple", "hexagon"), ("yellow", "diamond")]
    return [
        sample_attributes(
            rng, quality.SIDE, pairs=[pairs[i % len(pairs)]], backgrounds=["white"], sizes=["large"]
        )
        for i in range(count)
    ]


def img2img(models, count: int, work: Path) -> dict:
    prompt = "a red circle on a white background"
    result = {}
    for strength in (0.3, 0.95):
        kept_colour = kept_place = follows = 0
        for i, attrs in enumerate(sources(count)):
            score = score_image(quality.edit(models, prompt, i, quality.source_image(attrs), strength))
            centre = (attrs.center[0] / attrs.image_size, attrs.center[1] / attrs.image_size)
            kept_colour += score.color == attrs.color
            kept_place += quality.centre_distance(score.center, centre) < 0.1
            follows += score.color == "red"
        result[f"strength_{strength}"] = {
            "source_colour_kept": kept_colour / count,
            "source_centre_within_0.1": kept_place / count,
            "prompt_colour_red": follows / count,
        }
    return result


def recovery(models, count: int, build: Path) -> dict:
    """Held-out images noised to a strength and redrawn with their own caption: the share whose shape
    comes back. Separates denoising (the outline is in the input) from composing it out of pure noise."""
    examples = quality.held_out_examples(count, build)
    result = {}
    for strength in (0.5, 0.7, 0.9):
        kept = sum(
            score_image(
                quality.edit(models, e.caption, 1000 + i, quality.source_image(e.attributes), strength)
            ).shape
            == e.attributes.shape
            for i, e in enumerate(examples)
        )
        result[f"shape_kept_at_strength_{strength}"] = kept / count
    return result


def inpainting(models, count: int, work: Path) -> dict:
    """Each source's shape recoloured by inpainting: the square around the shape masked, the prompt its
    caption with red for its colour. The world shows one shape per image, so the masked region holds
    the shape (asking for a second shape beside the kept one asks for an image the model never saw)."""
    inside, outside, red_inside = [], [], 0
    for i, attrs in enumerate(sources(count)):
        source = quality.source_image(attrs)
        (x, y), r = attrs.center, attrs.radius * 1.15
        box = tuple(int(round(min(max(v, 0), attrs.image_size))) for v in (x - r, y - r, x + r, y + r))
        mask = Image.new("L", source.size, 0)
        mask.paste(255, box)
        region = np.asarray(mask) > 127
        prompt = caption(dataclasses.replace(attrs, color="red"))
        out = quality.edit(models, prompt, i, source, 1.0, mask=mask)
        diff = np.abs(np.asarray(out, dtype=np.float32) - np.asarray(source, dtype=np.float32)).mean(-1)
        inside.append(float(diff[region].mean()))
        outside.append(float(diff[~region].mean()))
        red_inside += score_image(out.crop(box)).color == "red"
    return {
        "mean_abs_change_inside_mask": round(float(np.mean(inside)), 1),
        "mean_abs_change_outside_mask": round(float(np.mean(outside)), 2),
        "red_in_masked_square": red_inside / count,
    }


def train_through_cog(zip_path: Path, build: Path, work: Path, **inputs) -> bytes:
    """One `cog train` on `build`'s flux-mini through the real Cog server (train.py, as a user runs
    it): the trained weights tar. The helper models are the tiny ones; no previews."""
    from cog_local import cog_server, decode_data_url, file_to_data_url, run_job

    from toys.tiny_helpers import ensure_tiny_helpers

    env = {
        "FLUX_WEIGHTS_DIR": str(build.resolve()),
        "FLUX_HELPER_WEIGHTS_DIR": str(ensure_tiny_helpers()),
        "FLUX_ALLOW_DOWNLOAD": "0",
        "LORA_PREVIEW_STEPS": "0",
    }
    with cog_server("train", env=env, log_path=work / "train-server.log") as url:
        result = run_job(url, "train", {"input_images": file_to_data_url(zip_path), **inputs})
    if result["status"] != "succeeded":
        raise RuntimeError(f"the training failed: {result.get('error')} (log: {work / 'train-server.log'})")
    return decode_data_url(result["output"]["weights"])


def training_teaches(
    models,
    work: Path,
    build: Path,
    images: int,
    steps: int,
    learning_rate: float,
    rank: int,
    seed: int,
    samples: int,
    preservation: tuple[str, float],
    scales: tuple[float, ...] = (1.0,),
) -> dict:
    """A heart LoRA trained through the Cog trainer on `images` hearts captioned with TOK: the share of
    hearts drawn for prompts that ask for one (in the world's words, and as the bare "a TOK on a white
    background"), and the held-out colour/shape accuracy with the LoRA against without.
    preservation: diff_output_preservation_class and _multiplier ("" for none). scales: the
    lora_scale values the LoRA is measured at (the first is the headline)."""
    held = quality.prompts_of(quality.held_out_examples(40, build))
    asks = quality.concept_prompts(samples)

    def measure() -> tuple[float, float, quality.Accuracy]:
        hearts = [score_image(quality.draw(models, p, 5000 + i)).shape for i, p in enumerate(asks)]
        bare = [
            score_image(quality.draw(models, quality.CONCEPT_PROMPT, 4000 + i)).shape for i in range(samples)
        ]
        accuracy, _ = quality.accuracy(models, held, seed=1000)
        return hearts.count("heart") / samples, bare.count("heart") / samples, accuracy

    hearts_before, bare_before, before = measure()
    started = time.perf_counter()
    inputs = dict(
        trigger_word="TOK",
        steps=steps,
        learning_rate=learning_rate,
        lora_rank=rank,
        resolution=str(quality.SIDE),
        autocaption=False,
        seed=seed,
        diff_output_preservation_class=preservation[0] or None,
        diff_output_preservation_multiplier=preservation[1],
    )
    tar = train_through_cog(quality.concept_zip(work, images), build, work, **inputs)
    train_seconds = time.perf_counter() - started
    lora_file = quality.lora_from_tar(tar, work / "lora")
    with_lora = {}
    for scale in scales:
        fuser = quality.fuse(models, lora_file, scale)
        try:
            with_lora[scale] = measure()
        finally:
            fuser.clear()

    def effect(hearts: float, bare: float, after: quality.Accuracy) -> dict:
        return {
            "heart_share_asked_in_world_words": {"without_lora": hearts_before, "with_lora": hearts},
            "heart_share_bare_prompt": {"without_lora": bare_before, "with_lora": bare},
            "held_out_without_lora": before.__dict__,
            "held_out_with_lora": after.__dict__,
            "held_out_shape_kept": round(after.shape / before.shape, 3) if before.shape else None,
            "held_out_colour_kept": round(after.color / before.color, 3) if before.color else None,
        }

    headline, *others = scales
    return {
        "images": images,
        **inputs,
        "train_seconds_with_server_start": round(train_seconds, 1),
        "lora_scale": headline,
        **effect(*with_lora[headline]),
        **{f"at_lora_scale_{scale}": effect(*with_lora[scale]) for scale in others},
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "flux-mini")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--lora-images", type=int, default=15)
    parser.add_argument("--lora-steps", type=int, default=2000)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-seed", type=int, default=0, help="the training's seed")
    parser.add_argument(
        "--lora-preservation-class",
        default=quality.PRESERVED_CLASSES,
        help="the trainer's diff_output_preservation_class ('' for none; default: the eight shape words)",
    )
    parser.add_argument("--lora-preservation-multiplier", type=float, default=1.0)
    parser.add_argument(
        "--lora-scales", default="1.0", help="lora_scale values the LoRA is measured at, comma-separated"
    )
    parser.add_argument("--samples", type=int, default=20, help="heart prompts scored, each way")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="vae,t2i,variety,img2img,inpaint,recover,go_fast,teach")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    os.environ["FLUX_WEIGHTS_DIR"] = str(args.weights.resolve())
    os.environ.setdefault("FLUX_ALLOW_DOWNLOAD", "0")
    from flux.loading import load_flux

    models = load_flux(("dev",))
    work = quality.temp_folder()
    only = set(args.only.split(","))
    results: dict = {}
    steps = [
        ("vae", lambda: vae_ceiling(models, args.prompts)),
        ("t2i", lambda: text_to_image(models, args.prompts, args.weights)),
        ("variety", lambda: seed_variety(models)),
        ("img2img", lambda: img2img(models, 4, work)),
        ("inpaint", lambda: inpainting(models, 8, work)),
        ("recover", lambda: recovery(models, 12, args.weights)),
        ("go_fast", lambda: go_fast_off_on(models, 20, args.weights)),
        (
            "teach",
            lambda: training_teaches(
                models,
                work,
                args.weights,
                args.lora_images,
                args.lora_steps,
                args.lora_lr,
                args.lora_rank,
                args.lora_seed,
                args.samples,
                (args.lora_preservation_class, args.lora_preservation_multiplier),
                tuple(float(scale) for scale in args.lora_scales.split(",")),
            ),
        ),
    ]
    for name, run in steps:
        if name in only:
            started = time.perf_counter()
            results[name] = run()
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(name, json.dumps(results[name], default=str), flush=True)
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
