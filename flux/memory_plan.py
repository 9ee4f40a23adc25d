"""Which FLUX.1 components live where, chosen once at setup from the GPU's free memory.

Three plans, tried from the fastest down; the first whose peak fits the free memory is used:

    resident  every component on the GPU in bf16 (80 GB and up: today's behaviour, nothing lost)
    swap      one transformer on the GPU in bf16; another variant waits in host memory and swaps in
              when a request asks for it (48 GB and 40 GB cards; one variant alone is `resident`)
    8bit      one transformer on the GPU with its block Linears stored in 8 bit (fp8 where the GPU has
              fp8 units, else int8; the exact bf16 originals in host memory for LoRA fusing), T5 in
              host memory and moved in for the prompt (24 GB cards)

Training tries `resident` (the bf16 base) and then `8bit`; T5, CLIP and the VAE wait in host memory
and visit the GPU to build the training cache and for the previews' prompts and decoding.

The sizes are FLUX.1's own, counted from its published configs (flux/full_size.py); the activation
headrooms are estimates that the GPU run checks (bench/gpu_memory_plans.py). FLUX_MEMORY_PLAN forces
a plan (`auto`, the default, chooses).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from errors import UserInputError

ENV_PLAN = "FLUX_MEMORY_PLAN"
PLAN_NAMES = ("resident", "swap", "8bit")
GiB = 2**30
# Left free beyond the weights for a request: the transformer's activations for up to 4 images of
# 1440x1440, the VAE decode (one image at a time outside `resident`), the safety checker (a ViT-base,
# 0.2 GB) and the allocator's slack.
INFERENCE_HEADROOM = 6 * GiB
# While T5 encodes a prompt (its activations at 512 tokens are tens of MB).
ENCODE_HEADROOM = 1 * GiB
# A training step with gradient checkpointing at 1 megapixel (3.8 GiB measured, training/memory.py),
# the LoRA and its AdamW state, margin; and the VAE encoding a 1024x1024 sample while caching.
TRAINING_HEADROOM = 8 * GiB
CACHING_HEADROOM = 3 * GiB


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes on the GPU of each FLUX.1 component in bf16, and of a transformer stored in 8 bit."""

    transformer: int
    transformer_8bit: int
    t5: int
    clip: int
    vae: int
    fp8_copies: int  # go_fast's fp8 copies of one transformer's block Linears (flux/fast/targets.py)


@dataclass(frozen=True)
class MemoryPlan:
    name: str  # one of PLAN_NAMES
    variants: tuple[str, ...]
    transformers_on_gpu: int  # at most this many variants' transformers on the GPU at once
    storage: str  # the transformers' block Linears on the GPU: "bf16", "fp8" or "int8"
    t5_on_gpu: bool  # False: T5 waits in host memory and comes in for the prompt
    vae_and_clip_on_gpu: bool  # False (training): they come in for the cache and the previews
    training: bool
    peak_bytes: int  # the estimate the plan was chosen by
    free_bytes: int | None  # what the GPU had free (None: not a GPU)
    host_bytes: int = 0  # host memory the plan keeps (masters, 8-bit originals, T5), LoRA backups aside
    lora_backup_bytes: int = 0  # at most, with LoRAs touching every block Linear of every variant
    go_fast: str = "off"  # what go_fast requests run under this plan, in words (setup confirms it)

    @property
    def eight_bit(self) -> bool:
        return self.storage != "bf16"

    @property
    def swaps(self) -> bool:
        return self.transformers_on_gpu < len(self.variants)

    def describe(self) -> str:
        """The one line setup logs."""
        where = ("both transformers" if len(self.variants) > 1 else "the transformer") + " on the GPU"
        if self.swaps:
            where = f"{self.transformers_on_gpu} transformer on the GPU, the other in host memory (swapped on model change)"
        parts = [
            f"memory plan {self.name}: {where}",
            f"block Linears in {self.storage}"
            + (" (bf16 originals in host memory)" if self.eight_bit else ""),
            "T5 on the GPU" if self.t5_on_gpu else "T5 in host memory, moved in for the prompt",
            *([] if self.vae_and_clip_on_gpu else ["VAE and CLIP in host memory, moved in for their stage"]),
            f"peak about {self.peak_bytes / GiB:.1f} GiB",
            f"host memory about {self.host_bytes / GiB:.0f} GiB"
            + (
                f" (+ up to {self.lora_backup_bytes / GiB:.0f} GiB of LoRA backups)"
                if self.lora_backup_bytes
                else ""
            ),
        ]
        if self.free_bytes is not None:
            parts.append(f"{self.free_bytes / GiB:.1f} GiB free")
        parts.append(f"go_fast: {self.go_fast}")
        return "; ".join(parts)


