"""The FLUX.1 training loop: cached latents and embeddings in, trained LoRA (or full) weights out.

Reads top to bottom: add the adapter (fp32 LoRA parameters on the frozen base), choose memory
savers, then per step: draw a batch from one bucket, noise it at sigmoid-normal timesteps (shifted by
image size only when asked), predict the
velocity, MSE (plus, with diff_output_preservation_class, the pull towards the base's prediction on the
class-word captions), clip gradients at 1.0, step, update the exponential moving average (EMA) of the LoRA.
Constant learning rate (what the public trainers ship). The saved LoRA is the EMA (decay 0.99, as the
public trainer keeps): it averages out the last ~100 steps' noise. diffusers' EMAModel warms the decay
up as (1 + n) / (10 + n), so a short training is not dragged back to its untrained start.
Everything random comes from generators seeded with config.seed, so the same inputs give the same
LoRA bytes on the same device.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from flux.attention import configure_attention_backends
from lora.formats import CanonicalLora
from training.buckets import Sample, epoch_batches
from training.cache import TrainingCache
from training.config import TrainingConfig
from training.memory import activation_scale, needs_checkpointing, step_memory_gib
from training.optimizer_trial import checked_optimizer
from training.optimizers import build_optimizer
from training.precision import forward_precision, keep_lora_inputs_in_base_dtype
from training.processes import SINGLE, Processes
from training.recipe import (
    TRAINING_GUIDANCE,
    flow_matching_loss,
    lora_config,
    preservation_loss,
    sample_shifted_timesteps,
    sample_timesteps,
)
from training.training_state import LoopState

log = logging.getLogger(__name__)

ADAPTER_NAME = "trained"
MAX_GRAD_NORM = 1.0
LOSS_SMOOTHING = 0.9  # exponential moving average of the logged loss
# (batch, image tokens, scheduler config, generator) -> t in (0, 1) per sample, like sample_timesteps.
TimestepSampler = Callable[[int, int, dict, torch.Generator], torch.Tensor]
EMA_DECAY = 0.99


@dataclass(frozen=True)
class StepReport:
    """What an on_step callback (experiment tracking) sees after each optimizer step."""

    step: int
    steps: int  # the last step
    loss: float
    learning_rate: float
    # Inside `with report.averaged_weights():` the parameters hold the EMA (what will be saved), and a
    # forward (a sample image) runs at the loop's precision: peft's input cast is off during the loop.
    averaged_weights: Callable[[], AbstractContextManager]


StepCallback = Callable[[StepReport], None]


@dataclass
class TrainingResult:
    lora_state: dict[str, torch.Tensor]  # PEFT keys with the `transformer.` prefix, fp16, on the CPU
    target_modules: list[str]
    losses: list[float]  # one per step
    optimizer: str  # the optimizer really used (after any fallback)
    gradient_checkpointing: bool
    seconds: float
    state: LoopState | None = None  # with keep_state: what continues this training exactly


@contextmanager
def lora_adapter(
    transformer: torch.nn.Module, rank: int, targets: list[str], seed: int, start: CanonicalLora | None = None
) -> Iterator[None]:
    """Add a LoRA (fp32 parameters) to the transformer; remove it completely after. Fresh (seeded
    init) without `start`; else `start`'s weights, rank and layers (training.continuation)."""
    torch.manual_seed(seed)  # peft initialises lora_A from the global generator
    if start is not None:
        ranks = {name: update.rank for name, update in start.items()}
        targets = sorted(start)
        rank_pattern = {name: r for name, r in ranks.items() if r != rank}
        transformer.add_adapter(lora_config(rank, targets, rank_pattern), adapter_name=ADAPTER_NAME)
    else:
        transformer.add_adapter(lora_config(rank, targets), adapter_name=ADAPTER_NAME)
    try:
        if start is not None:
            _load_updates(transformer, start)
        for param in lora_parameters(transformer):
            # fp32 LoRA weights on a bf16 base: updates of 1e-4 relative size vanish in bf16.
            param.data = param.data.float()
            param.requires_grad_(True)
        yield
    finally:
        transformer.unload_lora()  # swaps the peft wrappers back for the original, untouched Linears
        transformer.requires_grad_(False).eval()


