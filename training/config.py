"""The inputs of a LoRA training, validated in one place into a frozen TrainingConfig.

Names, defaults and ranges follow the public FLUX.1 LoRA trainer (replicate/flux-fine-tuner, on
Replicate as ostris/flux-dev-lora-trainer), so a user switching over sends the same inputs and they mean
the same. Where that trainer takes any value, unusual ones are accepted with a warning; only values
that cannot work are refused, each with the reason. The Cog server does not enforce Input ranges
without the schema `cog build` writes, so every rule is checked here.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass

from errors import UserInputError
from training.optimizers import ADAMW_MAX_LR, OPTIMIZER_TABLE, PRODIGY_MIN_MULTIPLIER
from weights.lora_reference import display_reference

log = logging.getLogger(__name__)

OPTIMIZERS = tuple(OPTIMIZER_TABLE)  # adamw8bit, adamw, adam8bit, adam, lion8bit, lion, adagrad, ...
MIN_STEPS, MAX_STEPS = 3, 6000
MIN_RANK, MAX_RANK = 1, 128
# One step's images share a size bucket and pass through the 12B transformer together: beyond 32 the
# activations do not fit on any single GPU, even with gradient checkpointing.
MIN_BATCH, MAX_BATCH = 1, 32
USUAL_MAX_BATCH = 4
# A side below 64 is less than one 64-pixel bucket step; above 2048 FLUX.1's position embedding and
# GPU memory both run out. 256-1536 is what FLUX.1 LoRAs are usually trained at.
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
USUAL_RESOLUTIONS = (256, 1536)
RESOLUTION_STEP = 64  # bucket sides are multiples of 64: fewer, fuller buckets for batch_size > 1
USUAL_MAX_LEARNING_RATE = ADAMW_MAX_LR  # AdamW-like optimizers diverge on FLUX.1 above this
MAX_LEARNING_RATE = 10.0  # no optimizer here (Prodigy's multiplier included) trains at a larger rate
MAX_SEED = 2**32 - 1
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

DEFAULTS = dict(
    trigger_word="TOK",
    steps=1000,
    learning_rate=4e-4,
    batch_size=1,
    resolution="512,768,1024",
    lora_rank=16,
    caption_dropout_rate=0.05,
    optimizer="adamw8bit",
    cache_latents_to_disk=False,
    layers_to_optimize_regex=None,
    gradient_checkpointing=False,
    seed=None,
    hf_repo_id=None,
    autocaption=True,
    autocaption_prefix=None,
    autocaption_suffix=None,
    diff_output_preservation_class=None,
    diff_output_preservation_multiplier=1.0,
    shift_timesteps_by_resolution=False,
    continue_from_lora=None,
    save_training_state=False,
)
MAX_PRESERVATION_MULTIPLIER = 10.0


@dataclass(frozen=True)
class TrainingConfig:
    """One training's settings. The Hugging Face token is deliberately not a field: a config is saved."""

    trigger_word: str
    steps: int
    learning_rate: float
    batch_size: int
    resolutions: tuple[int, ...]  # sorted, unique, multiples of RESOLUTION_STEP
    lora_rank: int  # alpha = rank: the update is applied at scale 1
    caption_dropout_rate: float
    optimizer: str
    cache_latents_to_disk: bool
    layers_to_optimize_regex: str | None
    gradient_checkpointing: bool
    seed: int  # drawn when the user gave none, so the saved config reproduces the run
    hf_repo_id: str | None
    base_model: str = "dev"
    autocaption: bool = True  # caption images without a .txt with a vision-language model
    autocaption_prefix: str | None = None  # added in code: captioners drop instructions to add them
    autocaption_suffix: str | None = None
    # Differential output preservation (training.recipe.preservation_loss): the class word that stands
    # for the trigger word in the base model's own output (None: off; several, comma-separated, take
    # turns), and the weight of that term.
    diff_output_preservation_class: str | None = None
    diff_output_preservation_multiplier: float = 1.0
    # Noise levels shifted by image size as the dev scheduler shifts its steps (training.recipe
    # sample_shifted_timesteps); off: the public trainer's sampling, the same at every size.
    shift_timesteps_by_resolution: bool = False
    # The LoRA this training starts from (training.continuation), as logs show it: a token in a
    # URL's query is never recorded. None: a fresh LoRA.
    continue_from_lora: str | None = None
    # Also write the loop's state into the tar (training.training_state), so that a training continued
    # from it runs on exactly as an uninterrupted one (about 8x the LoRA's size).
    save_training_state: bool = False

    @property
    def preservation_classes(self) -> tuple[str, ...]:
        """The class words of diff_output_preservation_class (none when it is off)."""
        if self.diff_output_preservation_class is None:
            return ()
        return tuple(word.strip() for word in self.diff_output_preservation_class.split(","))

    @property
    def lora_alpha(self) -> int:
        return self.lora_rank

    def to_json(self) -> dict:
        """Every input as the user would send it again (resolution as text), and nothing secret."""
        data = asdict(self)
        data["resolution"] = ",".join(str(r) for r in data.pop("resolutions"))
        data["lora_alpha"] = self.lora_alpha
        return data


