"""One training job end to end: zip in, weights tar out (and optionally a Hugging Face repo).

Order, cheapest checks first: the layer regex against the loaded transformer, the dataset, then the
cache, the loop, previews, export and push. Temporary files (extracted images, the latent cache, the
staging folder) live in one work folder that is removed however the job ends, cancellation included;
the base transformer is left without the adapter and the encoders back on their device.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import traceback
from pathlib import Path

import torch

from errors import UserInputError
from flux.loading import FluxModels, load_flux
from flux.variants import get_variant
from training.autocaption import autocaption_dataset
from training.buckets import assign_buckets
from training.cache import build_cache, move_encoders
from training.config import TrainingConfig
from training.continuation import (
    check_state_fits,
    load_starting_lora,
    load_training_state,
    report_differences,
)
from training.dataset import load_training_zip, replace_trigger
from training.export import TAR_NAME, lora_metadata, save_lora_file, write_tar, write_training_folder
from training.hub import model_card, push_to_hub
from training.loop import EMA_DECAY, StepCallback, StepReport, lora_adapter, lora_state_dict, train_lora
from training.previews import PreviewSettings, generate_samples, render_previews
from training.processes import SINGLE, Processes, process_count, run_processes
from training.recipe import select_lora_targets
from training.tracking import WandbSettings, WandbTracker
from training.training_state import STATE_FILE, write_state
from weights.lora_cache import LoraCache, default_lora_cache
from weights.owned_folders import OwnedFolder, remove_abandoned

log = logging.getLogger(__name__)

# Images far larger than the largest bucket are downscaled at decode time to bound host memory;
# 2 x R^2 pixels still fit every bucket up to R without upscaling.
KEEP_PIXELS_FACTOR = 2
TRAINING_WORK_PREFIX = "lora-train-"
DEFAULT_PREVIEWS = PreviewSettings()
DEFAULT_WANDB = WandbSettings()


def run_training(
    config: TrainingConfig,
    zip_path: Path,
    output_dir: Path,
    *,
    hf_token: str | None = None,
    models: FluxModels | None = None,
    previews: PreviewSettings = DEFAULT_PREVIEWS,
    log_every: int | None = None,
    wandb_api_key: str | None = None,
    wandb: WandbSettings = DEFAULT_WANDB,
    continue_from_lora: str | None = None,
    lora_cache: LoraCache | None = None,
    processes: Processes = SINGLE,
    shared_folder: Path | None = None,
) -> Path | None:
    """Train a LoRA on FLUX.1 dev from the user's zip; return the weights tar in output_dir.

    models: already loaded models to reuse (tests, notebooks); None loads dev and frees it after, and
    on a machine with several GPUs (or FLUX_TRAIN_PROCESSES) trains on one process per GPU.
    wandb_api_key: log the run to Weights & Biases with the `wandb` settings (samples use `previews`').
    continue_from_lora: start from this LoRA (any reference lora_weights takes; fetched through
    `lora_cache`, the default cache when None) instead of a fresh one.
    processes, shared_folder: set by the process launcher for each of several processes (the folder
    their latent cache is shared in); only the main process writes outputs and returns the tar.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not processes.several:
        remove_abandoned(TRAINING_WORK_PREFIX)  # left by trainings that were killed (no `finally` ran)
    if models is None and not processes.several and (count := process_count()) > 1:
        return _train_on_processes(
            count,
            dict(
                config=config,
                zip_path=zip_path,
                output_dir=output_dir,
                hf_token=hf_token,
                previews=previews,
                log_every=log_every,
                wandb_api_key=wandb_api_key,
                wandb=wandb,
                continue_from_lora=continue_from_lora,
                lora_cache=lora_cache,
            ),
        )
    own_models = models is None
    # Several processes work in the folder the launcher owns: it goes however they end (killed included).
    workspace = None if processes.several else OwnedFolder(TRAINING_WORK_PREFIX)
    work = workspace.path if workspace else Path(shared_folder) / f"rank-{processes.rank}"
    work.mkdir(exist_ok=True)
    encoders_moved = False
    tracker = None
    try:
        if models is None:  # training never uses the fp8/compiled path
            models = load_flux(("dev",), device=processes.device(), fast=False, training=True)
        variant = get_variant(config.base_model)
        transformer = models.transformer_for(variant)
        targets = select_lora_targets(transformer, config.layers_to_optimize_regex)
        start, resume = None, None
        if continue_from_lora:
            cache = lora_cache or default_lora_cache()
            start = load_starting_lora(continue_from_lora, transformer, cache, hf_token)
            resume = load_training_state(continue_from_lora, cache, hf_token, config)
            report_differences(start, config.lora_rank, targets, config.trigger_word)
            targets = start.targets
            config = dataclasses.replace(config, lora_rank=start.rank)  # what config.json and the tar say
        log.info("LoRA on %d linear layers", len(targets))

        max_side = max(config.resolutions)
        examples, report = load_training_zip(
            zip_path, work, config.trigger_word, keep_pixels=KEEP_PIXELS_FACTOR * max_side * max_side
        )
        if config.autocaption:
            # The captioner is loaded only if an image lacks a .txt, and leaves the device before training.
            # With several processes the main one captions and the others take its captions: every
            # process must number the same captions the same way (their cache is shared).
            if processes.main:
                examples = autocaption_dataset(
                    examples,
                    config.trigger_word,
                    config.autocaption_prefix,
                    config.autocaption_suffix,
                    models.device,
                )
            examples = processes.same_captions(examples)
        captions = [(e.source, e.caption) for e in examples]
        samples = assign_buckets(
            [e.image.size for e in examples], config.resolutions, [e.source for e in examples]
        )
        if not samples:
            raise UserInputError("input_images", Path(zip_path).name, "images of at least 16x16 pixels")
        cache = build_cache(
            models,
            [e.image for e in examples],
            [e.caption for e in examples],
            samples,
            variant.max_sequence_length,
            _cache_folder(config, work, processes, shared_folder),
            preserved_captions=[
                [
                    replace_trigger(e.caption, config.trigger_word, word)
                    for word in config.preservation_classes
                ]
                for e in examples
            ]
            if config.preservation_classes
            else None,
            dropout_caption=config.trigger_word,
            processes=processes,
        )
        if processes.several and not config.cache_latents_to_disk:
            cache = cache.in_memory()  # shared through a folder, read from memory as with one process
        del examples  # the decoded images are in the cache now
        move_encoders(models, "cpu")
        encoders_moved = True

        staging = work / "trained_model"
        if wandb_api_key and processes.main:
            tracker = WandbTracker(wandb_api_key, wandb, config.to_json(), work)
        with lora_adapter(
            transformer, config.lora_rank, targets, config.seed, start=start.lora if start else None
        ):
            check_state_fits(resume, transformer)
            result = train_lora(
                transformer,
                cache,
                samples,
                config,
                models.scheduler_configs[variant.name],
                log_every=log_every,
                on_step=_tracking_steps(tracker, models, transformer, config, previews) if tracker else None,
                resume=resume,
                keep_state=config.save_training_state,
                processes=processes,
            )
            if not processes.main:
                return None  # the main process writes the outputs
            if tracker is not None:
                tracker.finish()  # before the work folder (the run's files) goes
            move_encoders(models, models.device)
            encoders_moved = False
            preview_files = render_previews(models, config.trigger_word, staging / "previews", previews)

        config_json = {
            **config.to_json(),
            "training": {
                "optimizer_used": result.optimizer,
                "ema_decay": EMA_DECAY,
                "gradient_checkpointing_used": result.gradient_checkpointing,
                "lora_layers": len(result.target_modules),
                "samples": len(samples),
                "images_used": report.images_used,
                "captions_from_txt": report.captions_from_txt,
                "first_loss": result.losses[0] if result.losses else None,
                "final_loss": result.losses[-1] if result.losses else None,
                "seconds": round(result.seconds, 1),
                "processes": processes.size,
                "global_batch": config.batch_size * processes.size,
                "optimizer_steps": len(result.losses),
            },
        }
        write_training_folder(
            staging,
            lora_state=result.lora_state,
            metadata=lora_metadata(
                config,
                result.target_modules,
                len(result.losses) * processes.size,  # in one-process steps, as `steps` counts them
                rank_pattern=start.rank_pattern if start else None,
                continued_from=(start.source, start.earlier_steps) if start else None,
            ),
            config_json=config_json,
            captions=captions,
            losses=result.losses,
        )
        if result.state is not None:
            result.state.config = config_json
            write_state(result.state, staging / STATE_FILE)
        relative_previews = [(p.relative_to(staging).as_posix(), prompt) for p, prompt in preview_files]
        if config.hf_repo_id:
            (staging / "README.md").write_text(model_card(config, relative_previews), encoding="utf-8")
        tar_path = write_tar(staging, output_dir / TAR_NAME)
        if config.hf_repo_id and hf_token:
            push_to_hub(staging, config.hf_repo_id, hf_token)
        return tar_path
    except BaseException as error:  # Cog's CancelationException is a BaseException
        # The traceback keeps every frame it passed through alive, and with them the optimizer state,
        # the LoRA and the activations, until the caller drops the exception (for Cog: after the
        # cancel is reported). Clearing those frames now lets the cleanup below really free them.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if tracker is not None:
            tracker.finish()
        if encoders_moved and models is not None:
            move_encoders(models, models.device)
        if workspace is not None:
            workspace.release()
        if own_models:
            del models
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _cache_folder(
    config: TrainingConfig, work: Path, processes: Processes, shared_folder: Path | None
) -> Path | None:
    """Where the latent cache lives: in memory (None) unless asked for on disk; with several processes
    in the folder they share (each writes its share there; read back into memory unless on disk)."""
    if processes.several:
        return Path(shared_folder) / "cache"
    return work / "cache" if config.cache_latents_to_disk else None


def _train_on_processes(count: int, arguments: dict) -> Path:
    """run_training on `count` new processes (one per GPU); the main one writes the tar."""
    shared = OwnedFolder(TRAINING_WORK_PREFIX)
    try:
        run_processes(count, _process_training, shared_folder=shared.path, **arguments)
    finally:
        shared.release()
    tar_path = Path(arguments["output_dir"]) / TAR_NAME
    if not tar_path.is_file():
        raise RuntimeError(f"the training processes finished without writing {tar_path}")
    return tar_path


def _process_training(processes: Processes, **arguments) -> None:
    """What each training process runs (importable by name: the processes are spawned)."""
    run_training(processes=processes, **arguments)


def _tracking_steps(
    tracker: WandbTracker,
    models: FluxModels,
    transformer: torch.nn.Module,
    config: TrainingConfig,
    previews: PreviewSettings,
) -> StepCallback:
    """What W&B gets after each step: loss and rate; at the intervals, samples and the LoRA, both from
    the EMA weights (what the training will save). A failed sample is logged, never the training's end."""
    targets = None

    def on_step(report: StepReport) -> None:
        nonlocal targets
        tracker.log_step(report.step, report.loss, report.learning_rate)
        if tracker.wants_samples(report.step, report.steps):
            try:
                with report.averaged_weights():
                    move_encoders(models, models.device)
                    try:
                        images = list(
                            generate_samples(models, list(tracker.settings.sample_prompts), previews)
                        )
                    finally:
                        move_encoders(models, "cpu")
                tracker.log_samples(report.step, images)
            except Exception:
                log.exception("W&B samples at step %d failed; the training goes on", report.step)
        if tracker.wants_weights(report.step, report.steps):
            with report.averaged_weights():
                state = lora_state_dict(transformer)
            targets = targets or sorted(
                {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state}
            )
            try:
                path = tracker.weights_file(report.step)
                tracker.save_weights(save_lora_file(state, path, lora_metadata(config, targets, report.step)))
            except Exception:  # the run's folder (disk full, removed): W&B loses a file, not the training
                log.exception("saving the LoRA of step %d to W&B failed; the training goes on", report.step)

    return on_step