@functools.cache
def flux_sizes() -> ComponentSizes:
    """FLUX.1's sizes, counted on the meta device (shapes only): bf16 is 2 bytes a parameter; 8-bit
    storage is 1 byte a weight of every block Linear plus a float32 scale a row."""
    from flux.eight_bit import storage_targets
    from flux.fast.targets import planned_fp8_bytes
    from flux.full_size import full_size_module

    def bf16(module) -> int:
        return 2 * sum(p.numel() for p in module.parameters())

    transformer = full_size_module("transformer")
    targets = storage_targets(transformer).values()
    saved = sum(linear.weight.numel() - 4 * linear.out_features for linear in targets)
    return ComponentSizes(
        transformer=bf16(transformer),
        transformer_8bit=bf16(transformer) - saved,
        t5=bf16(full_size_module("t5")),
        clip=bf16(full_size_module("clip")),
        vae=bf16(full_size_module("vae")),
        fp8_copies=planned_fp8_bytes(transformer),
    )


def plan_peak(
    name: str, sizes: ComponentSizes, variants: int, training: bool = False
) -> tuple[int, int, bool]:
    """(peak bytes, transformers on the GPU, T5 on the GPU) of one plan."""
    on_gpu = variants if name == "resident" and not training else 1
    transformer = sizes.transformer_8bit if name == "8bit" else sizes.transformer
    weights = on_gpu * transformer + sizes.clip + sizes.vae
    if training:
        # Caching runs T5 then the VAE with the transformer loaded; the loop runs without encoders.
        caching = max(weights + sizes.t5 + ENCODE_HEADROOM, weights + CACHING_HEADROOM)
        return max(caching, on_gpu * transformer + TRAINING_HEADROOM), on_gpu, False
    if name == "8bit":  # T5 comes in for the prompt, while the transformer stays
        return max(weights + INFERENCE_HEADROOM, weights + sizes.t5 + ENCODE_HEADROOM), on_gpu, False
    return weights + sizes.t5 + INFERENCE_HEADROOM, on_gpu, True


def plan_host(name: str, sizes: ComponentSizes, variants: int, training: bool = False) -> tuple[int, int]:
    """(host bytes the plan keeps, LoRA backup bytes at most) of one plan.

    resident keeps nothing on the host but the LoRA fuser's backups of the weights it touched; swap
    keeps every transformer's bf16 base there, which the fuser restores from; 8bit keeps the bf16
    originals (the fuser's source), the waiting variants' 8-bit codes and T5."""
    if name == "resident":
        return (sizes.t5 if training else 0), (0 if training else variants * sizes.transformer)
    if name == "swap":
        return variants * sizes.transformer, 0
    waiting = variants - 1 if not training else 0
    return variants * sizes.transformer + waiting * sizes.transformer_8bit + sizes.t5, 0


def go_fast_under(
    name: str, sizes: ComponentSizes, variants: int, free: int | None, peak: int, has_fp8: bool
) -> str:
    """What go_fast does under a plan: fp8 copies beside the bf16 weights where they fit with
    flux/fast/path.py's headroom (the rule setup_fast applies, measuring), fp8 products on fp8-stored
    weights under 8bit, else the standard path."""
    from flux.fast.path import HEADROOM_BYTES

    if not has_fp8:
        return "the standard path (no fp8 units)"
    if name == "8bit":
        return "fp8 products on the stored fp8 weights (no copies, not compiled)"
    if name == "swap":
        return "the standard path (no room for fp8 copies beside the bf16 transformer)"
    if free is None:
        return "fp8 copies + compiled blocks where they fit"
    loaded = peak - INFERENCE_HEADROOM  # the weights
    copies = 0
    while copies < variants and free - loaded - (copies + 1) * sizes.fp8_copies >= HEADROOM_BYTES:
        copies += 1
    if copies == 0:
        return "the standard path (no room for fp8 copies)"
    return f"fp8 copies + compiled blocks for {copies} of {variants} variant{'s' if variants > 1 else ''}"