def build_training_config(
    *,
    trigger_word: str = DEFAULTS["trigger_word"],
    steps: int = DEFAULTS["steps"],
    learning_rate: float = DEFAULTS["learning_rate"],
    batch_size: int = DEFAULTS["batch_size"],
    resolution: str = DEFAULTS["resolution"],
    lora_rank: int = DEFAULTS["lora_rank"],
    caption_dropout_rate: float = DEFAULTS["caption_dropout_rate"],
    optimizer: str = DEFAULTS["optimizer"],
    cache_latents_to_disk: bool = DEFAULTS["cache_latents_to_disk"],
    layers_to_optimize_regex: str | None = DEFAULTS["layers_to_optimize_regex"],
    gradient_checkpointing: bool = DEFAULTS["gradient_checkpointing"],
    seed: int | None = DEFAULTS["seed"],
    hf_repo_id: str | None = DEFAULTS["hf_repo_id"],
    autocaption: bool = DEFAULTS["autocaption"],
    autocaption_prefix: str | None = DEFAULTS["autocaption_prefix"],
    autocaption_suffix: str | None = DEFAULTS["autocaption_suffix"],
    diff_output_preservation_class: str | None = DEFAULTS["diff_output_preservation_class"],
    diff_output_preservation_multiplier: float = DEFAULTS["diff_output_preservation_multiplier"],
    shift_timesteps_by_resolution: bool = DEFAULTS["shift_timesteps_by_resolution"],
    continue_from_lora: str | None = DEFAULTS["continue_from_lora"],
    save_training_state: bool = DEFAULTS["save_training_state"],
    has_hf_token: bool = False,
) -> TrainingConfig:
    """Check every input; raise UserInputError naming the first bad field, before any heavy work."""
    if not isinstance(trigger_word, str) or len(trigger_word) > 200 or "\n" in trigger_word:
        raise UserInputError(
            "trigger_word", trigger_word, "a short text on one line (at most 200 characters)"
        )
    _int_in_range("steps", steps, MIN_STEPS, MAX_STEPS)
    optimizer = _optimizer(optimizer)
    _learning_rate(learning_rate, optimizer)
    _int_in_range("batch_size", batch_size, MIN_BATCH, MAX_BATCH)
    if batch_size > USUAL_MAX_BATCH:
        log.warning(
            "batch_size=%d: more than %d images per step needs much GPU memory (gradient checkpointing "
            "will be on) and fewer steps for the same training",
            batch_size,
            USUAL_MAX_BATCH,
        )
    resolutions = parse_resolutions(resolution)
    _int_in_range("lora_rank", lora_rank, MIN_RANK, MAX_RANK)
    if not _is_number(caption_dropout_rate) or not 0 <= caption_dropout_rate <= 1:
        raise UserInputError("caption_dropout_rate", caption_dropout_rate, "a number from 0 to 1")
    _bool("cache_latents_to_disk", cache_latents_to_disk)
    _bool("gradient_checkpointing", gradient_checkpointing)
    regex = layers_to_optimize_regex.strip() if isinstance(layers_to_optimize_regex, str) else None
    if layers_to_optimize_regex is not None and not isinstance(layers_to_optimize_regex, str):
        raise UserInputError(
            "layers_to_optimize_regex", layers_to_optimize_regex, "a regular expression or empty"
        )
    if regex:
        try:
            re.compile(regex)
        except re.error as exc:
            raise UserInputError(
                "layers_to_optimize_regex", regex, f"a valid Python regular expression ({exc})"
            ) from exc
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
        log.info("no seed given; using seed %d (saved in config.json)", seed)
    _int_in_range("seed", seed, 0, MAX_SEED)
    repo_id = hf_repo_id.strip() if isinstance(hf_repo_id, str) and hf_repo_id.strip() else None
    if hf_repo_id is not None and not isinstance(hf_repo_id, str):
        raise UserInputError("hf_repo_id", hf_repo_id, "a Hugging Face repo id like 'your-name/my-flux-lora'")
    if repo_id is not None:
        if not _HF_REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
            raise UserInputError(
                "hf_repo_id", repo_id, "a Hugging Face repo id like 'your-name/my-flux-lora'"
            )
        if not has_hf_token:
            raise UserInputError(
                "hf_token", "(empty)", f"a Hugging Face write token is needed to push to hf_repo_id={repo_id}"
            )
    elif has_hf_token:
        log.warning("hf_token given without hf_repo_id: nothing will be pushed to the Hugging Face Hub")
    _bool("autocaption", autocaption)
    _bool("shift_timesteps_by_resolution", shift_timesteps_by_resolution)
    _bool("save_training_state", save_training_state)
    preservation_class = _affix("diff_output_preservation_class", diff_output_preservation_class)
    if preservation_class is not None:
        if not trigger_word.strip():
            raise UserInputError(
                "diff_output_preservation_class",
                preservation_class,
                "empty when trigger_word is empty (it replaces the trigger word in the captions)",
            )
        words = [word.strip() for word in preservation_class.split(",")]
        if not all(words):
            raise UserInputError(
                "diff_output_preservation_class",
                preservation_class,
                "class words separated by commas, none empty",
            )
        preservation_class = ", ".join(words)
    if not _is_number(diff_output_preservation_multiplier) or not (
        0 <= diff_output_preservation_multiplier <= MAX_PRESERVATION_MULTIPLIER
    ):
        raise UserInputError(
            "diff_output_preservation_multiplier",
            diff_output_preservation_multiplier,
            f"a number from 0 to {MAX_PRESERVATION_MULTIPLIER:g} (0 turns the preservation off)",
        )
    if preservation_class is not None and diff_output_preservation_multiplier == 0:
        log.warning("diff_output_preservation_multiplier=0: no preservation, the class word is not used")
        preservation_class = None
    return TrainingConfig(
        trigger_word=trigger_word.strip(),
        steps=steps,
        learning_rate=float(learning_rate),
        batch_size=batch_size,
        resolutions=resolutions,
        lora_rank=lora_rank,
        caption_dropout_rate=float(caption_dropout_rate),
        optimizer=optimizer,
        cache_latents_to_disk=cache_latents_to_disk,
        layers_to_optimize_regex=regex or None,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        hf_repo_id=repo_id,
        autocaption=autocaption,
        autocaption_prefix=_affix("autocaption_prefix", autocaption_prefix),
        autocaption_suffix=_affix("autocaption_suffix", autocaption_suffix),
        diff_output_preservation_class=preservation_class,
        diff_output_preservation_multiplier=float(diff_output_preservation_multiplier),
        shift_timesteps_by_resolution=shift_timesteps_by_resolution,
        continue_from_lora=_reference("continue_from_lora", continue_from_lora),
        save_training_state=save_training_state,
    )


