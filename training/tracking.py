"""Experiment tracking with Weights & Biases (the public trainer's wandb_* inputs), via the wandb library.

What a run gets: the training inputs as its config, loss and learning rate every step, sample images
from wandb_sample_prompts every wandb_sample_interval steps, and the LoRA every wandb_save_interval
steps (the final one too). The API key goes to wandb in memory only: it is never logged nor written to
~/.netrc. W&B is a side channel: any failure of the service (login, network, quota) is logged as a
warning and the training goes on without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "flux_train_replicate"  # the public trainer's default project name
DEFAULT_INTERVAL = 100
MAX_SAMPLE_PROMPTS = 10  # each costs a full generation at every sample interval
SAMPLE_KEY_CHARS = 50  # W&B panel names: long prompts are shortened in the middle


@dataclass(frozen=True)
class WandbSettings:
    project: str = DEFAULT_PROJECT
    run: str | None = None
    entity: str | None = None
    sample_interval: int = DEFAULT_INTERVAL
    sample_prompts: tuple[str, ...] = ()
    save_interval: int = DEFAULT_INTERVAL


def build_wandb_settings(
    *,
    project: str | None = DEFAULT_PROJECT,
    run: str | None = None,
    entity: str | None = None,
    sample_interval: int = DEFAULT_INTERVAL,
    sample_prompts: str | None = None,
    save_interval: int = DEFAULT_INTERVAL,
) -> WandbSettings:
    """Check the wandb_* inputs (whether or not a key is given, so a typo shows before a long run)."""
    for field, value in (("wandb_sample_interval", sample_interval), ("wandb_save_interval", save_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(field, value, "an integer of at least 1 (steps)")
    names = {}
    for field, value in (("wandb_project", project), ("wandb_run", run), ("wandb_entity", entity)):
        if value is not None and not isinstance(value, str):
            raise UserInputError(field, value, "a name (text)")
        if isinstance(value, str) and ("\n" in value or len(value) > 128):
            raise UserInputError(field, value, "a name on one line (at most 128 characters)")
        names[field] = value.strip() if isinstance(value, str) and value.strip() else None
    if sample_prompts is not None and not isinstance(sample_prompts, str):
        raise UserInputError("wandb_sample_prompts", sample_prompts, "prompts, one per line")
    prompts = tuple(p.strip() for p in (sample_prompts or "").splitlines() if p.strip())
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        raise UserInputError(
            "wandb_sample_prompts",
            f"{len(prompts)} prompts",
            f"at most {MAX_SAMPLE_PROMPTS} prompts, one per line",
        )
    return WandbSettings(
        project=names["wandb_project"] or DEFAULT_PROJECT,
        run=names["wandb_run"],
        entity=names["wandb_entity"],
        sample_interval=sample_interval,
        sample_prompts=prompts,
        save_interval=save_interval,
    )


class WandbTracker:
    """One W&B run for one training; every method is safe to call after a failure (it does nothing)."""

    def __init__(self, api_key: str, settings: WandbSettings, config: dict, run_dir: Path):
        self.settings = settings
        self.run = None
        try:
            import wandb

            self._wandb = wandb
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=settings.run,
                config=config,
                # WANDB_DIR (the library's own setting) keeps the run folder; by default it goes with
                # the training's work folder, after the run is synced.
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                save_code=False,
                settings=wandb.Settings(api_key=api_key, silent=True),
            )
            log.info("logging to Weights & Biases: project %s, run %s", settings.project, self.run.name)
        except Exception as exc:
            log.warning(
                "Weights & Biases is unavailable (%s); training goes on without it", _safe(exc, api_key)
            )
        self._api_key = api_key

    @property
    def active(self) -> bool:
        return self.run is not None

    def wants_samples(self, step: int, last_step: int) -> bool:
        every = self.settings.sample_interval
        return self.active and bool(self.settings.sample_prompts) and (step % every == 0 or step == last_step)

    def wants_weights(self, step: int, last_step: int) -> bool:
        return self.active and (step % self.settings.save_interval == 0 or step == last_step)

    def log_step(self, step: int, loss: float, learning_rate: float) -> None:
        self._call("log", {"train/loss": loss, "train/learning_rate": learning_rate}, step=step)

    def log_samples(self, step: int, images: Sequence[tuple[str, Image.Image]]) -> None:
        if not self.active:
            return
        data = {
            f"samples/{_shorten(prompt)}": self._wandb.Image(image, caption=prompt)
            for prompt, image in images
        }
        self._call("log", data, step=step)

    def weights_file(self, step: int) -> Path:
        """Where the LoRA of `step` is written: in the run's own folder, which W&B uploads from."""
        return Path(self.run.dir) / f"lora-step-{step:05d}.safetensors"

    def save_weights(self, path: Path) -> None:
        self._call("save", str(path), base_path=str(path.parent), policy="now")

    def finish(self) -> None:
        self._call("finish")
        self.run = None

    def _call(self, method: str, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            getattr(self.run, method)(*args, **kwargs)
        except Exception as exc:
            log.warning(
                "Weights & Biases %s failed (%s); training goes on", method, _safe(exc, self._api_key)
            )


def _shorten(text: str, limit: int = SAMPLE_KEY_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


def _safe(exc: Exception, secret: str) -> str:
    """An exception's text without the key, in case a library echoes it."""
    return str(exc).replace(secret, "***") if secret else str(exc)
