"""go_fast on the CPU: the fp8 rowwise math (emulated), the quality guard, LoRA refresh, the logged fallback."""

import logging

import pytest
import torch
from lora_fixtures import fixed_inputs, run, tiny_transformer

from errors import UserInputError
from flux.fast.capability import detect_fast_support
from flux.fast.fp8 import FP8, FP8_MAX, Fp8Linear, emulated_linear, fp8_linear, quantize_rowwise
from flux.fast.path import FastPath, setup_fast
from flux.fast.transformer import FastTransformer
from flux.generate import generate
from flux.request import build_request
from lora.apply import LoraFuser
from lora.formats import LoraUpdate

QUALITY_BAR = 0.03  # relative error of the fast transformer output per step (the guard)


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    fast, reference = fast.detach().float(), reference.detach().float()
    return float((fast - reference).norm() / reference.norm())


# ---- rowwise quantization ------------------------------------------------------------------------


def test_quantize_rowwise_maps_each_row_max_to_fp8_max_and_round_trips():
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6).unsqueeze(1)  # rows six decades apart
    x[2] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_rowwise(x)
    assert q.dtype == FP8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    row_max = q.float().abs().amax(dim=1)
    assert torch.equal(row_max[[0, 1, 3, 4, 5]], torch.full((5,), FP8_MAX))
    assert torch.equal(q[2].float(), torch.zeros(64))
    back = q.float() * scale
    for row in (0, 1, 3, 4, 5):  # e4m3 has 3 mantissa bits: under ~6 % per element, ~3 % per row
        assert relative_error(back[row], x[row]) < 0.04


def test_emulated_linear_is_the_dequantized_product():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 32), torch.randn(48, 32), torch.randn(48)
    qw, sw = quantize_rowwise(weight)
    out = emulated_linear(x, qw, sw.view(1, -1), bias)
    qx, sx = quantize_rowwise(x.reshape(10, 32))
    expected = (qx.float() * sx) @ (qw.float() * sw).t() + bias
    assert out.shape == (2, 5, 48)
    torch.testing.assert_close(out, expected.reshape(2, 5, 48), rtol=1e-6, atol=1e-6)
    assert 0 < relative_error(out, torch.nn.functional.linear(x, weight, bias)) < 0.05


