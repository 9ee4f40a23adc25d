"""Load FLUX.1 from diffusers-layout folders: one VAE and one pair of text encoders, a transformer per variant."""

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from errors import UserInputError
from flux.eight_bit import EightBitLinear, Fp8Storage, store_in_eight_bit
from flux.embeddings import PromptEmbeddingCache
from flux.fast.capability import FastSupport, detect_fast_support
from flux.fast.path import FastPath, setup_fast
from flux.gpu_memory import plan_for, warn_if_host_memory_short
from flux.memory_plan import MemoryPlan
from flux.placement import Placement
from flux.variants import VariantSpec, get_variant
from weights.base_models import resolve_base_weights

log = logging.getLogger(__name__)


@dataclass
class FluxModels:
    """Everything setup() loads; requests only read it (LoRA fusing aside)."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    transformers: dict[str, torch.nn.Module]
    scheduler_configs: dict[str, dict]
    device: torch.device
    dtype: torch.dtype
    folders: dict[str, Path] = field(default_factory=dict)
    # go_fast state (fp8 copies, compiled blocks); None until setup_fast ran (generate() then runs it).
    fast: FastPath | None = None
    prompt_embeddings: PromptEmbeddingCache = field(default_factory=PromptEmbeddingCache)
    # Where the memory plan keeps each component; None: everything on `device` (models built by hand).
    plan: MemoryPlan | None = None
    placement: Placement | None = None

    def transformer_for(self, variant: VariantSpec) -> torch.nn.Module:
        """The variant's transformer, on the device (swapped in if the plan keeps it in host memory)."""
        if variant.name not in self.transformers:
            loaded = ", ".join(self.transformers)
            raise UserInputError(
                "model",
                variant.name,
                f"this container loaded only: {loaded} (set FLUX_VARIANTS to load more)",
            )
        if self.placement is not None:
            self.placement.bring_in(variant.name)
        return self.transformers[variant.name]

    def visiting(self, *names: str):
        """A context with components `names` ("t5", "clip", "vae") on the device, for their stage."""
        return self.placement.visiting(*names) if self.placement is not None else nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what FLUX.1 was trained in; CPUs run fp32 (bf16 matmuls there are slow and less exact).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_flux(
    variant_names: tuple[str, ...],
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    fast: bool = True,
    training: bool = False,
    plan: MemoryPlan | None = None,
):
    """Load the requested variants. T5, CLIP and the VAE are loaded once, from the first variant's folder.

    fast: set up go_fast (fp8 copies + compiled blocks, where the GPU supports it); training passes False.
    plan: where each component lives (flux/memory_plan.py); None chooses from the GPU's free memory.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    variants = [get_variant(name, "FLUX_VARIANTS") for name in variant_names]
    plan = plan or plan_for(device, tuple(v.name for v in variants), training, fast)
    log.info("%s", plan.describe())
    if device.type == "cuda":  # the estimates are FLUX.1's: on a GPU the model is FLUX.1
        warn_if_host_memory_short(plan)
    folders = {v.name: resolve_base_weights(v.folder, v.hf_repo, v.gated) for v in variants}
    shared = folders[variants[0].name]
    started = time.perf_counter()
    placement = Placement(device, plan.transformers_on_gpu)

    def load(cls, folder: Path, sub: str):
        log.info("loading %s from %s", sub, folder / sub)
        # Local files only and safetensors only: nothing is fetched or unpickled here.
        model = cls.from_pretrained(
            folder / sub, torch_dtype=dtype, use_safetensors=True, local_files_only=True
        )
        return model.eval().requires_grad_(False)

    # Each component is placed as soon as it is loaded: host memory holds one at a time (and what the plan keeps there).
    models = FluxModels(
        tokenizer=AutoTokenizer.from_pretrained(shared / "tokenizer", local_files_only=True),
        tokenizer_2=AutoTokenizer.from_pretrained(shared / "tokenizer_2", local_files_only=True),
        text_encoder=placement.add(
            "clip", load(CLIPTextModel, shared, "text_encoder"), plan.vae_and_clip_on_gpu
        ),
        text_encoder_2=placement.add("t5", load(T5EncoderModel, shared, "text_encoder_2"), plan.t5_on_gpu),
        vae=placement.add("vae", load(AutoencoderKL, shared, "vae"), plan.vae_and_clip_on_gpu),
        transformers={
            v.name: place_transformer(
                load(FluxTransformer2DModel, folders[v.name], "transformer"), v.name, plan, placement
            )
            for v in variants
        },
        scheduler_configs={v.name: _scheduler_config(folders[v.name]) for v in variants},
        device=device,
        dtype=dtype,
        folders=folders,
        plan=plan,
        placement=placement,
    )
    log.info(
        "loaded %s on %s (%s) in %.1f s", ", ".join(folders), device, dtype, time.perf_counter() - started
    )
    return _finish(models, fast)


def apply_plan(models: FluxModels, plan: MemoryPlan, fast: bool = True) -> FluxModels:
    """Place models built by hand (every component in host memory, `models.device` the target) as
    `plan` says, as load_flux does while loading: for benchmarks and notebooks."""
    log.info("%s", plan.describe())
    placement = Placement(models.device, plan.transformers_on_gpu)
    for name, module, on_device in (
        ("clip", models.text_encoder, plan.vae_and_clip_on_gpu),
        ("t5", models.text_encoder_2, plan.t5_on_gpu),
        ("vae", models.vae, plan.vae_and_clip_on_gpu),
    ):
        placement.add(name, module, on_device)
    for name, transformer in models.transformers.items():
        place_transformer(transformer, name, plan, placement)
    models.plan, models.placement = plan, placement
    return _finish(models, fast)


def _finish(models: FluxModels, fast: bool) -> FluxModels:
    """The plan's last steps: the first transformers in, VAE slicing, go_fast where the plan has room."""
    plan = models.plan
    if plan.name != "resident":
        models.vae.enable_slicing()  # decode a batch one image at a time: the headroom counts one
    for name in plan.variants[: plan.transformers_on_gpu]:
        models.placement.bring_in(name)
    # At setup, not on the first request: compiling the blocks for go_fast takes tens of seconds.
    if plan.name == "resident":
        lengths = {name: get_variant(name).max_sequence_length for name in models.transformers}
        models.fast = setup_fast(models.transformers, models.device, lengths, mode=None if fast else "off")
    else:  # no room for fp8 copies; fp8 storage is its own fast path (no compile: swapped transformers)
        models.fast = _storage_fast_path(models, fast)
    return models