def choose_plan(
    free_bytes: int | None,
    variants: tuple[str, ...],
    training: bool = False,
    has_fp8: bool = False,
    forced: str | None = None,
    sizes: ComponentSizes | None = None,
    go_fast: bool = True,
) -> MemoryPlan:
    """The fastest plan that fits `free_bytes` (None: no GPU, everything `resident` on the device).

    go_fast: whether setup prepares go_fast (FLUX_FAST is not off; training never does); the plan
    says what it will do.

    forced: a plan name (FLUX_MEMORY_PLAN); it is used even if the estimate says it will not fit
    (with a warning from the caller), because the estimate is conservative.
    """
    sizes = sizes or flux_sizes()
    names = _candidates(training) if forced in (None, "auto") else (forced,)
    for name in names:
        peak, on_gpu, t5_on_gpu = plan_peak(name, sizes, len(variants), training)
        if forced in (None, "auto") and free_bytes is not None and peak > free_bytes:
            continue
        host, backups = plan_host(name, sizes, len(variants), training)
        return MemoryPlan(
            name=name,
            variants=tuple(variants),
            transformers_on_gpu=on_gpu,
            storage=("fp8" if has_fp8 else "int8") if name == "8bit" else "bf16",
            t5_on_gpu=t5_on_gpu,
            vae_and_clip_on_gpu=not training,
            training=training,
            peak_bytes=peak,
            free_bytes=free_bytes,
            host_bytes=host,
            lora_backup_bytes=backups,
            go_fast=go_fast_under(name, sizes, len(variants), free_bytes, peak, has_fp8)
            if go_fast and not training
            else "off",
        )
    smallest_peak = min(plan_peak(name, sizes, len(variants), training)[0] for name in names)
    raise NotEnoughMemory(free_bytes or 0, smallest_peak, smallest_gpu(len(variants), training, sizes))


def _candidates(training: bool) -> tuple[str, ...]:
    return ("resident", "8bit") if training else PLAN_NAMES


class NotEnoughMemory(RuntimeError):
    def __init__(self, free_bytes: int, needed_bytes: int, smallest: str):
        super().__init__(
            f"FLUX.1 does not fit this GPU: {free_bytes / GiB:.1f} GiB of its memory is free, and the "
            f"smallest memory plan (8bit: 8-bit transformer, T5 in host memory) needs about "
            f"{needed_bytes / GiB:.1f} GiB; the smallest GPU that works is {smallest}"
        )


# What common GPUs report as total memory (MiB, nvidia-smi), whether they have bf16 and fp8 units.
# The CUDA context and the driver take about 0.5 GiB of that before anything is loaded.
@dataclass(frozen=True)
class Gpu:
    name: str
    total_mib: int
    bf16: bool
    fp8: bool

    @property
    def free_bytes(self) -> int:
        return self.total_mib * 2**20 - CONTEXT_BYTES


CONTEXT_BYTES = GiB // 2
GPUS = (
    Gpu("T4 16 GB", 15360, bf16=False, fp8=False),
    Gpu("A10 24 GB", 23028, bf16=True, fp8=False),
    Gpu("L4 24 GB", 23034, bf16=True, fp8=True),
    Gpu("RTX 4090 24 GB", 24564, bf16=True, fp8=True),
    Gpu("A100 40 GB", 40960, bf16=True, fp8=False),
    Gpu("L40S 48 GB", 46068, bf16=True, fp8=True),
    Gpu("A40 48 GB", 46068, bf16=True, fp8=False),
    Gpu("RTX A6000 48 GB", 49140, bf16=True, fp8=False),
    Gpu("A100 80 GB", 81920, bf16=True, fp8=False),
    Gpu("H100 80 GB", 81559, bf16=True, fp8=True),
    Gpu("H200 141 GB", 143771, bf16=True, fp8=True),
)


def smallest_gpu(variants: int, training: bool, sizes: ComponentSizes | None = None) -> str:
    """The smallest card of GPUS that some plan fits (bf16 units needed: FLUX.1 computes in bf16)."""
    sizes = sizes or flux_sizes()
    for gpu in sorted(GPUS, key=lambda g: g.total_mib):
        if not gpu.bf16:
            continue
        fits = any(
            plan_peak(name, sizes, variants, training)[0] <= gpu.free_bytes for name in _candidates(training)
        )
        if fits:
            return gpu.name
    return GPUS[-1].name


def forced_plan() -> str | None:
    """FLUX_MEMORY_PLAN: auto (default) or a plan name."""
    value = os.environ.get(ENV_PLAN, "auto").strip().lower() or "auto"
    if value != "auto" and value not in PLAN_NAMES:
        raise UserInputError(ENV_PLAN, value, f"auto or one of: {', '.join(PLAN_NAMES)}")
    return value