def parse_resolutions(text: object, field: str = "resolution") -> tuple[int, ...]:
    """'512,768,1024' -> (512, 768, 1024); sides are rounded to a multiple of 64 (logged)."""
    allowed = f"comma-separated integers from {MIN_RESOLUTION} to {MAX_RESOLUTION}, e.g. '512,768,1024'"
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text.strip():
        raise UserInputError(field, text, allowed)
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not re.fullmatch(r"\d{1,5}", part):
            raise UserInputError(field, text, f"{allowed}; {part!r} is not an integer")
        value = int(part)
        if not MIN_RESOLUTION <= value <= MAX_RESOLUTION:
            raise UserInputError(field, text, f"{allowed}; {value} is out of range")
        rounded = max(MIN_RESOLUTION, round(value / RESOLUTION_STEP) * RESOLUTION_STEP)
        rounded = min(rounded, MAX_RESOLUTION)
        if rounded != value:
            log.info("%s: %d rounded to %d (a multiple of %d)", field, value, rounded, RESOLUTION_STEP)
        if not USUAL_RESOLUTIONS[0] <= rounded <= USUAL_RESOLUTIONS[1]:
            log.warning(
                "%s: %d is outside the usual %d-%d for FLUX.1 LoRAs; images are trained at it anyway",
                field,
                rounded,
                *USUAL_RESOLUTIONS,
            )
        values.append(rounded)
    if not values:
        raise UserInputError(field, text, allowed)
    return tuple(sorted(set(values)))


def _optimizer(value: object) -> str:
    """The public trainer matches optimizer names case-insensitively ('AdamW8bit' works there)."""
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in OPTIMIZERS:
        raise UserInputError("optimizer", value, f"allowed: {', '.join(OPTIMIZERS)}")
    return name


def _learning_rate(value: object, optimizer: str) -> None:
    if not _is_number(value) or not 0 < value <= MAX_LEARNING_RATE:
        raise UserInputError(
            "learning_rate",
            value,
            f"a number above 0 and at most {MAX_LEARNING_RATE:g} (larger rates make any optimizer diverge)",
        )
    if optimizer == "prodigy":
        if value < PRODIGY_MIN_MULTIPLIER:
            log.info(
                "optimizer=prodigy: learning_rate %g is below %g, so Prodigy runs at its own step size "
                "(multiplier 1.0), as in the public trainer",
                value,
                PRODIGY_MIN_MULTIPLIER,
            )
    elif value > USUAL_MAX_LEARNING_RATE:
        log.warning(
            "learning_rate=%g is far above the usual 1e-4 to 1e-3 for optimizer=%s: the training may "
            "diverge (it stops with an error if the loss does)",
            value,
            optimizer,
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_in_range(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserInputError(field, value, f"an integer from {low} to {high}")


def _affix(field: str, value: object) -> str | None:
    """An autocaption prefix/suffix: one short line, or None when empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or len(value) > 300 or "\n" in value:
        raise UserInputError(field, value, "a short text on one line (at most 300 characters)")
    return value.strip()


def _reference(field: str, value: object) -> str | None:
    """A LoRA reference as it is recorded (display form: no URL query, data: URLs by size)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise UserInputError(field, value, "a LoRA reference, as lora_weights takes")
    return display_reference(value.strip())


def _bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise UserInputError(field, value, "true or false")
