"""The optimizers of the public FLUX LoRA trainer, by name, each from a well-kept library.

Settings follow that trainer (ai-toolkit's optimizer table), so a learning_rate means the same here:

- adamw, adam, adagrad: torch.optim (Adam family with eps 1e-6; AdamW weight decay 1e-2).
- adamw8bit, adam8bit, lion8bit: bitsandbytes (optimizer state in 8 bits). bitsandbytes runs on CUDA
  only; elsewhere, or when it cannot load, the 32-bit counterpart runs instead, and the log says so.
- lion: lion-pytorch's Lion (sign updates: usually 3-10x smaller learning rates than AdamW).
- adafactor: transformers' Adafactor with the given learning rate (no relative step, no parameter
  scaling), as the public trainer configures it.
- prodigy: prodigyopt's Prodigy, which estimates its own step size; learning_rate multiplies the
  estimate, and a value below 0.1 (such as the trainer's default 4e-4) means 1.0, as in the public trainer.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-2
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-6
# Prodigy's learning_rate is a multiplier on its own estimate; below this it is taken as 1.0.
PRODIGY_MIN_MULTIPLIER = 0.1
# AdamW-like optimizers diverge on FLUX.1 above this rate within a few steps; a Prodigy multiplier
# (~1.0) would blow AdamW up, so the no-prodigyopt fallback then uses the trainer default.
ADAMW_MAX_LR = 1e-2
ADAMW_FALLBACK_LR = 4e-4

Params = list[torch.nn.Parameter]


def _adamw(params: Params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)


def _adam(params: Params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=BETAS, eps=ADAM_EPS)


def _adagrad(params: Params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=lr)


def _adamw8bit(params: Params, lr: float) -> torch.optim.Optimizer:
    bnb = importlib.import_module("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)


def _adam8bit(params: Params, lr: float) -> torch.optim.Optimizer:
    return importlib.import_module("bitsandbytes").optim.Adam8bit(params, lr=lr, betas=BETAS, eps=ADAM_EPS)


def _lion8bit(params: Params, lr: float) -> torch.optim.Optimizer:
    return importlib.import_module("bitsandbytes").optim.Lion8bit(params, lr=lr)


def _lion(params: Params, lr: float) -> torch.optim.Optimizer:
    return importlib.import_module("lion_pytorch").Lion(params, lr=lr)


def _adafactor(params: Params, lr: float) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)


def _prodigy(params: Params, lr: float) -> torch.optim.Optimizer:
    prodigy = importlib.import_module("prodigyopt").Prodigy
    return prodigy(params, lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY, safeguard_warmup=True)


# name -> (builder, what runs instead when the builder's library cannot run here)
OPTIMIZER_TABLE: dict[str, tuple[Callable[[Params, float], torch.optim.Optimizer], str | None]] = {
    "adamw8bit": (_adamw8bit, "adamw"),
    "adamw": (_adamw, None),
    "adam8bit": (_adam8bit, "adam"),
    "adam": (_adam, None),
    "lion8bit": (_lion8bit, "lion"),
    "lion": (_lion, "adamw"),
    "adagrad": (_adagrad, None),
    "adafactor": (_adafactor, "adamw"),
    "prodigy": (_prodigy, "adamw"),
}
EIGHT_BIT = ("adamw8bit", "adam8bit", "lion8bit")  # bitsandbytes: CUDA only


def effective_learning_rate(name: str, learning_rate: float) -> float:
    """The rate the optimizer really gets (Prodigy: a multiplier, 1.0 when the given one is small)."""
    if name == "prodigy" and learning_rate < PRODIGY_MIN_MULTIPLIER:
        return 1.0
    return learning_rate


def build_optimizer(
    name: str, params: Params, learning_rate: float, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, name of the one really used); a fallback is logged as a warning."""
    params = list(params)
    if name not in OPTIMIZER_TABLE:
        raise ValueError(f"unknown optimizer {name!r}")  # TrainingConfig validated it already
    lr = effective_learning_rate(name, learning_rate)
    if lr != learning_rate:
        log.info("optimizer %s: learning_rate %g is taken as the multiplier %g", name, learning_rate, lr)
    builder, fallback = OPTIMIZER_TABLE[name]
    if name in EIGHT_BIT and device.type != "cuda":
        reason = f"8-bit optimizers need CUDA, not {device.type}"
    else:
        try:
            return builder(params, lr), name
        except Exception as exc:  # a missing or broken install (bitsandbytes without its CUDA library)
            if fallback is None:
                raise
            reason = f"{type(exc).__name__}: {exc}"
    if name == "prodigy":
        lr = learning_rate if learning_rate <= ADAMW_MAX_LR else ADAMW_FALLBACK_LR
    log.warning(
        "optimizer %s unavailable (%s): falling back to optimizer %s, lr %g", name, reason, fallback, lr
    )
    return build_optimizer(fallback, params, lr, device)
