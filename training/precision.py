"""The precision of the training forward: bf16 math on a bf16 base, fp32 master weights.

The trained parameters are fp32 (updates of 1e-4 relative size vanish in bf16). Without autocast,
peft casts every LoRA layer's bf16 input to the fp32 of its weights and autograd keeps that copy for
backward: one fp32 copy per LoRA layer, +15-25 GB at 1024x1024 on FLUX.1. Under bf16 autocast the
LoRA matmuls run in bf16 (autocast casts the fp32 weights, once per forward); with peft's own input
cast off as well, a LoRA layer keeps the bf16 input its base layer already holds: no copy at all.
Gradients still land in fp32 on the fp32 parameters, and the optimizer updates those.

Two parts, because gradient-checkpoint recompute runs inside backward: torch.utils.checkpoint
restores the forward's autocast state there by itself, but peft's input cast is a flag on the
modules, so it stays off for the whole loop (forward and backward), not only around the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the frozen weights (the first parameter that is not a LoRA one)."""
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            return param.dtype
    return next(model.parameters()).dtype


def uses_bf16_autocast(model: torch.nn.Module) -> bool:
    """On a bf16 base where autocast exists for the device (CUDA, CPU; not meta). An fp32 base
    (the CPU tests' tiny model) trains in fp32, as before."""
    device = next(model.parameters()).device
    return base_dtype(model) == torch.bfloat16 and torch.amp.is_autocast_available(device.type)


def forward_precision(model: torch.nn.Module) -> AbstractContextManager:
    """Around each training forward: bf16 autocast where uses_bf16_autocast, else nothing."""
    if not uses_bf16_autocast(model):
        return nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def keep_lora_inputs_in_base_dtype(model: torch.nn.Module) -> Callable[[], None]:
    """Turn peft's cast of LoRA inputs to the LoRA weights' dtype off for the training loop, where
    every forward runs under autocast; returns the function that turns it back on (the previews
    after training run the adapter without autocast and need the cast)."""
    if not uses_bf16_autocast(model):
        return lambda: None
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    # peft before 0.15 has no such flag and always casts: autocast alone still halves the copy.
    previous = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False

    def restore() -> None:
        for layer, value in zip(layers, previous, strict=True):
            layer.cast_input_dtype_enabled = value

    return restore