def _load_updates(transformer: torch.nn.Module, start: CanonicalLora) -> None:
    """Put each update into the adapter's lora_A / lora_B, its alpha / rank folded into lora_B (the
    adapter runs at alpha = rank), so the adapter computes exactly the file's delta_W at scale 1."""
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, update in start.items():
            module = modules[name]
            down = module.lora_A[ADAPTER_NAME].weight
            up = module.lora_B[ADAPTER_NAME].weight
            down.copy_(update.down.to(down.device, torch.float32))
            up.copy_(update.up.to(up.device, torch.float32) * (update.alpha / update.rank))


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_parameter_names(transformer: torch.nn.Module) -> list[str]:
    return [n for n, _ in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained LoRA as a diffusers/PEFT file expects it: `transformer.<module>.lora_A.weight`, fp16."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {f"transformer.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}


def train_lora(
    transformer: torch.nn.Module,
    cache: TrainingCache,
    samples: list[Sample],
    config: TrainingConfig,
    scheduler_config: dict,
    *,
    log_every: int | None = None,
    on_step: StepCallback | None = None,
    resume: LoopState | None = None,
    keep_state: bool = False,
    processes: Processes = SINGLE,
) -> TrainingResult:
    """Run config.steps optimizer steps on a transformer that already carries the adapter; the
    adapter then holds the EMA of its weights, which is also what lora_state is. resume: go on from
    an earlier training's state (training.training_state); keep_state: return this one's.
    processes: with several (training.processes), config.steps counts one-process steps: each runs
    its share of ceil(steps / N) optimizer steps of N x batch_size samples."""
    params = lora_parameters(transformer)
    if not params:
        raise RuntimeError("the transformer carries no LoRA parameters; use lora_adapter() first")
    run = train_parameters(
        transformer,
        params,
        cache,
        samples,
        config,
        scheduler_config,
        log_every=log_every,
        what=f"{len(params)} LoRA tensors (rank {config.lora_rank})",
        ema_decay=EMA_DECAY,
        on_step=on_step,
        timesteps=sample_shifted_timesteps if config.shift_timesteps_by_resolution else sample_timesteps,
        names=lora_parameter_names(transformer),
        resume=resume,
        keep_state=keep_state,
        processes=processes,
    )
    return TrainingResult(
        lora_state=lora_state_dict(transformer),
        target_modules=[
            n.removesuffix(".lora_A") for n, _ in transformer.named_modules() if n.endswith(".lora_A")
        ],
        losses=run.losses,
        optimizer=run.optimizer,
        gradient_checkpointing=run.gradient_checkpointing,
        seconds=run.seconds,
        state=run.state,
    )


@dataclass
class LoopResult:
    losses: list[float]  # one per step
    optimizer: str  # the optimizer really used (after any fallback)
    gradient_checkpointing: bool
    seconds: float
    state: LoopState | None = None


