"""LoRAs at inference: from the request's references to fused weights, doing nothing when nothing changed.

Per request: each reference is fetched (weights/lora_source.py: cached on disk, so a known one costs a
lookup), read into canonical form (kept in memory for the last few files, so an unchanged file is not
parsed again), and handed to the variant's LoraFuser, which changes weights only when the set of
(file, scale) differs from what is fused now.
"""

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import UserInputError
from flux.placement import Placement
from lora.apply import LoraFuser
from lora.formats import CanonicalLora, read_lora_file
from weights.lora_cache import LoraCache
from weights.lora_reference import display_reference, same_reference
from weights.lora_source import fetch_lora
from weights.lora_tokens import LoraTokens
from weights.version_lora import VERSION_FIELD, VersionLora, VersionWeightsError

log = logging.getLogger(__name__)

SCALE_RANGE = (-1.0, 3.0)
PARSED_KEEP = 4  # canonical LoRAs kept in memory: the active pair plus a couple to switch back to


@dataclass(frozen=True)
class LoraChoice:
    field: str  # the input that named it, for error messages
    reference: str
    scale: float
    label: str = ""  # how logs name it, when not by its reference (a trained version's own LoRA)

    def shown(self) -> str:
        return self.label or display_reference(self.reference)


def choose_loras(
    lora_weights: str | None,
    replicate_weights: str | None,
    lora_scale: float,
    extra_lora: str | None,
    extra_lora_scale: float,
    version: VersionLora | None = None,
) -> list[LoraChoice]:
    """Validate the LoRA inputs; `replicate_weights` is the name trained versions use for `lora_weights`.

    Replicate's rules: an `extra_lora` naming the main LoRA is dropped (with a warning), and an
    `extra_lora` without a main LoRA takes its place, keeping `extra_lora_scale`.

    `version`: a trained version's own LoRA (COG_WEIGHTS). It is the main LoRA, at `lora_scale`,
    of every request that names none; a request's lora_weights / replicate_weights replace it, and
    extra_lora adds to whichever is the main one.
    """
    lora_weights, replicate_weights, extra_lora = (
        _blank_to_none(v) for v in (lora_weights, replicate_weights, extra_lora)
    )
    if lora_weights and replicate_weights and not same_reference(lora_weights, replicate_weights):
        raise UserInputError(
            "replicate_weights",
            replicate_weights,
            f"same meaning as lora_weights ({lora_weights!r}): send only one",
        )
    main_field = "lora_weights" if lora_weights else "replicate_weights"
    main = lora_weights or replicate_weights
    _check_scale("lora_scale", lora_scale)
    _check_scale("extra_lora_scale", extra_lora_scale)
    label = ""
    if not main and version is not None:
        own = version_choice(version, lora_scale)
        main_field, main, label = own.field, own.reference, own.label
    if extra_lora and not main:
        # As on Replicate: a lone extra_lora is the main LoRA, at its own scale (extra_lora_scale).
        main_field, main, lora_scale, extra_lora = "extra_lora", extra_lora, extra_lora_scale, None
    if main and extra_lora and same_reference(main, extra_lora):
        # Fusing one file twice would double its strength; Replicate's containers apply it once too.
        log.warning(
            "extra_lora %s is the same LoRA as %s; applying it once, at lora_scale %g",
            display_reference(extra_lora),
            label or main_field,
            lora_scale,
        )
        extra_lora = None
    choices = []
    if main:
        choices.append(LoraChoice(main_field, main, float(lora_scale), label))
    if extra_lora:
        choices.append(LoraChoice("extra_lora", extra_lora, float(extra_lora_scale)))
    return choices


def version_choice(version: VersionLora, scale: float) -> LoraChoice:
    return LoraChoice(
        VERSION_FIELD, str(version.path), float(scale), f"this version's LoRA ({version.source})"
    )


