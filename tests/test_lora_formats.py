"""lora/formats.py: every accepted layout of one known update reads to that update; bad files fail clearly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_kohya_flux_lora_to_diffusers,
    _convert_xlabs_flux_lora_to_diffusers,
)

from errors import UserInputError
from lora.formats import convert_state_dict, linear_shapes, read_lora_file
from tests import lora_fixtures as fx


@pytest.fixture(scope="module")
def model():
    return fx.tiny_transformer()


@pytest.fixture(scope="module")
def shapes(model):
    return fx.linear_names(model)


def _assert_deltas(lora, update, tol=1e-6):
    assert sorted(lora) == sorted(update)
    for name, known in update.items():
        got = lora[name].delta().double()
        assert torch.allclose(got, known.delta(), atol=tol, rtol=0), name


WRITERS = {
    "peft_alpha_keys": lambda u: fx.to_peft(u, alpha="keys"),
    "peft_no_prefix_metadata": lambda u: fx.to_peft(u, prefix="", alpha="metadata"),
    "peft_baked_alpha": lambda u: fx.to_peft(u, alpha="baked"),
    "peft_lora_down_names": lambda u: fx.to_peft(u, names=("lora_down", "lora_up")),
    "kohya": fx.to_kohya,
    "kohya_diffusers_names": fx.to_kohya_diffusers_names,
    "bfl_lora_A": lambda u: fx.to_bfl(u, alpha=False),
    "comfyui_lora_down_alpha": lambda u: fx.to_bfl(u, names=("lora_down", "lora_up")),
}


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_every_layout_reads_to_the_known_update(layout, model, shapes, tmp_path):
    update = fx.known_update(shapes, rank=4, alpha=2.0)  # alpha != rank: the scale 0.5 must survive
    path = fx.save(tmp_path / f"{layout}.safetensors", *WRITERS[layout](update))
    _assert_deltas(read_lora_file(path, model), update)


def test_xlabs_reads_to_the_known_update(model, shapes, tmp_path):
    update = fx.known_update(shapes, modules=fx.xlabs_modules(1, 2), rank=3, alpha=3.0)
    path = fx.save(tmp_path / "xlabs.safetensors", *fx.to_xlabs(update))
    _assert_deltas(read_lora_file(path, model), update)


def test_kohya_alpha_scales_the_update(shapes):
    update = fx.known_update(
        shapes,
        modules=[
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k",
            "transformer_blocks.0.attn.to_v",
        ],
        rank=4,
        alpha=4.0,
    )
    sd, meta = fx.to_kohya(update)
    full = convert_state_dict(sd, meta, shapes)
    sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = (
        sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"] / 4
    )
    quarter = convert_state_dict(sd, meta, shapes)
    for name in update:
        assert torch.allclose(quarter[name].delta() * 4, full[name].delta(), atol=1e-6)
        assert not torch.allclose(quarter[name].delta(), full[name].delta())


def test_peft_metadata_alpha_pattern_and_rslora(shapes):
    q, k = "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"
    update = fx.known_update(shapes, modules=[q, k], rank=4, alpha=4.0)
    sd, _ = fx.to_peft(update, alpha="baked")  # scale 1 as stored: alpha 4 = rank 4
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8, "alpha_pattern": {"attn.to_k": 2}})}
    lora = convert_state_dict(sd, meta, shapes)
    assert torch.allclose(lora[q].delta(), 2 * update[q].delta().float(), atol=1e-6)
    assert torch.allclose(lora[k].delta(), 0.5 * update[k].delta().float(), atol=1e-6)
    meta = {
        "lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 4, "transformer.use_rslora": True})
    }
    lora = convert_state_dict(sd, meta, shapes)  # rsLoRA: alpha / sqrt(rank) = 2
    assert torch.allclose(lora[q].delta(), 2 * update[q].delta().float(), atol=1e-6)


def test_text_encoder_keys_are_dropped_with_one_log_line(model, shapes, tmp_path, caplog):
    update = fx.known_update(shapes, modules=["x_embedder"])
    sd, meta = fx.to_kohya(update)
    for i in range(3):  # 3 text-encoder modules, 3 tensors each
        key = f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj"
        sd |= {
            key + ".lora_down.weight": torch.zeros(2, 8),
            key + ".lora_up.weight": torch.zeros(8, 2),
            key + ".alpha": torch.tensor(2.0),
        }
    sd["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = torch.zeros(2, 8)
    sd["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = torch.zeros(8, 2)
    path = fx.save(tmp_path / "with_te.safetensors", sd, meta)
    with caplog.at_level(logging.INFO, logger="lora.formats"):
        lora = read_lora_file(path, model)
    assert sorted(lora) == ["x_embedder"]
    lines = [r.getMessage() for r in caplog.records if "text-encoder" in r.getMessage()]
    assert len(lines) == 1
    assert "dropped 11 text-encoder LoRA tensors (4 modules)" in lines[0]
    assert "transformer only" in lines[0] and "with_te.safetensors" in lines[0]


def test_only_text_encoder_keys_is_an_error(shapes):
    sd = {"lora_te1_x.lora_down.weight": torch.zeros(2, 8), "lora_te1_x.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(UserInputError, match="only text-encoder"):
        convert_state_dict(sd, {}, shapes)


def test_sdxl_lora_is_refused_with_a_clear_message(model, tmp_path):
    sd = {}
    for key in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out"):
        sd |= {
            key + ".lora_down.weight": torch.randn(4, 320),
            key + ".lora_up.weight": torch.randn(320, 4),
            key + ".alpha": torch.tensor(4.0),
        }
    path = fx.save(tmp_path / "sdxl_style.safetensors", sd)
    with pytest.raises(UserInputError) as err:
        read_lora_file(path, model, field="extra_lora")
    message = str(err.value)
    assert message.startswith("extra_lora: got 'sdxl_style.safetensors'")
    assert "no key matches a FLUX.1 transformer module" in message and "SDXL" in message


def test_shape_mismatch_names_the_module_and_both_shapes(model, tmp_path):
    sd = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 16),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4),
    }
    path = fx.save(tmp_path / "big.safetensors", sd)
    with pytest.raises(
        UserInputError,
        match=r"shape \(64, 16\), which does not fit "
        r"transformer_blocks\.0\.attn\.to_q \(32, 32\)",
    ):
        read_lora_file(path, model)


def test_fused_shape_mismatch_is_refused(shapes):
    sd = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, 32),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(96, 4),
    }  # q,k,v only: 96 != 224
    with pytest.raises(UserInputError, match=r"proj_mlp \(224, 32\)"):
        convert_state_dict(sd, {}, shapes)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 32)},
            "has no up weight",
        ),
        (
            {
                "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.randn(2, 32),
                "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.randn(32, 2),
            },
            "match no FLUX.1",
        ),
        ({"transformer.proj_out.lora_magnitude_vector": torch.randn(16)}, "DoRA"),
        ({"lora_unet_img_in.hada_w1_a": torch.randn(2, 2)}, "LoHa"),
        ({"diffusion_model.img_in.diff_b": torch.randn(32)}, "bias or full-weight difference"),
        ({"transformer.x_embedder.weird": torch.randn(2)}, "'transformer.x_embedder.weird'"),
    ],
)
def test_bad_keys_are_refused(shapes, extra, message):
    sd, meta = fx.to_peft(fx.known_update(shapes, modules=["proj_out"]))
    with pytest.raises(UserInputError, match=message):
        convert_state_dict(sd | extra, meta, shapes, source="bad.safetensors")


def test_zero_diff_tensors_are_ignored(shapes):
    update = fx.known_update(shapes, modules=["proj_out"])
    sd, meta = fx.to_peft(update)
    lora = convert_state_dict(sd | {"diffusion_model.img_in.diff_b": torch.zeros(32)}, meta, shapes)
    _assert_deltas(lora, update)


def test_a_pickle_file_is_refused_without_loading(model, tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(UserInputError, match="not a readable .safetensors file"):
        read_lora_file(path, model)


# ---- agreement with diffusers' own converters on FLUX.1's real shapes ---------------------------------


@pytest.fixture(scope="module")
def full_shapes():
    with torch.device("meta"):
        full = FluxTransformer2DModel()  # FLUX.1-dev's architecture, no memory
    return linear_shapes(full)


def _some_blocks(
    shapes,
    blocks=(
        "transformer_blocks.0.",
        "transformer_blocks.18.",
        "single_transformer_blocks.0.",
        "single_transformer_blocks.37.",
    ),
):
    return [n for n in shapes if n.startswith(blocks) or not n.startswith(("transformer_blocks.", "single_"))]


def _probe(up, down, scale, cols):
    """(scale * up @ down) @ probe, without forming the full-size matrix: cheap and, with a random
    probe, equal only when the updates are equal."""
    probe = torch.randn(cols, 3, generator=torch.Generator().manual_seed(cols), dtype=torch.float64)
    return scale * (up.double() @ (down.double() @ probe))


def _ours(lora):
    return {n: _probe(u.up, u.down, u.alpha / u.rank, u.shape[1]) for n, u in lora.items()}


def _known(update):
    return {n: _probe(k.up, k.down, k.alpha / k.down.shape[0], k.down.shape[1]) for n, k in update.items()}


def _diffusers(converted):
    out = {}
    for key, down in converted.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[name] = _probe(converted[key.replace(".lora_A.", ".lora_B.")], down, 1.0, down.shape[1])
    return out


# diffusers' kohya converter leaves the final layer's alpha out ("TODO: alphas" in its source): the two
# final-layer modules come out at alpha = rank. These modules are compared at that scale to show it.
_DIFFUSERS_IGNORES_ALPHA = {"proj_out", "norm_out.linear"}


def test_kohya_agrees_with_diffusers_converter_on_full_size(full_shapes):
    update = fx.known_update(full_shapes, modules=_some_blocks(full_shapes), rank=2, alpha=8.0, std=0.05)
    sd, meta = fx.to_kohya(update)
    ours = _ours(convert_state_dict(dict(sd), meta, full_shapes))
    theirs = _diffusers(_convert_kohya_flux_lora_to_diffusers(dict(sd)))
    known = _known(update)
    assert sorted(ours) == sorted(theirs) == sorted(update)
    for name in update:  # diffusers bakes alpha/rank into the weights; the product must match ours
        assert torch.allclose(ours[name], known[name], atol=1e-9), name
        factor = 4.0 if name in _DIFFUSERS_IGNORES_ALPHA else 1.0  # alpha / rank = 8 / 2
        assert torch.allclose(theirs[name] * factor, known[name], atol=1e-9), name


def test_xlabs_agrees_with_diffusers_converter_on_full_size(full_shapes):
    blocks = ("transformer_blocks.0.", "single_transformer_blocks.5.")
    modules = [m for m in fx.xlabs_modules(19, 38) if m.startswith(blocks)]
    update = fx.known_update(full_shapes, modules=modules, rank=2, alpha=2.0, std=0.05)
    sd, meta = fx.to_xlabs(update)
    ours = _ours(convert_state_dict(dict(sd), meta, full_shapes))
    theirs = _diffusers(_convert_xlabs_flux_lora_to_diffusers(dict(sd)))
    known = _known(update)
    assert sorted(ours) == sorted(theirs) == sorted(update)
    for name in update:
        assert torch.allclose(ours[name], known[name], atol=1e-9), name
        assert torch.allclose(theirs[name], known[name], atol=1e-9), name