def train_parameters(
    transformer: torch.nn.Module,
    params: list[torch.nn.Parameter],
    cache: TrainingCache,
    samples: list[Sample],
    config: TrainingConfig,
    scheduler_config: dict,
    *,
    log_every: int | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    timesteps: TimestepSampler = sample_timesteps,
    what: str = "transformer parameters",
    ema_decay: float | None = None,
    on_step: StepCallback | None = None,
    names: list[str] | None = None,
    resume: LoopState | None = None,
    keep_state: bool = False,
    processes: Processes = SINGLE,
) -> LoopResult:
    """The flow-matching loop itself, for whichever parameters are given: a LoRA's (train_lora) or
    every transformer weight (flux-mini's full-parameter training). lr_schedule(step) multiplies
    config.learning_rate; None keeps it constant, as LoRA training does. timesteps draws each
    batch's noise levels: the recipe's by default; a model trained from scratch needs more draws at
    the highest noise, where only the text says what to draw (toys.mini.transformer_training).
    ema_decay: keep an EMA of params and leave it in them at the end (None: the last step's weights).
    names: the params' names, for resume and keep_state (training.training_state): resume runs
    steps resume.step + 1 .. resume.step + config.steps exactly as one longer training would.
    processes: several split each global batch (batch_size per process); every process draws the
    whole batch's samples, noise and timesteps from the same generators and keeps its rows, so N
    processes compute what one process with N x batch_size would, and DistributedDataParallel
    averages the gradients."""
    configure_attention_backends()  # before the first backward: cuDNN attention faults there
    device = next(transformer.parameters()).device
    checkpointing = _use_checkpointing(config, device, samples, transformer)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer, optimizer_used = build_optimizer(config.optimizer, params, config.learning_rate, device)
    # One step on the device first, so an optimizer that cannot run here costs a warning, not the run.
    optimizer, optimizer_used = checked_optimizer(
        optimizer, optimizer_used, params, config.learning_rate, device
    )
    # After the trial step, which restores the parameters: the average starts from the untrained LoRA.
    ema = _ExponentialAverage(params, ema_decay) if ema_decay is not None else None
    guidance = TRAINING_GUIDANCE if transformer.config.guidance_embeds else None
    generator = torch.Generator("cpu").manual_seed(config.seed)  # CPU draws: same noise on every device
    model = _data_parallel(transformer, processes, device)  # the forward that syncs the gradients
    global_batch = config.batch_size * processes.size
    steps = math.ceil(config.steps / processes.size)  # config.steps counts one-process steps
    batches = _batches(samples, global_batch, random.Random(config.seed))
    first = 1
    if resume is not None:
        _restore(resume, params, names or [], optimizer, ema, generator)
        for _ in range(resume.step):  # the batch order depends on the seed alone: replay it
            next(batches)
        first = resume.step + 1
        log.info("continuing exactly from step %d", resume.step)
    last = first + steps - 1
    log_every = log_every or max(1, min(25, steps // 20))
    log.info(
        "training %s (%.2fM parameters) for %d steps, batch %d, optimizer %s, lr %g",
        what,
        sum(p.numel() for p in params) / 1e6,
        steps,
        global_batch,
        optimizer_used,
        config.learning_rate,
    )
    if processes.several:
        log.info(
            "%d processes: global batch %d (%d per process), %d optimizer steps for steps=%d",
            processes.size,
            global_batch,
            config.batch_size,
            steps,
            config.steps,
        )

    losses: list[float] = []
    smoothed = 0.0
    started = last_log = time.perf_counter()
    transformer.train()
    restore_lora_input_cast = keep_lora_inputs_in_base_dtype(transformer)  # see training/precision.py
    try:
        for step in range(first, last + 1):
            if lr_schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate * lr_schedule(step)
            batch = next(batches)
            latents, prompts, pooled = _load_batch(
                batch, cache, samples, config.caption_dropout_rate, generator
            )
            noise = torch.randn(latents.shape, generator=generator)
            seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
            t = timesteps(len(batch), seq_len, scheduler_config, generator)
            rows = _rows(processes, len(batch), config.batch_size)
            latents, noise, t, prompts, pooled = _take(rows, latents, noise, t, prompts, pooled)
            with forward_precision(transformer):  # bf16 math on a bf16 base; see training/precision.py
                loss = flow_matching_loss(
                    model, latents.to(device), noise.to(device), t, prompts, pooled, guidance
                )
            value = processes.average(loss_value(loss, step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cache.preserved_captions_of_sample is not None:
                # Its own forward and backward after the first's: one graph alive at a time.
                kept_prompts, kept_pooled = _load_texts(_class_captions(batch, cache, generator), cache)
                kept_prompts, kept_pooled = _take(rows, kept_prompts, kept_pooled)
                with forward_precision(transformer):
                    kept = preservation_loss(model, latents, noise, t, kept_prompts, kept_pooled, guidance)
                loss_value(kept, step)  # a non-finite term stops the run before it reaches the weights
                (config.diff_output_preservation_multiplier * kept).backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            if ema is not None:
                ema.update()

            losses.append(value)
            smoothed = LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * losses[-1]
            if step % log_every == 0 or step == last:
                now = time.perf_counter()
                per_step = (now - last_log) / (log_every if step % log_every == 0 else step % log_every)
                last_log = now
                log.info(
                    "step %d/%d | loss %.3f | lr %.1e | %.2f s/step | eta %s",
                    step,
                    last,
                    smoothed / (1 - LOSS_SMOOTHING ** (step - first + 1)),  # bias-corrected average
                    optimizer.param_groups[0]["lr"],
                    per_step,
                    _duration(per_step * (last - step)),
                )
            if on_step is not None:
                report = StepReport(
                    step=step,
                    steps=last,
                    loss=losses[-1],
                    learning_rate=optimizer.param_groups[0]["lr"],
                    averaged_weights=lambda: _for_inference(transformer, ema),
                )
                on_step(report)
        state = _capture(last, params, names or [], optimizer, ema, generator) if keep_state else None
        if ema is not None:
            ema.copy_into_params()
    finally:
        restore_lora_input_cast()
        transformer.eval()
        if checkpointing:
            transformer.disable_gradient_checkpointing()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    log.info("trained %d steps in %s (%.2f steps/s)", steps, _duration(seconds), steps / seconds)
    return LoopResult(
        losses=losses,
        optimizer=optimizer_used,
        gradient_checkpointing=checkpointing,
        seconds=seconds,
        state=state,
    )


def _capture(step, params, names, optimizer, ema, generator) -> LoopState:
    """The loop's state after `step`: raw weights (before the EMA is copied in), average, optimizer, generator."""
    return LoopState(
        step=step,
        params={n: p.detach().to("cpu", copy=True) for n, p in zip(names, params, strict=True)},
        ema=None
        if ema is None
        else {n: t.detach().to("cpu", copy=True) for n, t in zip(names, ema.ema.shadow_params, strict=True)},
        ema_step=0 if ema is None else ema.ema.optimization_step,
        optimizer=optimizer.state_dict(),
        generator=generator.get_state(),
    )


def _restore(state: LoopState, params, names, optimizer, ema, generator) -> None:
    if sorted(state.params) != sorted(names):
        raise ValueError("the training state is of another LoRA (its layers or rank differ)")
    with torch.no_grad():
        for name, param in zip(names, params, strict=True):
            param.copy_(state.params[name].to(param.device, param.dtype))
    optimizer.load_state_dict(state.optimizer)
    if ema is not None and state.ema is not None:
        ema.ema.shadow_params = [
            state.ema[n].to(p.device, p.dtype) for n, p in zip(names, params, strict=True)
        ]
        ema.ema.optimization_step = state.ema_step
    generator.set_state(state.generator)


@contextmanager
def _for_inference(transformer: torch.nn.Module, ema: _ExponentialAverage | None) -> Iterator[None]:
    with ema.swapped_in() if ema is not None else nullcontext(), forward_precision(transformer):
        yield


class _ExponentialAverage:
    """diffusers' EMAModel over a parameter list, with the two ways the loop hands its weights out."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.ema = EMAModel(params, decay=decay, foreach=True)

    def update(self) -> None:
        self.ema.step(self.params)

    def copy_into_params(self) -> None:
        self.ema.copy_to(self.params)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        # A copy on the parameters' own device (EMAModel.store would go through the CPU each time).
        trained = [p.detach().clone() for p in self.params]
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, trained, strict=True):
                    param.copy_(value)


def loss_value(loss: torch.Tensor, step: int) -> float:
    """The loss as a number for the log, refusing a non-finite one before it reaches the weights.
    The one place the loop reads a value back from the device: on `meta` (the tests' stand-in for an
    accelerator: it checks devices but holds no values) the number is unknown, NaN, and not checked."""
    if loss.is_meta:
        return math.nan
    value = loss.item()
    if not math.isfinite(value):
        raise RuntimeError(f"the loss became {value} at step {step}; lower learning_rate")
    return value


def _data_parallel(
    transformer: torch.nn.Module, processes: Processes, device: torch.device
) -> torch.nn.Module:
    """What the loop calls forward on: the transformer itself, or with several processes its
    DistributedDataParallel wrapper, whose backward averages the LoRA gradients over the processes."""
    if not processes.several:
        return transformer
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(transformer, device_ids=[device.index] if device.type == "cuda" else None)


def _rows(processes: Processes, length: int, per_process: int) -> list[int] | None:
    """This process's rows of a global batch of `length` (None: all of them, one process). A bucket's
    remainder shorter than the global batch is filled from its own start, so every process has
    `per_process` rows (DistributedDataParallel averages equal shares)."""
    if not processes.several:
        return None
    return [(processes.rank * per_process + i) % length for i in range(per_process)]


def _take(rows: list[int] | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tensors if rows is None else tuple(tensor[rows] for tensor in tensors)


def _batches(samples: list[Sample], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Sample numbers, batch by batch, epoch after epoch."""
    number_of = {id(s): i for i, s in enumerate(samples)}
    while True:
        for batch in epoch_batches(samples, batch_size, rng):
            yield [number_of[id(s)] for s in batch]


def _load_batch(
    batch: list[int], cache: TrainingCache, samples: list[Sample], dropout: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    latents = torch.stack([cache.latents.get(str(number))["latents"] for number in batch])
    drops = torch.rand(len(batch), generator=generator) < dropout
    captions = [
        cache.dropout_caption if drop else cache.caption_of_sample[number]
        for number, drop in zip(batch, drops.tolist(), strict=True)
    ]
    return latents, *_load_texts(captions, cache)


def _class_captions(batch: list[int], cache: TrainingCache, generator: torch.Generator) -> list[int]:
    """For each sample, the caption number of its caption with one of the class words (drawn at
    random when there are several, so each class word gets about the same share of the steps)."""
    choices = [cache.preserved_captions_of_sample[number] for number in batch]
    words = len(choices[0])  # every sample has one caption per class word
    if words == 1:
        return [c[0] for c in choices]
    picks = torch.randint(words, (len(batch),), generator=generator).tolist()
    return [c[pick] for c, pick in zip(choices, picks, strict=True)]


def _load_texts(numbers: list[int], cache: TrainingCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The T5 and pooled CLIP embeddings of captions by number."""
    texts = [cache.texts.get(str(n)) for n in numbers]
    return torch.stack([t["prompt"] for t in texts]), torch.stack([t["pooled"] for t in texts])


def _use_checkpointing(
    config: TrainingConfig, device: torch.device, samples: list[Sample], transformer: torch.nn.Module
) -> bool:
    if config.gradient_checkpointing:
        log.info("gradient checkpointing on (requested)")
        return True
    if device.type != "cuda":
        return False
    # Free to this process: what the driver has free plus what torch's allocator holds unused.
    free_bytes = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    free_gib = (free_bytes - torch.cuda.memory_allocated(device)) / 2**30
    megapixels = max(s.width * s.height for s in samples) / 1e6
    scale = activation_scale(transformer.config)
    needed_gib = step_memory_gib(megapixels, config.batch_size, scale)
    if needs_checkpointing(free_gib, megapixels, config.batch_size, scale):
        log.warning(
            "gradient checkpointing switched on: %.1f GiB free on the GPU, about %.0f GiB needed without it "
            "(largest bucket %.2f megapixels, batch_size %d)",
            free_gib,
            needed_gib,
            megapixels,
            config.batch_size,
        )
        return True
    log.info("gradient checkpointing off: %.1f GiB free, about %.0f GiB needed", free_gib, needed_gib)
    return False


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