class LoraManager:
    def __init__(
        self, transformers: dict[str, torch.nn.Module], cache: LoraCache, placement: Placement | None = None
    ):
        self._transformers = transformers
        self._fusers = {
            name: LoraFuser(transformer, host_originals=_host_weights(placement, name))
            for name, transformer in transformers.items()
        }
        self._placement = placement
        if placement is not None:  # a transformer swapped out comes back as the base model
            placement.on_evict.append(lambda variant: self._fusers[variant].forget_fused())
        self._cache = cache
        self._parsed: OrderedDict[tuple, CanonicalLora] = OrderedDict()
        self.files_read = 0  # how many times a LoRA file was parsed (tests check unchanged ones are not)

    def activate(self, variant: str, choices: list[LoraChoice], tokens: LoraTokens | None = None) -> bool:
        """Fuse exactly `choices` into the variant's transformer; True if its weights changed.

        `tokens`: the request's hf_api_token / civitai_api_token (the environment's when absent).
        """
        requested = []
        for choice in choices:
            path = fetch_lora(choice.reference, self._cache, choice.field, tokens=tokens)
            key, lora = self._read(variant, path, choice.field)
            requested.append((key, lora, choice.scale))
        if self._placement is not None:  # fused on the device, where the request will run it
            self._placement.bring_in(variant)
        changed = self._fusers[variant].set_loras(requested)
        if changed:
            log.info(
                "LoRAs on %s: %s",
                variant,
                ", ".join(f"{c.shown()} x {c.scale:g}" for c in choices) or "none",
            )
        return changed

    def prepare_version(self, version: VersionLora) -> None:
        """Check a trained version's LoRA against every loaded variant, and fuse it at scale 1 (the
        default lora_scale) into dev (the default model) when loaded, so the first request finds it."""
        try:
            for name in self._transformers:
                self._read(name, version.path, VERSION_FIELD)
        except UserInputError as err:
            raise VersionWeightsError(
                f"{VERSION_FIELD}: {version.source} is not a LoRA for this FLUX.1 transformer: {err.allowed}"
            ) from None
        variant = "dev" if "dev" in self._transformers else next(iter(self._transformers))
        self.activate(variant, [version_choice(version, 1.0)])

    def _read(self, variant: str, path: Path, field: str) -> tuple[str, CanonicalLora]:
        # Not the mtime: the cache touches it on every hit (LRU). A new download is a new inode (atomic rename).
        stat = path.stat()
        identity = f"{path}:{stat.st_ino}:{stat.st_size}"
        slot = (variant, identity)
        if slot in self._parsed:
            self._parsed.move_to_end(slot)
            return identity, self._parsed[slot]
        lora = read_lora_file(path, self._transformers[variant], field)
        self.files_read += 1
        self._parsed[slot] = lora
        while len(self._parsed) > PARSED_KEEP:
            self._parsed.popitem(last=False)
        return identity, lora


def _host_weights(placement: Placement | None, variant: str):
    """Where the memory plan keeps a transformer's base in host memory (it swaps transformers), the
    fuser restores from that copy instead of making its own: half the host memory."""
    if placement is None:
        return None
    return lambda module_name: placement.host_weight(variant, module_name)


def warn_if_trigger_missing(prompt: str, choices: list[LoraChoice], version: VersionLora | None) -> None:
    """A trained version draws its subject when the prompt names the trigger word, as on Replicate;
    the prompt is not changed, but a prompt without the word gets a line in the logs."""
    uses_version = any(c.field == VERSION_FIELD for c in choices)
    if not uses_version or version is None or not version.trigger_word:
        return
    if version.trigger_word.casefold() not in prompt.casefold():
        log.warning(
            "the prompt does not contain %r, the trigger word this version's LoRA was trained with; "
            "its subject is drawn when the prompt names it",
            version.trigger_word,
        )


def _blank_to_none(value: str | None) -> str | None:
    return value.strip() or None if isinstance(value, str) else value


def _check_scale(field: str, value: object) -> None:
    low, high = SCALE_RANGE
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise UserInputError(field, value, f"a number from {low:g} to {high:g}")
