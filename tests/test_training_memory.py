"""The automatic gradient-checkpointing rule, from the measured FLUX.1 step memory (training/memory.py)."""

import types

import pytest
import torch

from flux.full_size import TRANSFORMER
from toys.tiny import build_transformer
from training import loop
from training.buckets import Sample
from training.config import build_training_config
from training.memory import FLUX_WEIGHTS_GIB, activation_scale, needs_checkpointing, step_memory_gib

FLUX1 = types.SimpleNamespace(**TRANSFORMER)  # FLUX.1's architecture, as the memory plan counts it
CONTEXT_GIB = 0.5  # the CUDA context and torch's own buffers


def free_on(card_gib: float) -> float:
    """What is left for the step on a card once the bf16 FLUX.1 transformer is loaded."""
    return card_gib - FLUX_WEIGHTS_GIB - CONTEXT_GIB


@pytest.mark.parametrize(
    "card_gib, side, batch, checkpoint",
    [
        (80, 1024, 1, False),  # A100/H100 80 GB: the measured 56 GiB peak fits
        (80, 512, 1, False),
        (80, 512, 4, False),
        (80, 1024, 2, True),  # two 1024 samples: ~68 GiB of activations
        (48, 1024, 1, True),  # L40S / A6000: 56 GiB does not fit
        (48, 512, 1, False),  # the measured 34 GiB does
        (24, 512, 1, True),  # a 24 GB card barely holds the weights
        (24, 1024, 1, True),
        (141, 1024, 2, False),  # H200
        (141, 1024, 4, True),
    ],
)
def test_checkpointing_only_where_the_step_would_not_fit(card_gib, side, batch, checkpoint):
    megapixels = side * side / 1e6
    assert needs_checkpointing(free_on(card_gib), megapixels, batch) is checkpoint


def test_step_memory_reproduces_the_measured_peaks():
    # ../shared/GPU.md: 34 GiB at 512x512 and 56 GiB at 1024x1024, weights included, batch 1.
    assert FLUX_WEIGHTS_GIB + step_memory_gib(0.262144, 1) == pytest.approx(34, abs=0.3)
    assert FLUX_WEIGHTS_GIB + step_memory_gib(1.048576, 1) == pytest.approx(56, abs=0.3)


def test_activation_scale_is_one_for_flux1_and_small_for_the_tiny_model():
    assert activation_scale(FLUX1) == pytest.approx(1.0)
    assert activation_scale(build_transformer(True).config) < 1e-3


def test_the_loop_reads_free_memory_and_applies_the_rule(monkeypatch):
    """_use_checkpointing on a pretend CUDA device: free memory counts the allocator's unused cache."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 40 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 24 * gib)  # 36 GiB free in all
    transformer = types.SimpleNamespace(config=FLUX1)
    config = build_training_config(seed=0)
    cuda = torch.device("cuda")
    big, small = [Sample(0, 1024, 1024, 1024)], [Sample(0, 512, 512, 512)]
    assert loop._use_checkpointing(config, cuda, big, transformer) is True
    assert loop._use_checkpointing(config, cuda, small, transformer) is False
    assert loop._use_checkpointing(config, torch.device("cpu"), big, transformer) is False
    requested = build_training_config(seed=0, gradient_checkpointing=True)
    assert loop._use_checkpointing(requested, torch.device("cpu"), small, transformer) is True
