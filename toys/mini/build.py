"""Train flux-mini from scratch and write it in diffusers layout:

    python -m toys.mini.build [OUTPUT_DIR] [--seed 0] [--set FIELD=VALUE ...] [--workers N]
                              [--encoders-from EARLIER] [--finish-within SECONDS]
                              [--resume EARLIER] [--checkpoint-every N]

Stages: the shapes datasets (256 and 128 px, plain backgrounds, held-out colour/shape pairs left out),
the VAE and its round-trip gate (toys.mini.vae_gate), its latent normalisation, the text encoders
(CLIP trained briefly, T5 random), the transformer in MiniSpec.phases (full-parameter, the LoRA loop,
33 T5 rows with a pad bias, each phase on its own images from the last one's saved weights), then
FLUX.1-dev/ and FLUX.1-schnell/ (the same weights without the guidance embedder). OUTPUT_DIR defaults
to weights/flux-mini. The default spec takes about an hour on one CPU core; the same command uses a GPU
when there is one, and takes minutes there (bench/RESULTS.md). --set changes the spec (recorded in
build_info.json); --workers only how many processes draw the images, never which images.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from flux.loading import FluxModels, default_device
from flux.variants import VARIANTS
from toys.mini.clip_training import train_clip
from toys.mini.dataset import draw_examples
from toys.mini.resume import done_phases, load_build, read_build_info, spec_record
from toys.mini.spec import DEFAULT_DIR, MiniSpec, with_overrides
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
from toys.shapes import held_out_pairs
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


def build_flux_mini(
    output_dir: Path = DEFAULT_DIR,
    spec: MiniSpec | None = None,
    resume: Path | None = None,
    checkpoint_every: int = 0,
    workers: int = 1,
    encoders_from: Path | None = None,
    finish_within: float | None = None,
    retrain_clip: bool = False,
) -> Path:
    """resume: an earlier build of the same spec whose first phases are done: its VAE, text encoders
    and transformer are taken and only the remaining phases run. checkpoint_every: also save the
    transformer's EMA every so many steps under output_dir/checkpoints (bench/flux_mini_curve.py).
    workers: processes that draw the images (the same images whatever the number). encoders_from: an
    earlier build whose VAE and text encoders are taken as they are (a fresh transformer is trained on
    them: the GPU build of issue 13); with retrain_clip, CLIP is trained afresh under this spec (its
    clip_placement) and only the VAE and T5 are taken. finish_within: seconds; the last phase's steps are cut so the
    build ends by then, and the spec recorded is the one run."""
    spec = spec or MiniSpec()
    output_dir = Path(output_dir)
    keep_freed_memory()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    device = default_device()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log.info("stage %s done in %.0f s", name, timings[name])

    if resume is None:
        earlier = None
        first = phase_examples(spec, 0, workers)
        lap("dataset")
        if encoders_from is None:
            vae, clip, t5, clip_tok, t5_tok, report = _encoders(spec, first, device, lap, workers)
        else:
            vae, clip, t5, clip_tok, t5_tok, _ = load_build(Path(encoders_from))
            source = read_build_info(Path(encoders_from))
            report = encoders_report(source)
            report["encoders_from"] = dict(
                folder=str(encoders_from), spec=source["spec"], seconds=source["seconds"]
            )
            if retrain_clip:
                clip, report["clip_accuracy"] = _trained_clip(spec, first, clip_tok, t5_tok)
                report["encoders_from"]["clip"] = "trained afresh by this build (--retrain-clip)"
                lap("text")
        dev_transformer = build_transformer(spec, guidance_embeds=True, seed=spec.seed + 1)
        adaln_zero(dev_transformer)
        if checkpoint_every:
            _save_dev_early(output_dir, vae, clip, t5, clip_tok, t5_tok, dev_transformer)
        phase_runs: list[dict] = []
    else:
        first = None
        earlier = read_build_info(Path(resume))
        phase_runs = done_phases(earlier, spec)
        vae, clip, t5, clip_tok, t5_tok, dev_transformer = load_build(Path(resume))
        report = encoders_report(earlier)
        log.info("resuming %s after %d phase(s)", resume, len(phase_runs))
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
    for index in range(len(phase_runs), len(spec.phases)):
        phase = spec.phases[index]
        examples = first if index == 0 else phase_examples(spec, index, workers)
        samples = training_samples(spec, phase.images, phase.small_images)
        before = sum(run["samples"] for run in phase_runs)  # the earlier phases' samples
        checkpoints = _checkpointer(dev_transformer, output_dir, index, before, spec.batch, checkpoint_every)
        last = index == len(spec.phases) - 1
        finish_by = started + finish_within - SAVE_SECONDS if finish_within and last else None
        run, phase = train_transformer(
            models,
            [e.image for e in examples],
            [e.caption for e in examples],
            samples,
            spec,
            phase,
            seed=spec.seed + index,
            max_sequence_length=VARIANTS["dev"].max_sequence_length,
            on_step=checkpoints,
            finish_by=finish_by,
        )
        spec = dataclasses.replace(spec, phases=(*spec.phases[:index], phase, *spec.phases[index + 1 :]))
        as_saved(dev_transformer)  # what --resume would load: the next phase starts from exactly that
        lap(f"transformer phase {index + 1}")
        phase_runs.append(
            dict(
                phase=index + 1,
                samples=phase.steps * spec.batch,
                seconds=timings[f"transformer phase {index + 1}"],
                final_loss=round(sum(run.losses[-50:]) / len(run.losses[-50:]), 4),
                loss_curve=loss_curve(run.losses, spec.batch, start=before),
            )
        )

    _save(output_dir, vae, clip, t5, clip_tok, t5_tok, dev_transformer, spec)
    lap("save")
    info = dict(
        spec=spec_record(spec),
        seconds=timings,
        total_seconds=round(time.perf_counter() - started, 1),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        torch=torch.__version__,
        **report,
        transformer_phases=phase_runs,
        transformer_parameters=sum(p.numel() for p in dev_transformer.parameters()),
        held_out_pairs=sorted(held_out_pairs(spec.held_out_seed)),
    )
    if earlier is not None:
        info["resumed_from"] = dict(folder=str(resume), seconds=earlier["seconds"])
    (output_dir / "build_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log.info("flux-mini built in %.0f s: %s", info["total_seconds"], output_dir)
    return output_dir


def encoders_report(info: dict) -> dict:
    """What an earlier build's record says of the VAE and text encoders a build takes from it."""
    return {k: info[k] for k in ("vae_final_mse", "clip_accuracy", "vae_round_trip")}


