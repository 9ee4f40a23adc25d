"""LoraManager on the tiny model: unchanged LoRAs cost nothing, and the choice rules."""

import logging

import pytest
import torch
from lora_fixtures import known_update, save, to_peft

from errors import UserInputError
from lora.serving import LoraChoice, LoraManager, choose_loras
from tests.http_fixture import fixture_server
from weights.lora_cache import LoraCache
from weights.lora_tokens import LoraTokens

__all__ = ["fixture_server"]


def test_an_unchanged_lora_is_not_read_or_fused_again(tiny_models, tmp_path):
    transformer = tiny_models.transformers["schnell"]
    shapes = {
        n: tuple(m.weight.shape)
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and "blocks." in n
    }
    path = save(tmp_path / "a.safetensors", *to_peft(known_update(shapes, seed=3)))
    manager = LoraManager({"schnell": transformer}, LoraCache(tmp_path / "cache", 10**9))
    base = {n: p.clone() for n, p in transformer.state_dict().items()}
    try:
        assert manager.activate("schnell", [LoraChoice("lora_weights", str(path), 1.0)]) is True
        assert manager.activate("schnell", [LoraChoice("lora_weights", str(path), 1.0)]) is False
        assert manager.files_read == 1
        assert manager.activate("schnell", [LoraChoice("lora_weights", str(path), 0.5)]) is True
        assert manager.files_read == 1  # a new scale re-fuses, but the file is not parsed again
    finally:
        manager.activate("schnell", [])
    assert all(torch.equal(base[n], p) for n, p in transformer.state_dict().items())


def test_activate_takes_the_request_tokens(tiny_models, tmp_path, fixture_server, monkeypatch):
    transformer = tiny_models.transformers["schnell"]
    shapes = {
        n: tuple(m.weight.shape)
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and "blocks." in n
    }
    body = save(tmp_path / "p.safetensors", *to_peft(known_update(shapes, seed=4))).read_bytes()
    fixture_server.add("/hf/alice/private/resolve/main/p.safetensors", body, require_auth="Bearer hf_mine")
    monkeypatch.setenv("HF_ENDPOINT", fixture_server.url("/hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    manager = LoraManager({"schnell": transformer}, LoraCache(tmp_path / "cache", 10**9))
    choice = LoraChoice("lora_weights", "alice/private/p.safetensors", 1.0)
    try:
        with pytest.raises(UserInputError, match="hf_api_token or HF_TOKEN"):
            manager.activate("schnell", [choice])
        assert manager.activate("schnell", [choice], tokens=LoraTokens(hf="hf_mine", civitai=None)) is True
    finally:
        manager.activate("schnell", [])


def test_choose_loras_rules():
    assert choose_loras(None, None, 1.0, None, 1.0) == []
    assert choose_loras("", "  ", 1.0, None, 1.0) == []
    assert choose_loras(None, "o/m", 0.5, "x/y", -1) == [
        LoraChoice("replicate_weights", "o/m", 0.5),
        LoraChoice("extra_lora", "x/y", -1.0),
    ]
    assert choose_loras("o/m", "o/m", 1, None, 1) == [LoraChoice("lora_weights", "o/m", 1.0)]
    with pytest.raises(UserInputError, match="lora_scale: got nan"):
        choose_loras("o/m", None, float("nan"), None, 1)
    with pytest.raises(UserInputError, match="extra_lora_scale: got 3.01"):
        choose_loras(None, None, 1, "x/y", 3.01)


def test_extra_lora_alone_is_the_main_lora_at_its_own_scale():
    assert choose_loras(None, None, 1.0, "x/y", 0.7) == [LoraChoice("extra_lora", "x/y", 0.7)]
    assert choose_loras("", None, 2.0, " x/y ", -0.5) == [LoraChoice("extra_lora", "x/y", -0.5)]


def test_extra_lora_equal_to_the_main_one_is_applied_once(caplog):
    with caplog.at_level(logging.WARNING, logger="lora.serving"):
        assert choose_loras("o/m", None, 0.8, " o/m", 1.5) == [LoraChoice("lora_weights", "o/m", 0.8)]
    assert "extra_lora o/m is the same LoRA as lora_weights" in caplog.text
    # Two spellings of one source count as the same LoRA.
    assert choose_loras(None, "hf:o/r", 1, "huggingface.co/o/r", 1) == [
        LoraChoice("replicate_weights", "hf:o/r", 1.0)
    ]
    assert len(choose_loras("o/m", None, 1, "o/other", 1)) == 2


def test_references_are_logged_short_and_without_tokens():
    from weights.lora_reference import display_reference

    assert display_reference("data:application/x-tar;base64," + "A" * 4096) == "data:application/x-tar (3 kB)"
    assert (
        display_reference("https://example.com/a.safetensors?token=secret")
        == "https://example.com/a.safetensors"
    )
    assert display_reference("owner/repo") == "owner/repo"


def test_a_trained_versions_lora_is_the_default_that_a_request_replaces_or_adds_to(tmp_path, caplog):
    from lora.serving import warn_if_trigger_missing
    from weights.version_lora import VersionLora

    version = VersionLora(
        tmp_path / "v.safetensors", "https://x/out.tar", "TOK", "black-forest-labs/FLUX.1-dev"
    )
    own = str(version.path)
    label = "this version's LoRA (https://x/out.tar)"
    assert choose_loras(None, None, 0.6, None, 1.0, version=version) == [
        LoraChoice("COG_WEIGHTS", own, 0.6, label)
    ]
    # A request's own LoRA replaces it; extra_lora adds to whichever is the main one.
    assert choose_loras("o/m", None, 1.0, None, 1.0, version=version) == [
        LoraChoice("lora_weights", "o/m", 1.0)
    ]
    assert choose_loras(None, "o/m", 1.0, None, 1.0, version=version)[0].field == "replicate_weights"
    assert choose_loras(None, None, 1.0, "x/y", 0.5, version=version) == [
        LoraChoice("COG_WEIGHTS", own, 1.0, label),
        LoraChoice("extra_lora", "x/y", 0.5),
    ]
    with caplog.at_level(logging.WARNING, logger="lora.serving"):
        warn_if_trigger_missing(
            "a photo of tok", choose_loras(None, None, 1, None, 1, version=version), version
        )
        assert "trigger word" not in caplog.text  # matched regardless of case
        warn_if_trigger_missing(
            "a photo of a dog", choose_loras("o/m", None, 1, None, 1, version=version), version
        )
        assert "trigger word" not in caplog.text  # not this version's LoRA: nothing to say
        warn_if_trigger_missing(
            "a photo of a dog", choose_loras(None, None, 1, None, 1, version=version), version
        )
    assert "does not contain 'TOK'" in caplog.text
