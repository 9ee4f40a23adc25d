"""lora/apply.py on the tiny FLUX transformer: LoRAs change the output, every layout gives the same
output, two LoRAs add up, switching never drifts, unchanged requests cost nothing, failures leave the
model as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from errors import UserInputError
from lora.apply import LoraFuser
from lora.formats import LoraUpdate, convert_state_dict, read_lora_file
from tests import lora_fixtures as fx


@pytest.fixture(scope="module")
def inputs():
    return fx.fixed_inputs()


@pytest.fixture()
def model():
    return fx.tiny_transformer()


@pytest.fixture(scope="module")
def shapes():
    return fx.linear_names(fx.tiny_transformer())


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(model, saved) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def _lora(shapes, seed, **kw):
    return convert_state_dict(*fx.to_peft(fx.known_update(shapes, seed=seed, **kw)), shapes)


def test_a_lora_changes_the_output_and_scale_zero_is_the_base(model, inputs, shapes):
    base = fx.run(model, inputs)
    fuser = LoraFuser(model)
    assert fuser.set_loras([("a", _lora(shapes, seed=1), 1.0)])
    with_lora = fx.run(model, inputs)
    assert (with_lora - base).abs().max() > 1e-2
    assert fuser.set_loras([("a", _lora(shapes, seed=1), 0.0)])
    assert torch.equal(fx.run(model, inputs), base)
    assert fuser.active == ()


LAYOUTS = {
    "peft_no_prefix_metadata": lambda u: fx.to_peft(u, prefix="", alpha="metadata"),
    "peft_baked_alpha": lambda u: fx.to_peft(u, alpha="baked"),
    "kohya": fx.to_kohya,
    "kohya_diffusers_names": fx.to_kohya_diffusers_names,
    "bfl_lora_A": lambda u: fx.to_bfl(u, alpha=False),
    "comfyui_lora_down_alpha": lambda u: fx.to_bfl(u, names=("lora_down", "lora_up")),
    "xlabs": fx.to_xlabs,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_the_output_of_its_peft_form(layout, model, inputs, shapes, tmp_path):
    modules = fx.xlabs_modules(1, 2) if layout == "xlabs" else None  # XLabs covers attention only
    update = fx.known_update(shapes, modules=modules, rank=4, alpha=2.0, seed=3)  # alpha != rank
    peft_path = fx.save(tmp_path / "peft.safetensors", *fx.to_peft(update))
    other_path = fx.save(tmp_path / f"{layout}.safetensors", *LAYOUTS[layout](update))
    base = fx.run(model, inputs)
    fuser = LoraFuser(model)
    fuser.set_loras([("peft", read_lora_file(peft_path, model), 0.8)])
    expected = fx.run(model, inputs)
    fuser.set_loras([("other", read_lora_file(other_path, model), 0.8)])
    got = fx.run(model, inputs)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_peft_form_matches_diffusers_unfused_adapter(model, inputs, shapes):
    """Our fused reading of a PEFT file with alpha != rank == diffusers+peft running it as an adapter."""
    update = fx.known_update(shapes, rank=4, alpha=2.0, seed=4)
    sd, metadata = fx.to_peft(update, alpha="keys")
    reference = copy.deepcopy(model)
    LoraFuser(model).set_loras([("a", convert_state_dict(sd, metadata, shapes), 1.0)])
    network_alphas = {k: v.item() for k, v in sd.items() if k.endswith(".alpha")}
    weights = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    reference.load_lora_adapter(weights, prefix="transformer", network_alphas=network_alphas)
    torch.testing.assert_close(fx.run(model, inputs), fx.run(reference, inputs), atol=2e-5, rtol=1e-4)


def test_two_loras_match_the_combined_update_by_hand(model, inputs, shapes):
    update_a = fx.known_update(shapes, seed=5, rank=4, alpha=4.0)
    some = [n for n in sorted(shapes) if n.startswith("transformer_blocks.0.attn.")]  # a subset of A
    update_b = fx.known_update(shapes, modules=some, seed=6, rank=2, alpha=1.0)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in by_hand.named_modules():
            delta = torch.zeros_like(module.weight, dtype=torch.float64) if name in shapes else None
            if delta is None:
                continue
            if name in update_a:
                delta += 0.7 * update_a[name].delta()
            if name in update_b:
                delta -= 0.5 * update_b[name].delta()
            module.weight.copy_((module.weight.double() + delta).float())
    fuser = LoraFuser(model)
    lora_a = convert_state_dict(*fx.to_peft(update_a), shapes)
    lora_b = convert_state_dict(*fx.to_kohya(update_b), shapes)
    assert fuser.set_loras([("a", lora_a, 0.7), ("b", lora_b, -0.5)])
    torch.testing.assert_close(fx.run(model, inputs), fx.run(by_hand, inputs), atol=2e-6, rtol=1e-5)


def test_switching_twenty_times_never_drifts(inputs, shapes):
    """bf16 weights, where a subtract-to-unload would leave rounding residue after the first switch."""
    model = fx.tiny_transformer(dtype=torch.bfloat16)
    inputs = fx.fixed_inputs(dtype=torch.bfloat16)
    base_weights = _weights(model)
    base = fx.run(model, inputs)
    lora_a, lora_b = _lora(shapes, seed=7), _lora(shapes, seed=8)
    fuser = LoraFuser(model)
    fuser.set_loras([("a", lora_a, 1.0)])
    first_a = fx.run(model, inputs)
    assert not torch.equal(first_a, base)
    for _ in range(20):
        assert fuser.set_loras([("b", lora_b, 1.3)])
        assert not torch.equal(fx.run(model, inputs), first_a)
        assert fuser.set_loras([])
        assert torch.equal(fx.run(model, inputs), base)
        assert _same_weights(model, base_weights)
        assert fuser.set_loras([("a", lora_a, 1.0)])
        assert torch.equal(fx.run(model, inputs), first_a)
    fuser.clear()
    assert _same_weights(model, base_weights)


def test_an_unchanged_set_is_not_reapplied(model, shapes, monkeypatch):
    lora_a, lora_b = _lora(shapes, seed=9), _lora(shapes, seed=10)
    fuser = LoraFuser(model)
    calls = []
    original = LoraUpdate.add_to
    monkeypatch.setattr(LoraUpdate, "add_to", lambda self, *args: calls.append(1) or original(self, *args))
    assert fuser.set_loras([("a", lora_a, 1.0), ("b", lora_b, 0.5)])
    assert len(calls) == 2 * len(shapes)
    weight = model.proj_out.weight
    with torch.no_grad():
        weight[0, 0] = 123.0  # a sentinel: any restore or re-fuse would overwrite it
    calls.clear()
    assert not fuser.set_loras([("a", lora_a, 1.0), ("b", lora_b, 0.5)])
    assert not fuser.set_loras([("a", lora_a, 1.0), ("b", lora_b, 0.5), ("c", lora_b, 0.0)])  # 0 = absent
    assert calls == [] and weight[0, 0].item() == 123.0
    assert fuser.set_loras([("a", lora_a, 1.0), ("b", lora_b, 0.6)])  # a scale change is a change
    assert weight[0, 0].item() != 123.0 and len(calls) == 2 * len(shapes)
    fuser.clear()
    assert not fuser.set_loras([])


def test_the_backup_is_the_touched_modules_only(model, shapes):
    fuser = LoraFuser(model)
    fuser.set_loras([("a", _lora(shapes, seed=11, modules=["proj_out", "x_embedder"]), 1.0)])
    assert fuser.backup_bytes == (16 * 32 + 32 * 16) * 4


def test_a_failure_half_way_restores_the_base(model, inputs, shapes, monkeypatch):
    base_weights = _weights(model)
    lora_a, lora_b = _lora(shapes, seed=12), _lora(shapes, seed=13)
    fuser = LoraFuser(model)
    fuser.set_loras([("a", lora_a, 1.0)])
    first_a = fx.run(model, inputs)
    calls = []
    original = LoraUpdate.add_to

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args)

    monkeypatch.setattr(LoraUpdate, "add_to", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        fuser.set_loras([("b", lora_b, 1.0)])
    assert _same_weights(model, base_weights)
    assert fuser.active == ()
    monkeypatch.setattr(LoraUpdate, "add_to", original)
    assert fuser.set_loras([("a", lora_a, 1.0)])
    assert torch.equal(fx.run(model, inputs), first_a)


def test_a_lora_for_another_model_is_refused_before_touching_weights(model, shapes):
    fuser = LoraFuser(model)
    fuser.set_loras([("a", _lora(shapes, seed=14), 1.0)])
    with_a = _weights(model)
    bad = {"transformer_blocks.0.attn.to_q": LoraUpdate(torch.zeros(2, 64), torch.zeros(64, 2), 2.0)}
    with pytest.raises(ValueError, match=r"does not fit transformer_blocks\.0\.attn\.to_q"):
        fuser.set_loras([("a", _lora(shapes, seed=14), 1.0), ("bad", bad, 1.0)])
    assert _same_weights(model, with_a) and fuser.active == (("a", 1.0),)


def test_bad_files_fail_before_the_model_is_touched(model, inputs, shapes, tmp_path):
    """The request path: read (validates everything), then fuse. A bad file leaves the model as it was."""
    base_weights = _weights(model)
    fuser = LoraFuser(model)
    sdxl = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4),
    }
    wrong_shape = {
        "transformer.proj_out.lora_A.weight": torch.randn(4, 64),
        "transformer.proj_out.lora_B.weight": torch.randn(16, 4),
    }
    for name, sd in (("sdxl.safetensors", sdxl), ("wrong_shape.safetensors", wrong_shape)):
        path = fx.save(tmp_path / name, sd)
        with pytest.raises(UserInputError, match=name):
            fuser.set_loras([("x", read_lora_file(path, model), 1.0)])
        assert _same_weights(model, base_weights)
    # and a working LoRA still applies afterwards
    assert fuser.set_loras([("a", _lora(shapes, seed=15), 1.0)])
    assert not _same_weights(model, base_weights)


def test_same_lora_twice_adds_its_scales(model, inputs, shapes):
    lora = _lora(shapes, seed=16)
    fuser = LoraFuser(model)
    fuser.set_loras([("a", lora, 1.0)])
    once = fx.run(model, inputs)
    fuser.set_loras([("a", lora, 0.5), ("a", lora, 0.5)])
    torch.testing.assert_close(fx.run(model, inputs), once, atol=2e-6, rtol=1e-5)