SAVE_SECONDS = 15.0  # kept for writing both variants when a build must finish in time


def _encoders(spec: MiniSpec, first: list, device, lap, workers: int = 1):
    """The VAE (trained and gated, with its latent normalisation) and the text encoders; `first`:
    phase 1's examples, whose captions CLIP learns."""
    vae_examples = draw_examples(
        spec.vae_images, spec.seed + 200, spec.image_size, spec.draw_chunk, workers, two_tone=spec.two_tone
    )
    vae = build_vae(spec, spec.seed).to(device)
    vae_losses, round_trip = train_checked_vae(vae, [e.image for e in vae_examples], spec)
    set_latent_normalisation(vae.cpu(), [e.image for e in first[: min(256, spec.phases[0].images)]])
    lap("vae")
    clip_tok, t5_tok = build_tokenizers()
    _, t5 = build_text_encoders(clip_tok, t5_tok, spec.clip_dim, spec.t5_dim, spec.seed, spec.clip_layers)
    clip, clip_accuracy = _trained_clip(spec, first, clip_tok, t5_tok)
    lap("text")
    report = dict(
        vae_final_mse=round(sum(vae_losses[-50:]) / len(vae_losses[-50:]), 5),
        clip_accuracy=clip_accuracy,
        vae_round_trip=None if round_trip is None else dataclasses.asdict(round_trip),
    )
    return vae, clip, t5, clip_tok, t5_tok, report


def _trained_clip(spec: MiniSpec, first: list, clip_tok, t5_tok):
    """CLIP built under the spec's seed and trained on `first`'s captions; and its probe accuracy."""
    clip, _ = build_text_encoders(clip_tok, t5_tok, spec.clip_dim, spec.t5_dim, spec.seed, spec.clip_layers)
    accuracy = train_clip(
        clip,
        clip_tok,
        [e.caption for e in first],
        [e.attributes for e in first],
        spec.clip_steps,
        spec.seed,
        placement=bool(spec.clip_placement),
    )
    return clip, accuracy


def _save(output_dir: Path, vae, clip, t5, clip_tok, t5_tok, dev_transformer, spec: MiniSpec) -> None:
    """FLUX.1-dev/ and FLUX.1-schnell/ in diffusers layout, sharing the VAE and text encoders."""
    shared = _shared_parts(vae, clip, t5, clip_tok, t5_tok)
    dev_transformer = dev_transformer.cpu().eval().requires_grad_(False)
    transformers = {"dev": dev_transformer, "schnell": schnell_from_dev(dev_transformer, spec, spec.seed)}
    for name, transformer in transformers.items():
        _write_variant(output_dir, name, transformer, shared)
    dev_transformer.to(torch.float32)


def _save_dev_early(output_dir: Path, vae, clip, t5, clip_tok, t5_tok, dev_transformer) -> None:
    """FLUX.1-dev/ with the untrained transformer, written before training: the VAE and text encoders
    are final, so the checkpoints decode while the build runs (bench/flux_mini_curve.py --weights
    OUT). A copy is saved: the fp16 round trip must not touch the weights training starts from."""
    shared = _shared_parts(vae, clip, t5, clip_tok, t5_tok)
    _write_variant(output_dir, "dev", copy.deepcopy(dev_transformer).cpu(), shared)


