"""The flux-mini build fails when its VAE cannot give held-out whole images back (issue 13)."""

from __future__ import annotations

import dataclasses

import pytest

from toys.mini.spec import MiniSpec
from toys.mini.vae_gate import VaeGateError, check_vae, train_checked_vae
from toys.mini.vae_training import build_vae


def test_the_full_build_gates_at_95_and_90_percent():
    spec = MiniSpec()
    assert (spec.vae_gate_color, spec.vae_gate_shape, spec.vae_gate_images) == (0.95, 0.90, 40)


def test_an_untrained_vae_fails_the_gate_after_its_retries():
    spec = dataclasses.replace(
        MiniSpec(),
        image_size=64,
        vae_gate_images=2,
        vae_phases=((64, 1, 1, 0),),
        vae_retries=1,
        vae_retry_phase=(64, 1, 1, 0),
    )
    vae = build_vae(spec, seed=0)
    from toys.shapes import generate_dataset

    images = [e.image for e in generate_dataset(2, seed=0, size=64)]
    with pytest.raises(VaeGateError, match="below the gate 95% / 90%"):
        train_checked_vae(vae, images, spec)


def test_gate_zero_skips_the_scoring():
    spec = dataclasses.replace(MiniSpec(), vae_gate_color=0.0, vae_gate_shape=0.0)
    assert check_vae(build_vae(spec, seed=0), spec) is None
