"""The optimizer a training asked for, or a named fallback when its library cannot run here.

- adamw: torch.optim.AdamW (weight decay 1e-2, betas 0.9/0.999: the trainers' common setting).
- adamw8bit: bitsandbytes AdamW8bit (optimizer state in 8 bits: a quarter of AdamW's state memory).
  bitsandbytes runs on CUDA only and is not installed by default; without it the training uses adamw
  and says so in the logs.
- prodigy: prodigyopt's Prodigy, which estimates its own step size (learning_rate multiplies the
  estimate, 1.0 usual). Without the package the training uses adamw and says so in the logs (with
  learning_rate 4e-4 when the given one is a Prodigy multiplier above AdamW's range).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-2
BETAS = (0.9, 0.999)
# A prodigy learning_rate (a multiplier, ~1.0) would blow AdamW up: the fallback uses the trainer default.
ADAMW_MAX_LR = 1e-2
ADAMW_FALLBACK_LR = 4e-4


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], learning_rate: float, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, name of the one really used)."""
    params = list(params)
    if name == "adamw8bit":
        bnb = _try_import("bitsandbytes")
        if bnb is not None and device.type == "cuda":
            return bnb.optim.AdamW8bit(params, lr=learning_rate, betas=BETAS, weight_decay=WEIGHT_DECAY), name
        reason = (
            "bitsandbytes is not installed" if bnb is None else f"8-bit AdamW needs CUDA, not {device.type}"
        )
        log.warning("optimizer adamw8bit unavailable (%s): falling back to optimizer adamw", reason)
    elif name == "prodigy":
        prodigyopt = _try_import("prodigyopt")
        if prodigyopt is not None:
            optimizer = prodigyopt.Prodigy(
                params, lr=learning_rate, betas=BETAS, weight_decay=WEIGHT_DECAY, safeguard_warmup=True
            )
            return optimizer, name
        fallback_lr = learning_rate if learning_rate <= ADAMW_MAX_LR else ADAMW_FALLBACK_LR
        log.warning(
            "optimizer prodigy unavailable (the prodigyopt package is not installed): falling back to "
            "optimizer adamw with learning_rate %g",
            fallback_lr,
        )
        learning_rate = fallback_lr
    elif name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}")  # TrainingConfig validated it already
    return torch.optim.AdamW(params, lr=learning_rate, betas=BETAS, weight_decay=WEIGHT_DECAY), "adamw"


def _try_import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken install (e.g. bitsandbytes without its CUDA library) counts as absent
        log.info("cannot import %s: %s", module, exc)
        return None