def _shared_parts(vae, clip, t5, clip_tok, t5_tok) -> dict:
    """The parts both variants share, on the CPU for writing."""
    return dict(
        vae=vae.cpu(),
        text_encoder=clip.cpu(),
        text_encoder_2=t5.cpu(),
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
    )


def _write_variant(output_dir: Path, name: str, transformer, shared: dict) -> None:
    pipe = FluxPipeline(
        # fp16 on disk halves the files; loading casts to the runtime dtype (fp32 on CPU).
        transformer=transformer.to(torch.float16),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name]),
        **shared,
    )
    folder = output_dir / VARIANTS[name].folder
    pipe.save_pretrained(folder, safe_serialization=True)
    _drop_load_paths(folder)
    log.info("wrote flux-mini %s to %s", name, folder)


def _drop_load_paths(folder: Path) -> None:
    """Remove `_name_or_path` from the diffusers configs: a resumed build loaded its VAE and
    transformer from the earlier build, and diffusers would write that folder, a path on the build
    machine, into the committed weights (loading ignores it)."""
    for config_file in folder.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def phase_examples(spec: MiniSpec, index: int, workers: int = 1):
    """Phase `index`'s images: its own draws of the world, at image_size then small_side, held-out
    pairs and sizes not in spec.sizes left out."""
    phase = spec.phases[index]
    seed = spec.seed + 1000 * index
    world = dict(
        exclude=held_out_pairs(spec.held_out_seed),
        two_tone=spec.two_tone,
        sizes=spec.sizes,
        chunk=spec.draw_chunk,
        workers=workers,
    )
    examples = draw_examples(phase.images, seed, spec.image_size, **world)
    return examples + draw_examples(phase.small_images, seed + 100, spec.small_side, **world)


def as_saved(transformer: torch.nn.Module) -> None:
    """Round the weights through fp16, the dtype they are written in."""
    with torch.no_grad():
        for param in transformer.parameters():
            param.copy_(param.to(torch.float16).to(param.dtype))


def _checkpointer(transformer, output_dir: Path, index: int, before: int, batch: int, every: int):
    """An on_step callback that saves the EMA weights (fp16) every `every` steps and at the last."""
    if not every:
        return None
    from safetensors.torch import save_file

    folder = output_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)

    def save(report) -> None:
        if report.step % every and report.step != report.steps:
            return
        with report.averaged_weights():
            state = {k: v.detach().to("cpu", torch.float16) for k, v in transformer.state_dict().items()}
        name = f"phase{index + 1}-samples{before + report.step * batch:07d}.safetensors"
        save_file(state, folder / name)
        log.info("checkpoint %s", name)

    return save


def loss_curve(losses: list[float], batch: int, points: int = 20, start: int = 0) -> list[dict]:
    """The mean loss over each of `points` equal stretches of training, against samples seen (the
    earlier phases' `start` included)."""
    every = max(1, len(losses) // points)
    return [
        {"samples": start + (i + every) * batch, "loss": round(sum(losses[i : i + every]) / every, 4)}
        for i in range(0, len(losses) - every + 1, every)
    ]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=MiniSpec.seed)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a number of the spec: a MiniSpec field (double_blocks=3) or phase.FIELD of the last "
        "transformer phase (phase.steps=8000); recorded in build_info.json",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes drawing the images (never changes which images)"
    )
    parser.add_argument(
        "--encoders-from",
        type=Path,
        help="an earlier build whose VAE and text encoders are used as they are (only a transformer is trained)",
    )
    parser.add_argument(
        "--retrain-clip",
        action="store_true",
        help="with --encoders-from: train CLIP afresh under this spec (e.g. clip_placement=1), keep the VAE and T5",
    )
    parser.add_argument(
        "--finish-within",
        type=float,
        help="seconds: cut the last phase's steps (timed on a throwaway copy) so the build ends in time",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        help="an earlier build of this spec (e.g. weights/flux-mini after phase 1): run only the phases it has not",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save the EMA transformer every N steps (learning curve)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: with two threads a step collapses to a fraction of its "
        "speed as soon as another process holds a core, see bench/RESULTS.md)",
    )
    args = parser.parse_args()
    if args.retrain_clip and not args.encoders_from:
        parser.error("--retrain-clip goes with --encoders-from (a full build trains CLIP anyway)")
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        # TF32 matrix products: fp32 training at tensor-core speed; a build is still one seed's result.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        spec = with_overrides(MiniSpec(seed=args.seed), args.set)
        folder = build_flux_mini(
            args.output_dir,
            spec,
            args.resume,
            args.checkpoint_every,
            args.workers,
            encoders_from=args.encoders_from,
            finish_within=args.finish_within,
            retrain_clip=args.retrain_clip,
        )
        print(folder)
    except ValueError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