def test_scaled_mm_path_matches_the_emulation():
    """The real kernel call (the pinned torch has a CPU _scaled_mm) against the float32 emulation."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(7, 64, dtype=torch.bfloat16), torch.randn(32, 64), torch.randn(32)
    qw, sw = quantize_rowwise(weight)
    bias = bias.to(torch.bfloat16)
    out = fp8_linear(x, qw, sw.view(1, -1), bias)
    reference = emulated_linear(x.float(), qw, sw.view(1, -1), bias.float())
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference) < 0.01


def test_bias_added_after_the_product_where_scaled_mm_refuses_it(monkeypatch):
    from flux.fast import fp8

    torch.manual_seed(1)
    x, weight = torch.randn(5, 32, dtype=torch.bfloat16), torch.randn(16, 32)
    bias = torch.randn(16).to(torch.bfloat16)
    qw, sw = quantize_rowwise(weight)
    fused = fp8_linear(x, qw, sw.view(1, -1), bias)
    monkeypatch.setattr(fp8, "FUSED_BIAS", False)
    separate = fp8_linear(x, qw, sw.view(1, -1), bias)
    without = fp8_linear(x, qw, sw.view(1, -1), None)
    assert relative_error(separate, fused) < 0.01
    assert relative_error(separate - without, bias.expand(5, 16)) < 0.02


# ---- Fp8Linear and FastTransformer ---------------------------------------------------------------


def test_fp8_linear_shares_the_master_weights_and_is_plain_linear_when_off():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    fast = Fp8Linear(linear, backend="emulate")
    assert fast.weight is linear.weight and fast.bias is linear.bias
    assert set(fast.state_dict()) == {"weight", "bias"}  # the fp8 copy is never saved
    x = torch.randn(3, 32)
    assert torch.equal(fast(x), linear(x))
    fast.use_fp8 = True
    assert not torch.equal(fast(x), linear(x))
    assert relative_error(fast(x), linear(x)) < 0.05


def test_fast_transformer_converts_block_linears_but_keeps_names_and_modulation():
    transformer = tiny_transformer()
    names_before = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    fast = FastTransformer(transformer, backend="emulate")
    names_after = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names_after == names_before  # LoRA targeting by name is unchanged
    assert fast.linears and all(
        n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in fast.linears
    )
    assert "transformer_blocks.0.attn.to_q" in fast.linears
    assert "single_transformer_blocks.1.proj_out" in fast.linears
    assert not any(n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) for n in fast.linears)
    weights = sum(m.weight.numel() for m in fast.linears.values())
    assert fast.fp8_bytes == weights + 4 * sum(m.out_features for m in fast.linears.values())


def test_memory_plan_counts_exactly_the_fp8_copies_that_are_made():
    """The plan (fp8_copy_bytes, at setup) and the copies (FastTransformer) use one target list; the old
    plan counted every Linear, modulation and embedders too, and refused copies that would fit."""
    from flux.fast.path import fp8_copy_bytes

    transformer = tiny_transformer()
    every_linear = sum(
        m.weight.numel() + 4 * m.out_features for m in transformer.modules() if type(m) is torch.nn.Linear
    )
    planned = fp8_copy_bytes(transformer)
    fast = FastTransformer(transformer, backend="emulate")
    allocated = sum(
        buffer.untyped_storage().nbytes() for m in fast.linears.values() for buffer in m.buffers()
    )
    assert planned == allocated == fast.fp8_bytes
    assert planned < every_linear


def test_quality_guard_emulated_fp8_within_3_percent_per_step():
    """The fast transformer against the float32 eager one on the same inputs, at each of 4 steps."""
    reference_model = tiny_transformer()
    fast_model = tiny_transformer()
    fast = FastTransformer(fast_model, backend="emulate")
    inputs = fixed_inputs()
    for t in (1.0, 0.75, 0.5, 0.25):
        step = {**inputs, "timestep": torch.tensor([t])}
        reference = run(reference_model, step)
        with fast.active(True):
            fast_out = run(fast_model, step)
        error = relative_error(fast_out, reference)
        assert 0 < error < QUALITY_BAR, f"step t={t}: relative error {error:.4f}"
        assert torch.equal(run(fast_model, step), reference)  # switched off again: the exact path


def test_lora_then_refresh_equals_quantizing_the_fused_weights_and_restore_comes_back():
    transformer = tiny_transformer()
    fast = FastTransformer(transformer, backend="emulate")
    fuser = LoraFuser(transformer)  # built after install, as in setup(): it sees the same Parameters
    base = {n: m.weight_fp8.clone() for n, m in fast.linears.items()}
    g = torch.Generator().manual_seed(3)
    targets = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"]
    lora = {}
    for name in targets:
        rows, cols = fast.linears[name].weight.shape
        lora[name] = LoraUpdate(
            down=torch.randn(4, cols, generator=g), up=torch.randn(rows, 4, generator=g), alpha=4.0
        )

    fuser.set_loras([("a", lora, 1.0)])
    assert sorted(n for n, m in fast.linears.items() if m.stale) == sorted(targets)
    assert fast.refresh_stale() == len(targets)
    for name, module in fast.linears.items():
        q, scale = quantize_rowwise(module.weight.detach())
        assert torch.equal(module.weight_fp8.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(module.weight_scale, scale.view(1, -1)), name
    assert not torch.equal(fast.linears[targets[0]].weight_fp8.float(), base[targets[0]].float())

    fuser.clear()  # the exact way back is the bf16 restore; the fp8 copies follow it
    with fast.active(True):  # entering a fast request refreshes what changed
        pass
    for name, module in fast.linears.items():
        assert torch.equal(module.weight_fp8.view(torch.uint8), base[name].view(torch.uint8)), name
    assert fast.refresh_stale() == 0


# ---- capability and fallback ---------------------------------------------------------------------


def test_cpu_is_not_fast_and_says_why():
    support = detect_fast_support(torch.device("cpu"))
    assert not support.available and "cpu" in support.reason


def test_gpu_without_fp8_is_not_fast_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    support = detect_fast_support(torch.device("cuda"))
    assert not support.available
    assert "A100" in support.reason and "sm_80" in support.reason and "sm_89" in support.reason


def test_setup_on_cpu_installs_nothing_and_logs_the_fallback_once(caplog):
    transformer = tiny_transformer()
    path = setup_fast({"dev": transformer}, torch.device("cpu"))
    assert path.transformers == {}
    assert not any(isinstance(m, Fp8Linear) for m in transformer.modules())
    with caplog.at_level(logging.INFO, logger="flux.fast.path"):
        for _ in range(3):
            with path.session("dev", go_fast=True) as fast:
                assert fast is False
        with path.session("dev", go_fast=False) as fast:
            assert fast is False
    lines = [r.getMessage() for r in caplog.records if "go_fast" in r.getMessage()]
    assert len(lines) == 1 and "standard bf16 path" in lines[0] and "cpu" in lines[0]


def test_session_switches_an_installed_transformer_per_request():
    transformer = tiny_transformer()
    path = FastPath(
        detect_fast_support(torch.device("cpu")), {"dev": FastTransformer(transformer, "emulate")}
    )
    modules = list(path.transformers["dev"].linears.values())
    with path.session("dev", go_fast=True) as fast:
        assert fast is True and all(m.use_fp8 for m in modules)
    assert not any(m.use_fp8 for m in modules)
    with path.session("dev", go_fast=False) as fast:
        assert fast is False and not any(m.use_fp8 for m in modules)


def test_go_fast_must_be_a_boolean():
    with pytest.raises(UserInputError, match="go_fast") as error:
        build_request(prompt="a cat", go_fast="yes")
    assert "true or false" in str(error.value)
    assert build_request(prompt="a cat").go_fast is True
    assert build_request(prompt="a cat", go_fast=False).go_fast is False


# ---- through generate() on the tiny model --------------------------------------------------------

SMALL = dict(model="schnell", megapixels="0.25", aspect_ratio="1:1", num_inference_steps=2, seed=5)


def image_bytes(result) -> list[bytes]:
    return [image.tobytes() for image in result.images]


def test_go_fast_on_cpu_gives_the_standard_path_bytes(tiny_models):
    fast = generate(tiny_models, build_request(prompt="a red circle", go_fast=True, **SMALL))
    standard = generate(tiny_models, build_request(prompt="a red circle", go_fast=False, **SMALL))
    assert image_bytes(fast) == image_bytes(standard)
    assert tiny_models.fast is not None and not tiny_models.fast.support.available


def test_repeated_prompt_reuses_embeddings_and_gives_identical_bytes(tiny_models):
    calls = []
    hooks = [
        encoder.register_forward_hook(lambda *_: calls.append(1))
        for encoder in (tiny_models.text_encoder, tiny_models.text_encoder_2)
    ]
    try:
        prompt = "a green triangle, embedding reuse test"
        first = generate(tiny_models, build_request(prompt=prompt, num_outputs=2, **SMALL))
        assert len(calls) == 2  # CLIP once, T5 once
        second = generate(tiny_models, build_request(prompt=prompt, num_outputs=2, **SMALL))
        assert len(calls) == 2  # no text encoder ran
        other = generate(tiny_models, build_request(prompt=prompt + "!", **SMALL))
        assert len(calls) == 4
    finally:
        for hook in hooks:
            hook.remove()
    assert len(first.images) == 2 and image_bytes(first) == image_bytes(second)
    assert image_bytes(other)[0] != image_bytes(first)[0]


def test_setup_skips_fp8_copies_that_would_not_leave_room_to_serve(monkeypatch, caplog):
    """A full GPU is not filled at setup (an out-of-memory worker leaves the server unhealthy for good)."""
    import flux.fast.path as fast_path
    from flux.fast.capability import FastSupport

    monkeypatch.setattr(fast_path, "detect_fast_support", lambda device: FastSupport(True, "test GPU"))
    needed = fast_path.fp8_copy_bytes(tiny_transformer()) + fast_path.HEADROOM_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (needed - 1, 80 * 2**30))
    crowded = tiny_transformer()
    with caplog.at_level(logging.WARNING, logger="flux.fast.path"):
        path = setup_fast({"dev": crowded}, torch.device("cpu"), mode="nocompile")
    assert path.transformers == {} and not any(isinstance(m, Fp8Linear) for m in crowded.modules())
    assert any("not set up for dev" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (needed, 80 * 2**30))
    roomy = tiny_transformer()
    assert set(setup_fast({"dev": roomy}, torch.device("cpu"), mode="nocompile").transformers) == {"dev"}
    assert any(isinstance(m, Fp8Linear) for m in roomy.modules())
