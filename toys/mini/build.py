"""Train flux-mini from scratch and write it in diffusers layout:

    python -m toys.mini.build [OUTPUT_DIR] [--seed 0] [--steps N]   # default weights/flux-mini

Stages: the shapes datasets (256 and 128 px, plain backgrounds, held-out colour/shape pairs left out),
the VAE and its round-trip gate (toys.mini.vae_gate), its latent normalisation, the text encoders
(CLIP trained briefly, T5 random), the transformer (full-parameter, the LoRA loop, 33 T5 rows with a
pad bias), then FLUX.1-dev/ and FLUX.1-schnell/ (the same weights without the guidance embedder).
About an hour on one CPU core (bench/RESULTS.md); the same command uses a GPU when there is one.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from flux.loading import FluxModels, default_device
from flux.variants import VARIANTS
from toys.mini.clip_training import train_clip
from toys.mini.spec import DEFAULT_DIR, MiniSpec
from toys.mini.text import build_text_encoders, build_tokenizers
from toys.mini.transformer_training import (
    adaln_zero,
    build_transformer,
    schnell_from_dev,
    train_transformer,
    training_samples,
)
from toys.mini.vae_gate import train_checked_vae
from toys.mini.vae_training import build_vae, set_latent_normalisation
from toys.shapes import generate_dataset, held_out_pairs
from toys.tiny import SCHEDULERS

log = logging.getLogger(__name__)


def keep_freed_memory() -> None:
    """glibc returns buffers above 32 MB to the OS on free and maps them afresh (page faults and
    zeroing) on the next step; a batch's attention scores at 768 tokens are that large, and this
    made CPU training ~8x slower. Raise both thresholds so freed memory is reused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        pass  # not glibc: nothing to tune


def build_flux_mini(output_dir: Path = DEFAULT_DIR, spec: MiniSpec | None = None) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    spec = spec or MiniSpec()

    keep_freed_memory()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    device = default_device()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log.info("stage %s done in %.0f s", name, timings[name])

    world = dict(exclude=held_out_pairs(spec.held_out_seed), two_tone=spec.two_tone)
    examples = generate_dataset(spec.images, seed=spec.seed, size=spec.image_size, **world)
    examples += generate_dataset(spec.small_images, seed=spec.seed + 100, size=spec.small_side, **world)
    images, captions = [e.image for e in examples], [e.caption for e in examples]
    lap("dataset")

    vae_examples = generate_dataset(
        spec.vae_images, seed=spec.seed + 200, size=spec.image_size, two_tone=spec.two_tone
    )
    vae = build_vae(spec, spec.seed).to(device)
    vae_losses, round_trip = train_checked_vae(vae, [e.image for e in vae_examples], spec)
    set_latent_normalisation(vae.cpu(), images[: min(256, spec.images)])
    lap("vae")

    clip_tok, t5_tok = build_tokenizers()
    clip, t5 = build_text_encoders(clip_tok, t5_tok, spec.clip_dim, spec.t5_dim, spec.seed, spec.clip_layers)
    clip_accuracy = train_clip(
        clip, clip_tok, captions, [e.attributes for e in examples], spec.clip_steps, spec.seed
    )
    lap("text")
    dev_transformer = build_transformer(spec, guidance_embeds=True, seed=spec.seed + 1)
    models = FluxModels(
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
        text_encoder=clip.to(device),
        text_encoder_2=t5.to(device),
        vae=vae.to(device),
        transformers={"dev": dev_transformer.to(device)},
        scheduler_configs={"dev": dict(FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"]).config)},
        device=device,
        dtype=torch.float32,
    )
    adaln_zero(dev_transformer)
    samples = training_samples(spec, spec.images, spec.small_images)
    run = train_transformer(models, images, captions, samples, spec, VARIANTS["dev"].max_sequence_length)
    lap("transformer")

    output_dir = Path(output_dir)
    shared = dict(
        vae=vae.cpu(),
        text_encoder=clip.cpu(),
        text_encoder_2=t5.cpu(),
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
    )
    dev_transformer = dev_transformer.cpu().eval().requires_grad_(False)
    transformers = {"dev": dev_transformer, "schnell": schnell_from_dev(dev_transformer, spec, spec.seed)}
    for name, transformer in transformers.items():
        pipe = FluxPipeline(
            # fp16 on disk halves the files; loading casts to the runtime dtype (fp32 on CPU).
            transformer=transformer.to(torch.float16),
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name]),
            **shared,
        )
        folder = output_dir / VARIANTS[name].folder
        pipe.save_pretrained(folder, safe_serialization=True)
        log.info("wrote flux-mini %s to %s", name, folder)
    lap("save")
    info = dict(
        spec={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()},
        seconds=timings,
        total_seconds=round(time.perf_counter() - started, 1),
        device=str(device),
        vae_final_mse=round(sum(vae_losses[-50:]) / len(vae_losses[-50:]), 5),
        clip_accuracy=clip_accuracy,
        vae_round_trip=None if round_trip is None else dataclasses.asdict(round_trip),
        transformer_final_loss=round(sum(run.losses[-50:]) / len(run.losses[-50:]), 4),
        transformer_loss_curve=loss_curve(run.losses, spec.batch),
        transformer_parameters=sum(p.numel() for p in dev_transformer.parameters()),
        held_out_pairs=sorted(held_out_pairs(spec.held_out_seed)),
    )
    (output_dir / "build_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log.info("flux-mini built in %.0f s: %s", info["total_seconds"], output_dir)
    return output_dir


def loss_curve(losses: list[float], batch: int, points: int = 20) -> list[dict]:
    """The mean loss over each of `points` equal stretches of training, against samples seen."""
    every = max(1, len(losses) // points)
    return [
        {"samples": (i + every) * batch, "loss": round(sum(losses[i : i + every]) / every, 4)}
        for i in range(0, len(losses) - every + 1, every)
    ]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=MiniSpec.seed)
    parser.add_argument("--steps", type=int, default=MiniSpec.steps, help="transformer training steps")
    parser.add_argument("--images", type=int, default=MiniSpec.images, help="training images at 256 px")
    parser.add_argument("--small-images", type=int, default=MiniSpec.small_images, help="at small_side")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: with two threads a step collapses to a fraction of its "
        "speed as soon as another process holds a core, see bench/RESULTS.md)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = MiniSpec(
        seed=args.seed,
        steps=args.steps,
        images=args.images,
        small_images=args.small_images,
    )
    print(build_flux_mini(args.output_dir, spec))


if __name__ == "__main__":
    main()
