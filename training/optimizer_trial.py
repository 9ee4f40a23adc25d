"""One trial step of the chosen optimizer before training starts; AdamW if it cannot step here.

An optimizer can import and construct fine and still fail on its first step: bitsandbytes without a
CUDA library for this driver or card, a kernel for another architecture, out of memory for its state.
That would end a training after the dataset was cached (minutes of work, or a user's billed GPU
time), so the loop runs this first and trains with AdamW, with a warning, when the step fails.

The trial steps the real optimizer on the real parameters (gradients set to a throwaway constant),
then puts the parameter values and the optimizer back as they were. Chosen over a scratch parameter
because what fails is specific to the parameters: bitsandbytes keeps tensors under 4096 elements in
32-bit state and only larger ones reach its 8-bit kernels, and the state memory for all of them is
allocated on this first step. Rebuilding an arbitrary optimizer class for a scratch tensor also has
no general recipe (constructor arguments are not all in `defaults`). The cost is one copy of the
trainable parameters (LoRA: a few hundred MB at most) for the length of one step.
"""

from __future__ import annotations

import copy
import logging

import torch

from training.optimizers import build_optimizer

log = logging.getLogger(__name__)

TRIAL_GRADIENT = 1e-3  # any finite value: the step's result is thrown away
# The fallback AdamW takes the asked learning rate, except a multiplier meant for Prodigy (~1.0),
# which would blow AdamW up: then the common AdamW LoRA rate (training/optimizers.py's rule).
FALLBACK_MAX_LR = 1e-2
FALLBACK_LR = 4e-4


def checked_optimizer(
    optimizer: torch.optim.Optimizer,
    name: str,
    params: list[torch.nn.Parameter],
    learning_rate: float,
    device: torch.device,
) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, name): the one given if a trial step runs on these parameters, else AdamW."""
    if type(optimizer) is torch.optim.AdamW:
        return optimizer, name  # the fallback itself: nothing to fall back to
    try:
        trial_step(optimizer, params)
        return optimizer, name
    except Exception as exc:  # whatever it is, the training goes on with AdamW
        if device.type == "cuda":
            torch.cuda.empty_cache()  # return what the failed step allocated (trial_step dropped it)
        lr = learning_rate if learning_rate <= FALLBACK_MAX_LR else FALLBACK_LR
        log.warning(
            "optimizer %s failed its trial step on %s (%s: %s): falling back to optimizer adamw, "
            "learning_rate %g",
            name,
            device,
            type(exc).__name__,
            str(exc).splitlines()[0][:300] if str(exc) else "",
            lr,
        )
        fallback, _ = build_optimizer("adamw", params, lr, device)
        return fallback, "adamw"


def trial_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """optimizer.step() once; parameters, their gradients and the optimizer as before, even on failure."""
    values = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    # Hyperparameters and group-level state (Prodigy's d, schedule-free's weight sums) live in the
    # param groups; per-parameter state (moments, step counts) in optimizer.state, empty before step 1.
    groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
    state = {p: copy.deepcopy(s) for p, s in optimizer.state.items()}  # keys: the parameters themselves
    try:
        for p in params:
            p.grad = torch.full_like(p, TRIAL_GRADIENT)
        optimizer.step()
        if params and params[0].device.type == "cuda":
            torch.cuda.synchronize(params[0].device)  # a kernel fault shows here, not in training
    finally:
        with torch.no_grad():
            for p, value, grad in zip(params, values, grads, strict=True):
                p.copy_(value)
                p.grad = grad
        optimizer.state.clear()
        optimizer.state.update(state)
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group_params = group["params"]
            group.clear()  # a step may add keys (Prodigy: d_denom, d_hat) as well as change them (k)
            group.update(saved, params=group_params)
