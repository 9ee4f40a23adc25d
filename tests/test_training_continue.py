"""Continuing a training from an earlier LoRA (training.continuation, the continue_from_lora input).

In-process on the tiny model: the adapter a continued training starts with computes exactly the
earlier file's update (any alpha, mixed ranks), and what it saves is that LoRA in this trainer's
layout. Through the Cog trainer: tests/test_training_server.py.
"""

import tarfile

import pytest
import torch
from lora_fixtures import known_update, save, to_kohya, to_kohya_diffusers_names, to_peft
from safetensors.torch import load

from errors import UserInputError
from lora.formats import read_lora_file
from tests.training_helpers import make_zip
from toys.tiny import build_transformer
from training.config import build_training_config
from training.continuation import load_starting_lora
from training.export import lora_metadata, save_lora_file
from training.job import run_training
from training.loop import ADAPTER_NAME, lora_adapter, lora_state_dict
from training.previews import PreviewSettings
from training.recipe import block_linear_names
from training.training_state import STATE_FILE
from weights.lora_cache import LoraCache


@pytest.fixture(scope="module")
def transformer():
    return build_transformer(guidance_embeds=True).requires_grad_(False)


def block_shapes(transformer) -> dict[str, tuple[int, int]]:
    return {
        name: tuple(m.weight.shape)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and name in set(block_linear_names(transformer))
    }


def adapter_delta(module: torch.nn.Module) -> torch.Tensor:
    down = module.lora_A[ADAPTER_NAME].weight.double()
    up = module.lora_B[ADAPTER_NAME].weight.double()
    return module.scaling[ADAPTER_NAME] * (up @ down)


@pytest.mark.parametrize("layout", ["peft, alpha 2 of rank 4", "kohya, fused qkv", "mixed ranks"])
def test_the_adapter_starts_as_the_earlier_lora_and_saves_it_back(transformer, tmp_path, layout):
    shapes = block_shapes(transformer)
    names = sorted(shapes)
    if layout.startswith("peft"):
        update = known_update(shapes, rank=4, alpha=2.0, seed=3)
        path = save(tmp_path / "earlier.safetensors", *to_peft(update))
    elif layout.startswith("kohya"):  # another trainer's file: BFL names, fused qkv, alpha per module
        update = known_update(shapes, rank=4, alpha=1.0, seed=4)
        path = save(tmp_path / "earlier.safetensors", *to_kohya(update))
    else:
        update = known_update(shapes, names[: len(names) // 2], rank=4, alpha=1.0, seed=4)
        update |= known_update(shapes, names[len(names) // 2 :], rank=2, alpha=2.0, seed=5)
        path = save(tmp_path / "earlier.safetensors", *to_kohya_diffusers_names(update))
    start = load_starting_lora(str(path), transformer, LoraCache(tmp_path / "cache", 10**9))
    with lora_adapter(transformer, start.rank, start.targets, seed=0, start=start.lora):
        modules = dict(transformer.named_modules())  # peft's LoRA layers in place of the Linears now
        for name, expected in start.lora.items():
            torch.testing.assert_close(
                adapter_delta(modules[name]), expected.delta().double(), rtol=1e-5, atol=1e-7
            )
        saved = lora_state_dict(transformer)
    config = build_training_config(lora_rank=start.rank, seed=1)
    metadata = lora_metadata(
        config, start.targets, 0, rank_pattern=start.rank_pattern, continued_from=(start.source, 7)
    )
    out = save_lora_file(saved, tmp_path / "continued.safetensors", metadata)
    again = read_lora_file(out, transformer)
    assert set(again) == set(start.lora)
    for name, expected in start.lora.items():  # the file holds fp16: equal to fp16 precision
        torch.testing.assert_close(again[name].delta(), expected.delta(), rtol=2e-3, atol=2e-4)
    assert metadata["continued_from"] == str(path) and metadata["continued_from_steps"] == "7"


def test_a_lora_of_another_family_or_no_lora_is_refused_naming_the_input(transformer, tmp_path):
    cache = LoraCache(tmp_path / "cache", 10**9)
    sdxl = save(
        tmp_path / "sdxl.safetensors",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        },
    )
    with pytest.raises(UserInputError, match="^continue_from_lora: "):
        load_starting_lora(str(sdxl), transformer, cache)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserInputError, match="^continue_from_lora: "):
        load_starting_lora(str(broken), transformer, cache)


# ---- whole trainings (training.job.run_training on the tiny models) ----

NO_PREVIEWS = PreviewSettings(count=0)


def lora_tensors(tar_path) -> dict[str, torch.Tensor]:
    with tarfile.open(tar_path) as tar:
        data = tar.extractfile("lora.safetensors").read()
        names = set(tar.getnames())
    return load(data), names


def test_600_plus_400_steps_are_1000_steps_exactly(tiny_models, tmp_path):
    """Scaled down: 6 steps with the state saved, continued for 4, against 10 in one go (same seed,
    images and inputs): the same LoRA tensors, bit for bit."""
    data = make_zip(tmp_path / "photos.zip")
    common = dict(
        lora_rank=2, resolution="256", seed=5, batch_size=2, optimizer="adamw", caption_dropout_rate=0.3
    )
    cache = LoraCache(tmp_path / "cache", 10**9)

    def train(steps: int, folder: str, **more) -> object:
        config = build_training_config(
            steps=steps, **common, **{k: v for k, v in more.items() if k == "save_training_state"}
        )
        return run_training(
            config,
            data,
            tmp_path / folder,
            models=tiny_models,
            previews=NO_PREVIEWS,
            continue_from_lora=more.get("continue_from_lora"),
            lora_cache=cache,
        )

    first = train(6, "first", save_training_state=True)
    (tmp_path / "first.tar").write_bytes(first.read_bytes())  # out of the output folder the next run empties
    continued = train(4, "continued", continue_from_lora=str(tmp_path / "first.tar"))
    whole = train(10, "whole")
    first_lora, first_names = lora_tensors(tmp_path / "first.tar")
    continued_lora, continued_names = lora_tensors(continued)
    whole_lora, _ = lora_tensors(whole)
    assert STATE_FILE in first_names and STATE_FILE not in continued_names
    assert continued_lora.keys() == whole_lora.keys()
    assert all(torch.equal(continued_lora[k], whole_lora[k]) for k in whole_lora)
    assert not all(torch.equal(first_lora[k], whole_lora[k]) for k in whole_lora)
    # Without the state (a plain LoRA file) it continues too, but not exactly.
    plain = tmp_path / "plain.safetensors"
    with tarfile.open(tmp_path / "first.tar") as tar:
        plain.write_bytes(tar.extractfile("lora.safetensors").read())
    approximate, _ = lora_tensors(train(4, "approximate", continue_from_lora=str(plain)))
    assert not all(torch.equal(approximate[k], whole_lora[k]) for k in whole_lora)
