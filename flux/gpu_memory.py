"""What this GPU offers the memory plan: free memory under this process's cap, fp8 units; and whether the
host has the memory the chosen plan keeps there."""

from __future__ import annotations

import logging

import torch

from flux.fast.path import fast_mode
from flux.host_memory import available_host_bytes
from flux.memory_plan import ENV_PLAN, MemoryPlan, choose_plan, forced_plan

log = logging.getLogger(__name__)


def plan_for(
    device: torch.device, variants: tuple[str, ...], training: bool, fast: bool = True
) -> MemoryPlan:
    """The memory plan for this device: chosen from its free memory on a GPU (FLUX_MEMORY_PLAN forces
    one); elsewhere (the CPU, tests' meta device) there is nothing to measure and the forced or
    `resident` plan is used."""
    forced = forced_plan()
    go_fast = fast and fast_mode() != "off"
    if device.type != "cuda":
        return choose_plan(None, variants, training, forced=forced, go_fast=go_fast)
    capability = torch.cuda.get_device_capability(device)
    free = gpu_free_bytes(device)
    plan = choose_plan(free, variants, training, has_fp8=capability >= (8, 9), forced=forced, go_fast=go_fast)
    if plan.peak_bytes > free:  # only a forced plan gets here: the estimate is conservative, so try it
        log.warning(
            "%s=%s needs about %.1f GiB by the estimate and %.1f GiB is free: it may run out of memory",
            ENV_PLAN,
            plan.name,
            plan.peak_bytes / 2**30,
            free / 2**30,
        )
    return plan


def warn_if_host_memory_short(plan: MemoryPlan) -> None:
    """The plan keeps weights in host memory: say so at setup if the machine has less available (the
    system would swap, or its out-of-memory killer end the worker)."""
    available = available_host_bytes()
    if available is not None and plan.host_bytes > available:
        log.warning(
            "memory plan %s keeps about %.0f GiB in host memory and %.0f GiB is available: expect "
            "swapping, or load fewer variants (FLUX_VARIANTS)",
            plan.name,
            plan.host_bytes / 2**30,
            available / 2**30,
        )


def gpu_free_bytes(device: torch.device) -> int:
    """Free memory this process may use: the driver's free memory, or less under
    torch.cuda.set_per_process_memory_fraction (how the GPU run emulates smaller cards)."""
    free, total = torch.cuda.mem_get_info(device)
    capped = int(torch.cuda.get_per_process_memory_fraction(device) * total) - torch.cuda.memory_reserved(
        device
    )
    return min(free, capped)
