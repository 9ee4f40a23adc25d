"""One attention-backend setting (cuDNN attention off) for serving, training and the benchmark.

The setting is a process-wide flag that exists on CPU builds of torch too, so these tests turn it
back on and check that each entry point turns it off before its work starts.
"""

import logging

import pytest
import torch

import flux.attention
from flux.attention import configure_attention_backends
from tests.training_helpers import SAMPLES, meta_transformer, synthetic_cache
from toys.tiny import SCHEDULERS
from training.config import build_training_config
from training.loop import train_parameters


@pytest.fixture
def cudnn_attention_on(monkeypatch):
    monkeypatch.setattr(flux.attention, "_logged", False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    configure_attention_backends()  # leave the process as production runs it


def test_configure_is_idempotent_and_logs_once(cudnn_attention_on, caplog):
    with caplog.at_level(logging.INFO, logger="flux.attention"):
        configure_attention_backends()
        torch.backends.cuda.enable_cudnn_sdp(True)  # something turned it back on
        configure_attention_backends()
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert caplog.text.count("cuDNN scaled-dot-product attention off") == 1


def test_training_turns_cudnn_attention_off(cudnn_attention_on):
    config = build_training_config(steps=3, seed=0, optimizer="adamw")
    seen = []
    transformer = meta_transformer()
    # What the backward pass would see: the flag as the first forward runs.
    transformer.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    params = [p.requires_grad_(True) for n, p in transformer.named_parameters() if n.startswith("proj_out")]
    train_parameters(transformer, params, synthetic_cache(SAMPLES), SAMPLES, config, SCHEDULERS["dev"])
    assert seen and not any(seen)


def test_serving_setup_turns_cudnn_attention_off(cudnn_attention_on, monkeypatch, tmp_path):
    import predict
    from weights.lora_cache import LoraCache

    seen = []
    # The flag must be off before the models are loaded (and stay off: setup changes it no more).
    monkeypatch.setattr(predict, "LoraManager", lambda *args: None)
    monkeypatch.setattr(predict, "default_lora_cache", lambda: LoraCache(tmp_path / "cache", 10**9))
    monkeypatch.setattr(predict.SafetyChecker, "load", staticmethod(lambda device: None))
    monkeypatch.setattr(predict, "load_flux", _recording_loader(seen))
    runner = predict.Runner()
    runner.setup()
    runner.outputs.release()
    assert seen == [False]


def _recording_loader(seen):
    class Models:
        transformers: dict = {}
        device = torch.device("cpu")
        placement = None  # what load_flux sets: no memory plan here

    def load(variants):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return Models()

    return load
