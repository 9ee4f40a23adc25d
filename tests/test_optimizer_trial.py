"""The optimizer's trial step before training: a failing optimizer becomes AdamW, a working one is
left exactly as built (training/optimizer_trial.py)."""

import logging

import pytest
import torch

from tests.training_helpers import SAMPLES, meta_transformer, synthetic_cache
from toys.tiny import SCHEDULERS
from training import loop
from training.config import build_training_config
from training.optimizer_trial import checked_optimizer

CPU = torch.device("cpu")


class FailsOnStep(torch.optim.SGD):
    """Like bitsandbytes without its CUDA library: builds fine, fails on the first step, after
    having changed a parameter already."""

    def step(self, closure=None):
        with torch.no_grad():
            self.param_groups[0]["params"][0].add_(1.0)
        self.state[self.param_groups[0]["params"][0]]["half-built"] = torch.zeros(1)
        raise RuntimeError("CUDA Setup failed despite GPU being available\nmore lines")


def parameters():
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(64, 80, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]


def test_an_optimizer_that_fails_its_step_falls_back_to_adamw(caplog):
    params = parameters()
    before = [p.detach().clone() for p in params]
    failing = FailsOnStep(params, lr=1e-4)
    with caplog.at_level(logging.WARNING):
        optimizer, used = checked_optimizer(failing, "adamw8bit", params, 1e-4, CPU)
    assert used == "adamw" and type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 1e-4
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))  # put back
    assert all(p.grad is None for p in params) and not failing.state
    assert "optimizer adamw8bit failed its trial step on cpu (RuntimeError: CUDA Setup failed" in caplog.text
    assert "falling back to optimizer adamw" in caplog.text


def test_a_prodigy_multiplier_is_not_given_to_the_fallback():
    params = parameters()
    optimizer, used = checked_optimizer(FailsOnStep(params, lr=1.0), "prodigy", params, 1.0, CPU)
    assert used == "adamw" and optimizer.param_groups[0]["lr"] == 4e-4


@pytest.mark.parametrize("name", ["prodigy", "adam-amsgrad"])
def test_a_working_optimizer_is_left_as_built(name):
    """After the trial, the first real step is the one a fresh optimizer takes, bit for bit (Prodigy
    keeps state in its param groups too)."""
    import prodigyopt

    def build(params):
        if name == "prodigy":
            return prodigyopt.Prodigy(params, lr=1.0, weight_decay=1e-2, safeguard_warmup=True)
        return torch.optim.Adam(params, lr=1e-3, amsgrad=True)

    tried, fresh = parameters(), parameters()
    optimizer, used = checked_optimizer(build(tried), name, tried, 1.0, CPU)
    assert used == name and not optimizer.state
    reference = build(fresh)

    def hyper(opt):
        return {k: v for k, v in opt.param_groups[0].items() if k != "params"}

    assert hyper(optimizer) == hyper(reference)  # Prodigy's step count k and d estimates too
    for _ in range(2):
        for opt, params in ((optimizer, tried), (reference, fresh)):
            for p in params:
                p.grad = p.detach() * 0.1 + 0.01
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(tried, fresh, strict=True))
    assert hyper(optimizer) == hyper(reference)


def test_the_loop_trains_with_the_fallback(monkeypatch, caplog):
    """Wired where the loop builds its optimizer: the run goes on and reports the optimizer used
    (on meta, the accelerator's stand-in, so the trial itself runs off the CPU too)."""
    monkeypatch.setattr(
        loop, "build_optimizer", lambda name, params, lr, device: (FailsOnStep(params, lr), name)
    )
    transformer = meta_transformer()
    params = [p.requires_grad_(True) for n, p in transformer.named_parameters() if n.startswith("proj_out")]
    config = build_training_config(steps=3, seed=0, optimizer="adamw8bit")
    with caplog.at_level(logging.WARNING):
        result = loop.train_parameters(
            transformer, params, synthetic_cache(SAMPLES), SAMPLES, config, SCHEDULERS["dev"]
        )
    assert result.optimizer == "adamw" and len(result.losses) == 3
    assert "optimizer adamw8bit failed its trial step on meta" in caplog.text