def _storage_fast_path(models: FluxModels, fast: bool) -> FastPath:
    """go_fast outside `resident`: the fp8 product on fp8-stored codes where the GPU runs it, else the
    plan's standard path (said once, at the first go_fast request)."""
    plan = models.plan
    support = detect_fast_support(models.device) if fast else FastSupport(False, "switched off")
    if plan.storage != "fp8" or not support.available:
        why = "its weights are not stored in fp8" if plan.storage != "fp8" else support.reason
        return FastPath(FastSupport(False, f"memory plan {plan.name}: {why}; go_fast runs the standard path"))
    log.info("go_fast: fp8 products on the stored fp8 weights (memory plan %s, not compiled)", plan.name)
    return FastPath(support, {name: Fp8Storage(t) for name, t in models.transformers.items()})


def place_transformer(
    transformer: torch.nn.Module, name: str, plan: MemoryPlan, placement: Placement
) -> torch.nn.Module:
    """Store the block Linears in 8 bit if the plan says so, then move the transformer to the device,
    or leave it in host memory when the plan swaps transformers (load_flux brings the first ones in)."""
    device = placement.device
    home = torch.device("cpu") if plan.swaps else device
    if plan.eight_bit:
        # Quantized on the GPU when there is one (seconds, not a minute of CPU work per transformer).
        work = device if device.type == "cuda" else torch.device("cpu")
        store_in_eight_bit(transformer, plan.storage, home, work)
        # LoRA fusing reads the originals from host memory, module by module
        placement.pin([m.original for m in transformer.modules() if isinstance(m, EightBitLinear)])
    return placement.add(name, transformer, on_device=not plan.swaps, transformer=True)


def _scheduler_config(folder: Path) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler", local_files_only=True))
