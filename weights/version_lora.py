"""The LoRA of a trained version: what cog hands to `setup(weights=...)` from COG_WEIGHTS.

On Replicate a training of this image makes a new version of it, started with COG_WEIGHTS set to
the URL of the training's output (the tar train.py returns). Locally the same happens with
`cog run -e COG_WEIGHTS=...` or `COG_WEIGHTS=... ./run.sh predict`. Any reference `lora_weights`
accepts works (the trained tar, a .safetensors URL or path, a Hugging Face repo, ...).

The file is fetched and verified once, at setup, then copied out of the LoRA cache into a folder of
its own, so cache eviction never takes a version's LoRA away. A failure is a setup failure: a trained
version must never fall back to the base model's images without saying so.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from errors import UserInputError
from weights.lora_cache import LoraCache
from weights.lora_reference import display_reference
from weights.lora_source import fetch_lora

log = logging.getLogger(__name__)

VERSION_FIELD = "COG_WEIGHTS"
VERSION_FOLDER = "version"  # under the LoRA cache's root; its files are not cache entries


class VersionWeightsError(RuntimeError):
    """COG_WEIGHTS names weights that cannot be fetched or read; the message says which and why."""


@dataclass(frozen=True)
class VersionLora:
    path: Path  # the version's own copy, outside the cache's eviction
    source: str  # COG_WEIGHTS as shown in logs (tokens in URLs masked, long values shortened)
    trigger_word: str | None  # from the file's metadata (this project's trainer writes it)
    base_model: str | None  # the model it was trained on, when the file says


def fetch_version_lora(weights: str | os.PathLike, cache: LoraCache) -> VersionLora:
    """Fetch and verify COG_WEIGHTS into the version's own folder; VersionWeightsError if it fails."""
    reference = os.fspath(weights).strip()
    shown = display_reference(reference)
    if not reference:
        raise VersionWeightsError(f"{VERSION_FIELD} is set but empty; unset it to serve the base model")
    try:
        fetched = fetch_lora(reference, cache, VERSION_FIELD)
    except UserInputError as err:
        raise VersionWeightsError(
            f"{VERSION_FIELD}: cannot use {shown} as this version's LoRA: {err.allowed}"
        ) from None
    pinned = _pin(fetched, cache.root / VERSION_FOLDER, LoraCache.key_for(reference))
    metadata = _metadata(pinned)
    version = VersionLora(
        path=pinned,
        source=shown,
        trigger_word=metadata.get("trigger_word") or None,
        base_model=metadata.get("base_model") or None,
    )
    log.info(
        "%s: this version's LoRA is %s (trained on %s, trigger word %s)",
        VERSION_FIELD,
        shown,
        version.base_model or "an unnamed base",
        repr(version.trigger_word) if version.trigger_word else "not recorded",
    )
    return version


def _pin(path: Path, folder: Path, key: str) -> Path:
    """A copy of `path` in `folder` (written whole, then renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{key}.safetensors"
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(handle)
    try:
        shutil.copyfile(path, temporary)
        os.replace(temporary, final)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return final


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})
