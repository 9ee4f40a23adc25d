"""Continuing a training from an earlier LoRA (the continue_from_lora input).

Any reference `lora_weights` accepts (this trainer's tar first, a Hugging Face repo, a URL, another
trainer's file in any layout lora/formats.py reads) is fetched and checked against the transformer
before anything is trained: a file of another model family, or one that is not a LoRA at all, fails
naming the input. The training then starts from its weights instead of a fresh LoRA: its rank and
target layers are the file's (they win over lora_rank and layers_to_optimize_regex, with a log line
where they differ), and what the file says of its own training (trigger word, steps, base model) is
logged, so a user sees what they are continuing.

When the earlier tar also holds the training's state (save_training_state; training.training_state),
the continuation is exact: the optimizer, the moving average, the generator and the batch order go
on where they stopped, so 600 + 400 steps give the LoRA 1,000 steps give, on the same device and with
the same images and inputs (a log line names any input that differs). Without it the optimizer and
the average start afresh from the LoRA's weights.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from errors import UserInputError
from lora.formats import CanonicalLora, read_lora_file
from training.config import TrainingConfig
from training.training_state import STATE_FILE, LoopState, read_state
from weights.lora_cache import LoraCache
from weights.lora_reference import display_reference
from weights.lora_source import fetch_lora, fetch_lora_companion
from weights.lora_tokens import LoraTokens

log = logging.getLogger(__name__)

FIELD = "continue_from_lora"
# Inputs that must be the earlier training's for an exact continuation (steps and the continuation's
# own inputs may differ; the tokens and tracking settings do not change the weights).
SAME_FOR_EXACT = (
    "trigger_word", "learning_rate", "batch_size", "resolution", "lora_rank", "caption_dropout_rate",
    "optimizer", "layers_to_optimize_regex", "seed", "autocaption", "autocaption_prefix",
    "autocaption_suffix", "diff_output_preservation_class", "diff_output_preservation_multiplier",
    "shift_timesteps_by_resolution",
)  # fmt: skip
# What the earlier file's metadata may say about its training, in the order the log line gives it.
REPORTED = ("trigger_word", "steps", "rank", "resolutions", "base_model", "software", "software_version")


@dataclass(frozen=True)
class StartingLora:
    """The LoRA a training continues from, in canonical form (lora.formats)."""

    lora: CanonicalLora
    source: str  # the reference as logs and metadata show it (tokens in URLs masked)
    metadata: dict[str, str]  # the earlier file's own metadata

    @property
    def targets(self) -> list[str]:
        return sorted(self.lora)

    @property
    def rank(self) -> int:
        """The rank most of its layers have (rank_pattern covers the others)."""
        return Counter(update.rank for update in self.lora.values()).most_common(1)[0][0]

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {name: update.rank for name, update in self.lora.items() if update.rank != self.rank}

    @property
    def earlier_steps(self) -> int:
        try:
            return int(self.metadata.get("steps", "0"))
        except ValueError:
            return 0


def load_starting_lora(
    reference: str, transformer: torch.nn.Module, cache: LoraCache, hf_token: str | None = None
) -> StartingLora:
    """Fetch and check the earlier LoRA (UserInputError naming continue_from_lora if it cannot be used)."""
    path = fetch_lora(reference, cache, FIELD, tokens=LoraTokens(hf=hf_token, civitai=None))
    lora = read_lora_file(path, transformer, FIELD)
    if not lora:
        raise UserInputError(FIELD, display_reference(reference), "a LoRA with at least one layer")
    start = StartingLora(lora=lora, source=display_reference(reference), metadata=_metadata(path))
    said = ", ".join(f"{key} {start.metadata[key]!r}" for key in REPORTED if start.metadata.get(key))
    log.info(
        "continuing from %s: %d layers, rank %d%s; its training: %s",
        start.source,
        len(lora),
        start.rank,
        f" (other ranks on {len(start.rank_pattern)} layers)" if start.rank_pattern else "",
        said or "not recorded in the file",
    )
    return start


def report_differences(start: StartingLora, lora_rank: int, targets: list[str], trigger_word: str) -> None:
    """Log where the file overrides this training's inputs, and a trigger word that changed."""
    if start.rank != lora_rank or start.rank_pattern:
        log.info("%s: the LoRA's rank (%d) is used, not lora_rank %d", FIELD, start.rank, lora_rank)
    if set(start.targets) != set(targets):
        log.info(
            "%s: the LoRA's %d layers are trained, not the %d that lora_rank/layers_to_optimize_regex select",
            FIELD,
            len(start.targets),
            len(targets),
        )
    earlier = start.metadata.get("trigger_word")
    if earlier and earlier != trigger_word:
        log.warning(
            "%s was trained with trigger word %r; this training uses %r", start.source, earlier, trigger_word
        )


def load_training_state(
    reference: str, cache: LoraCache, hf_token: str | None, config: TrainingConfig
) -> LoopState | None:
    """The earlier training's state, if its tar holds one (logged either way)."""
    path = fetch_lora_companion(
        reference, cache, FIELD, STATE_FILE, tokens=LoraTokens(hf=hf_token, civitai=None)
    )
    if path is None:
        log.info(
            "%s holds no training state (save_training_state): the optimizer and the moving average "
            "start afresh from its weights",
            display_reference(reference),
        )
        return None
    state = read_state(path, FIELD)
    now = config.to_json()
    differ = [k for k in SAME_FOR_EXACT if k in state.config and state.config[k] != now.get(k)]
    log.info(
        "continuing exactly from step %d of the earlier training%s",
        state.step,
        f"; these inputs differ from it, so the result is not what one longer training gives: {', '.join(differ)}"
        if differ
        else "",
    )
    return state


def check_state_fits(state: LoopState | None, transformer: torch.nn.Module) -> None:
    """The state's parameters are the adapter's (same layers and ranks): else it is another LoRA's."""
    if state is None:
        return
    names = {n for n, _ in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    shapes_match = names == set(state.params) and all(
        tuple(p.shape) == tuple(state.params[n].shape)
        for n, p in transformer.named_parameters()
        if n in names
    )
    if not shapes_match:
        raise UserInputError(
            FIELD,
            STATE_FILE,
            "a training state of this LoRA (its layers or ranks differ from the LoRA file's)",
        )


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})
