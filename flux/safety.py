"""The safety checker: an NSFW image classifier run on generated images before they are returned.

The model is a transformers image classifier (weights/helper_models.py: SAFETY_CHECKER) whose labels include
"nsfw"; an image is flagged when the probability of that label exceeds the threshold. Flagged images are
dropped from the output with a log line; a request whose every image is flagged fails with
AllImagesFlaggedError. With disable_safety_checker the adapter neither loads nor runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from errors import UserInputError
from weights.helper_models import SAFETY_CHECKER, resolve_helper_weights

log = logging.getLogger(__name__)

ENV_THRESHOLD = "FLUX_SAFETY_THRESHOLD"
DEFAULT_THRESHOLD = 0.5
NSFW_LABEL = "nsfw"
T = TypeVar("T")


class AllImagesFlaggedError(RuntimeError):
    """Every image of a request was flagged: nothing is left to return."""


def threshold_from_env() -> float:
    """FLUX_SAFETY_THRESHOLD as a probability; above 1 nothing is flagged (an operator's way to log only)."""
    raw = os.environ.get(ENV_THRESHOLD)
    if raw is None or not raw.strip():
        return DEFAULT_THRESHOLD
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_THRESHOLD}={raw!r} is not a number; use a probability such as 0.5") from None
    if not 0.0 <= value <= 1.01:
        raise ValueError(f"{ENV_THRESHOLD}={raw!r} is out of range; use 0 to 1 (1.01 flags nothing)")
    return value


class SafetyChecker:
    def __init__(self, model, processor, device: torch.device | str, threshold: float | None = None):
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.threshold = threshold_from_env() if threshold is None else float(threshold)
        labels = {int(index): str(name).lower() for index, name in model.config.id2label.items()}
        nsfw = [index for index, name in labels.items() if name == NSFW_LABEL]
        if len(nsfw) != 1:  # a different classifier put in the folder: refuse rather than guess a label
            raise ValueError(f"safety checker labels {labels} have no single {NSFW_LABEL!r} label")
        self.nsfw_index = nsfw[0]

    @classmethod
    def load(
        cls, device: torch.device | str = "cpu", folder: Path | None = None, threshold: float | None = None
    ) -> SafetyChecker:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = resolve_helper_weights(SAFETY_CHECKER, folder)
        device = torch.device(device)
        # Half precision on an accelerator: a two-way softmax does not need fp32, the memory is better spent
        # on FLUX. The CPU stays in fp32 (bf16 matmuls there are slow).
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForImageClassification.from_pretrained(path, dtype=dtype, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(path)
        checker = cls(model.to(device), processor, device, threshold)
        log.info("safety checker loaded from %s on %s (threshold %.2f)", path, device, checker.threshold)
        return checker

    @torch.inference_mode()
    def nsfw_probabilities(self, images: Sequence[Image.Image]) -> list[float]:
        """Probability of the nsfw label for each image, in one batch."""
        if not images:
            return []
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        pixels = inputs["pixel_values"].to(self.device, dtype)
        logits = self.model(pixel_values=pixels).logits.float()
        return logits.softmax(dim=-1)[:, self.nsfw_index].tolist()

    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        return [probability > self.threshold for probability in self.nsfw_probabilities(images)]


def filter_images(images: Sequence[T], flagged: Sequence[bool]) -> list[T]:
    """The images not flagged, in order; a log line per dropped one; AllImagesFlaggedError when none is left."""
    if len(images) != len(flagged):
        raise ValueError(f"{len(images)} images but {len(flagged)} safety decisions")
    kept = []
    for index, (image, is_flagged) in enumerate(zip(images, flagged, strict=True)):
        if is_flagged:
            log.warning("output %d was flagged as NSFW and removed", index)
        else:
            kept.append(image)
    if images and not kept:
        what = "the only image was" if len(images) == 1 else f"all {len(images)} images were"
        raise AllImagesFlaggedError(
            f"{what} flagged as NSFW by the safety checker and removed; try another prompt or seed, or set"
            " disable_safety_checker=true"
        )
    return kept


def screen_images(images: Sequence[T], checker: SafetyChecker, disabled: object = False) -> list[T]:
    """What predict returns: all images when the checker is disabled (it is not run), else the unflagged."""
    if not isinstance(disabled, bool):
        raise UserInputError("disable_safety_checker", disabled, "true or false")
    if disabled:
        return list(images)
    return filter_images(images, checker.flagged(images))
