"""Load FLUX.1 from diffusers-layout folders: one VAE and one pair of text encoders, a transformer per variant."""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from errors import UserInputError
from flux.embeddings import PromptEmbeddingCache
from flux.fast.path import FastPath, setup_fast
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

    def transformer_for(self, variant: VariantSpec) -> torch.nn.Module:
        if variant.name not in self.transformers:
            loaded = ", ".join(self.transformers)
            raise UserInputError(
                "model",
                variant.name,
                f"this container loaded only: {loaded} (set FLUX_VARIANTS to load more)",
            )
        return self.transformers[variant.name]


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
):
    """Load the requested variants. T5, CLIP and the VAE are loaded once, from the first variant's folder.

    fast: set up go_fast (fp8 copies + compiled blocks, where the GPU supports it); training passes False.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    variants = [get_variant(name, "FLUX_VARIANTS") for name in variant_names]
    folders = {v.name: resolve_base_weights(v.folder, v.hf_repo, v.gated) for v in variants}
    shared = folders[variants[0].name]
    started = time.perf_counter()

    def load(cls, folder: Path, sub: str):
        log.info("loading %s from %s", sub, folder / sub)
        # Local files only and safetensors only: nothing is fetched or unpickled here.
        model = cls.from_pretrained(
            folder / sub, torch_dtype=dtype, use_safetensors=True, local_files_only=True
        )
        return model.to(device).eval().requires_grad_(False)

    models = FluxModels(
        tokenizer=AutoTokenizer.from_pretrained(shared / "tokenizer", local_files_only=True),
        tokenizer_2=AutoTokenizer.from_pretrained(shared / "tokenizer_2", local_files_only=True),
        text_encoder=load(CLIPTextModel, shared, "text_encoder"),
        text_encoder_2=load(T5EncoderModel, shared, "text_encoder_2"),
        vae=load(AutoencoderKL, shared, "vae"),
        transformers={v.name: load(FluxTransformer2DModel, folders[v.name], "transformer") for v in variants},
        scheduler_configs={v.name: _scheduler_config(folders[v.name]) for v in variants},
        device=device,
        dtype=dtype,
        folders=folders,
    )
    log.info(
        "loaded %s on %s (%s) in %.1f s", ", ".join(folders), device, dtype, time.perf_counter() - started
    )
    # At setup, not on the first request: compiling the blocks for go_fast takes tens of seconds.
    lengths = {v.name: v.max_sequence_length for v in variants}
    models.fast = setup_fast(models.transformers, device, lengths, mode=None if fast else "off")
    return models


def _scheduler_config(folder: Path) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler", local_files_only=True))
