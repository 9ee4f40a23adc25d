"""skip_training_and_use_pretrained_hf_lora_url: an existing Hugging Face LoRA as the training's output.

So a version can be made from a LoRA someone already has: the file is fetched the way predict.py fetches
LoRAs (safetensors only, size-limited, hf_token for private repos), read in any layout predict.py
accepts, checked against FLUX.1 dev's layers, and written in the layout a training writes (PEFT keys
with the `transformer.` prefix, the strength folded in so alpha = rank), in the same tar.

The layer shapes come from the transformer's config on the meta device: no 24 GB of weights are
loaded to check a file.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import torch

from errors import UserInputError
from flux.variants import get_variant
from lora.formats import CanonicalLora, linear_shapes, read_lora_file_for_shapes
from training.export import (
    BASE_MODEL_REPO,
    LORA_FILE,
    SOFTWARE_NAME,
    SOFTWARE_VERSION,
    TAR_NAME,
    adapter_metadata,
    save_lora_file,
    write_tar,
)
from weights.base_models import resolve_base_weights
from weights.lora_cache import LoraCache
from weights.lora_reference import HfSource, LoraReferenceError, display_reference, parse_lora_reference
from weights.lora_source import fetch_lora
from weights.lora_tokens import LoraTokens

log = logging.getLogger(__name__)

FIELD = "skip_training_and_use_pretrained_hf_lora_url"
ALLOWED = (
    "a Hugging Face LoRA, e.g. https://huggingface.co/fofr/flux-80s-cyberpunk/resolve/main/lora.safetensors "
    "(also huggingface.co/<owner>/<repo> or hf:<owner>/<repo>)"
)


def check_pretrained_reference(reference: str) -> str:
    """The reference, stripped, if it names a Hugging Face LoRA; UserInputError otherwise (before any work)."""
    reference = reference.strip() if isinstance(reference, str) else reference
    if not isinstance(reference, str) or not reference:
        raise UserInputError(FIELD, reference, ALLOWED)
    try:
        source = parse_lora_reference(reference)
    except LoraReferenceError as exc:
        raise UserInputError(FIELD, display_reference(reference), f"{ALLOWED}; {exc}") from exc
    # A bare owner/name is a Replicate model (as in predict.py); this input is about Hugging Face only.
    if not isinstance(source, HfSource):
        raise UserInputError(FIELD, display_reference(reference), ALLOWED)
    return reference


def package_pretrained_lora(
    reference: str,
    output_dir: Path,
    *,
    hf_token: str | None = None,
    transformer: torch.nn.Module | None = None,
) -> Path:
    """Fetch, check and convert the LoRA; return the weights tar in output_dir.

    transformer: a loaded one to check against (tests); None reads FLUX.1 dev's layer shapes from its config.
    """
    reference = check_pretrained_reference(reference)
    shapes = linear_shapes(transformer) if transformer is not None else dev_linear_shapes()
    with tempfile.TemporaryDirectory(prefix="pretrained-lora-") as work:
        work = Path(work)
        # A private cache: the file is needed once, and the tar is what is kept.
        cache = LoraCache(work / "cache", max_bytes=1 << 40)
        path = fetch_lora(reference, cache, FIELD, allow_local=False, tokens=LoraTokens(hf=hf_token))
        lora = read_lora_file_for_shapes(path, shapes, FIELD, source=display_reference(reference))
        state, adapter = trained_layout(lora)
        staging = work / "trained_model"
        staging.mkdir()
        save_lora_file(
            state,
            staging / LORA_FILE,
            {
                "format": "pt",
                "lora_adapter_metadata": json.dumps(adapter, sort_keys=True),
                "base_model": BASE_MODEL_REPO,
                "source": display_reference(reference),
                "software": SOFTWARE_NAME,
                "software_version": SOFTWARE_VERSION,
            },
        )
        config = {
            FIELD: display_reference(reference),
            "lora_layers": len(lora),
            "rank": adapter["transformer.r"],
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        output_dir.mkdir(parents=True, exist_ok=True)
        tar = write_tar(staging, output_dir / TAR_NAME)
    log.info(
        "packaged the pretrained LoRA %s (%d layers) without training",
        display_reference(reference),
        len(lora),
    )
    return tar


def trained_layout(lora: CanonicalLora) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT keys as a training writes them, with alpha / rank folded into lora_B so alpha = rank; layers
    of another rank than the most common one go into rank_pattern / alpha_pattern."""
    state = {}
    for module, update in sorted(lora.items()):
        up = update.up.float() * (update.alpha / update.rank)
        state[f"transformer.{module}.lora_A.weight"] = update.down.clone()  # split layers share one down
        state[f"transformer.{module}.lora_B.weight"] = up.to(update.up.dtype).clone()
    ranks = {module: update.rank for module, update in lora.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {module: r for module, r in sorted(ranks.items()) if r != rank}
    adapter = adapter_metadata(rank, rank, list(lora))
    if others:
        adapter["transformer.rank_pattern"] = others
        adapter["transformer.alpha_pattern"] = others
    return state, adapter


def dev_linear_shapes() -> dict[str, tuple[int, int]]:
    """FLUX.1 dev's Linear shapes from its transformer config, built on the meta device (no weights)."""
    from diffusers import FluxTransformer2DModel

    variant = get_variant("dev")
    folder = resolve_base_weights(variant.folder, variant.hf_repo, variant.gated)
    config = FluxTransformer2DModel.load_config(folder / "transformer", local_files_only=True)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    return linear_shapes(transformer)
