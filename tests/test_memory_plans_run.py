"""Generation and LoRA switches under every memory plan, with the GPU played by `meta`.

Like CUDA, meta refuses an op mixing its tensors with the host's: a component the plan keeps in host
memory that is not moved in for its stage, or one left behind after a swap, fails these tests. The
exactness of LoRA switches (values needed) is checked with the CPU playing the GPU.
"""

import pytest
import torch
from lora_fixtures import known_update, save, to_peft
from PIL import Image
from test_generate_meta import decoded

from flux.eight_bit import EightBitLinear, quantize_weight
from flux.generate import generate
from flux.loading import load_flux
from flux.memory_plan import choose_plan
from flux.request import build_request
from lora.apply import LoraFuser
from lora.formats import LoraUpdate
from lora.serving import LoraChoice, LoraManager
from weights.lora_cache import LoraCache

__all__ = ["decoded"]  # the fixture that replaces only tensor -> PIL

META = torch.device("meta")
CPU = torch.device("cpu")
SMALL = dict(megapixels="0.25", aspect_ratio="1:1", num_inference_steps=2, seed=1)
TINY_IMAGE = dict(aspect_ratio="custom", width=256, height=256)  # values on the CPU: the smallest size
# (plan, 8-bit storage where it applies): fp8 and int8 are both run (fp8 GPUs and older ones).
PLANS = [("resident", False), ("swap", False), ("8bit", True), ("8bit", False)]
IDS = ["resident", "swap", "8bit-fp8", "8bit-int8"]


def plan(name: str, fp8: bool, variants=("dev", "schnell")):
    return choose_plan(None, variants, has_fp8=fp8, forced=name)


def devices(module: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in [*module.parameters(), *module.buffers()]}


@pytest.fixture(scope="module", params=PLANS[1:], ids=IDS[1:])  # resident: tests/test_generate_meta.py
def meta_models(request, offline_tiny_environment):
    name, fp8 = request.param
    return load_flux(("dev", "schnell"), device=META, dtype=torch.bfloat16, fast=False, plan=plan(name, fp8))


@pytest.fixture()
def t5_devices(meta_models):
    """The device T5's weights were on each time it ran."""
    seen: list[set[torch.device]] = []
    hook = meta_models.text_encoder_2.register_forward_hook(lambda m, a, o: seen.append(devices(m)))
    yield seen
    hook.remove()


def test_setup_places_each_component_as_the_plan_says(meta_models):
    plan = meta_models.plan
    assert devices(meta_models.vae) == devices(meta_models.text_encoder) == {META}
    assert devices(meta_models.text_encoder_2) == ({META} if plan.t5_on_gpu else {CPU})
    assert devices(meta_models.transformers["dev"]) == {META}  # the first variant is on the GPU
    assert devices(meta_models.transformers["schnell"]) == ({META} if plan.name == "resident" else {CPU})
    eight_bit = [m for m in meta_models.transformers["dev"].modules() if isinstance(m, EightBitLinear)]
    assert bool(eight_bit) == plan.eight_bit
    for module in eight_bit:
        assert module.codes.dtype == (torch.float8_e4m3fn if plan.storage == "fp8" else torch.int8)
        assert module.original.device == CPU and module.original.dtype == torch.bfloat16


def test_txt2img_alternating_variants_runs_on_one_device(meta_models, decoded, t5_devices):
    """dev, schnell, dev, with new prompts: each swap leaves one transformer on the device under
    swap and 8bit, and T5 is moved in for each new prompt and out again under 8bit."""
    plan = meta_models.plan
    for number, model in enumerate(["dev", "schnell", "dev"]):
        result = generate(meta_models, build_request(prompt=f"a red circle {number}", model=model, **SMALL))
        assert (result.width, result.height) == (512, 512)
        other = "schnell" if model == "dev" else "dev"
        assert devices(meta_models.transformers[model]) == {META}
        assert devices(meta_models.transformers[other]) == ({META} if plan.name == "resident" else {CPU})
    assert t5_devices == [{META}] * 3  # T5 always ran on the device
    assert devices(meta_models.text_encoder_2) == ({META} if plan.t5_on_gpu else {CPU})
    assert [tuple(image.shape) for image in decoded] == [(1, 3, 512, 512)] * 3
    moves = meta_models.placement.moves
    generate(meta_models, build_request(prompt="a red circle 2", model="dev", **SMALL))
    assert meta_models.placement.moves == moves  # same prompt, same variant: nothing moves


def test_img2img_and_inpainting_run_on_one_device(meta_models, decoded, tmp_path):
    source, mask = tmp_path / "source.png", tmp_path / "mask.png"
    Image.new("RGB", (320, 256), (200, 40, 40)).save(source)
    Image.new("L", (320, 256), 255).save(mask)
    generate(meta_models, build_request(prompt="a blue square", model="schnell", image=source, **SMALL))
    generate(
        meta_models,
        build_request(
            prompt="a blue square", model="dev", image=source, mask=mask, prompt_strength=0.5, **SMALL
        ),
    )
    assert [tuple(image.shape) for image in decoded] == [(1, 3, 256, 320)] * 2


def test_lora_switches_across_swaps_run_on_one_device(meta_models, decoded):
    """A LoRA fused into dev, a request on schnell (dev swapped out: its fuser forgets), dev again
    with the LoRA (fused again, on the device) and without."""
    transformers, placement = meta_models.transformers, meta_models.placement
    fusers = {name: LoraFuser(t, backup_device=META) for name, t in transformers.items()}
    placement.on_evict.append(lambda name: fusers[name].forget_fused())
    name = "single_transformer_blocks.0.proj_out"
    module = transformers["dev"].get_submodule(name)
    lora = {
        name: LoraUpdate(
            down=torch.randn(4, module.in_features), up=torch.randn(module.out_features, 4), alpha=4.0
        )
    }
    changed = []
    try:
        for model, loras in [
            ("dev", [("a", lora, 1.0)]),
            ("schnell", []),
            ("dev", [("a", lora, 1.0)]),
            ("dev", []),
        ]:
            meta_models.transformer_for(build_request(prompt="x", model=model, **SMALL).variant)
            changed.append(fusers[model].set_loras(loras))
            generate(meta_models, build_request(prompt="TOK", model=model, **SMALL))
    finally:
        placement.on_evict.pop()
    # Swapped out in between (swap, 8bit): dev comes back as the base and the LoRA is fused again.
    assert changed == [True, False, meta_models.plan.swaps, True]
    assert devices(transformers["dev"]) == {META}
    assert len(decoded) == 4


# ---- exactness, with the CPU playing the GPU ----------------------------------------------------


@pytest.mark.parametrize(("name", "fp8"), PLANS, ids=IDS)
def test_no_lora_gives_the_plans_base_output_bit_for_bit(name, fp8, tmp_path, offline_tiny_environment):
    # float32, the CPU's own dtype (its bf16 convolutions take seconds per image); the GPU's bf16 path
    # is the same code, and the meta tests above run it in bf16.
    models = load_flux(("dev", "schnell"), device=CPU, fast=False, plan=plan(name, fp8))
    manager = LoraManager(models.transformers, LoraCache(tmp_path / "cache", 10**9), models.placement)
    shapes = {
        n: (m.out_features, m.in_features)
        for n, m in models.transformers["dev"].named_modules()
        if isinstance(m, torch.nn.Linear) and "blocks." in n
    }
    paths = [save(tmp_path / f"{i}.safetensors", *to_peft(known_update(shapes, seed=i))) for i in (1, 2)]

    def image(model: str, loras: list) -> bytes:
        manager.activate(model, [LoraChoice("lora_weights", str(p), scale) for p, scale in loras])
        request = build_request(
            prompt="a red circle", model=model, num_inference_steps=1, seed=3, megapixels="0.25"
        )
        return generate(models, request).images[0].tobytes()

    base_dev, base_schnell = image("dev", []), image("schnell", [])
    with_a = image("dev", [(paths[0], 1.0)])
    assert with_a != base_dev
    image("schnell", [(paths[1], 0.7)])
    assert image("dev", [(paths[0], 1.0), (paths[1], 0.5)]) != with_a
    assert image("dev", [(paths[0], 1.0)]) == with_a  # the same LoRA again: the same image
    assert image("schnell", []) == base_schnell
    assert image("dev", []) == base_dev
    # Swapped or 8-bit transformers restore from the host copies the plan keeps: no backup copies.
    backups = sum(fuser.backup_bytes for fuser in manager._fusers.values())
    assert (backups > 0) == (name == "resident")


def test_a_lora_under_eight_bit_is_fused_into_the_original_and_stored_again(offline_tiny_environment):
    """codes = quantize(bf16(original + delta)); restoring stores the original's own codes."""
    models = load_flux(
        ("dev",), device=CPU, dtype=torch.bfloat16, fast=False, plan=plan("8bit", True, ("dev",))
    )
    transformer = models.transformers["dev"]
    name = "transformer_blocks.0.ff.net.2"
    module = transformer.get_submodule(name)
    base_codes = module.codes.clone()
    update = LoraUpdate(
        down=torch.randn(4, module.in_features), up=torch.randn(module.out_features, 4), alpha=4.0
    )
    fuser = LoraFuser(transformer)
    fuser.set_loras([("a", {name: update}, 0.5)])
    expected = (module.original.float() + 0.5 * update.delta()).to(torch.bfloat16)
    codes, scale = quantize_weight(expected, "fp8")
    assert torch.equal(module.codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(module.scale, scale)
    assert fuser.backup_bytes == 0  # no copy: the original is already in host memory
    fuser.clear()
    assert torch.equal(module.codes.view(torch.uint8), base_codes.view(torch.uint8))


def test_go_fast_under_the_8bit_plan_runs_fp8_products_on_the_stored_codes(
    monkeypatch, decoded, offline_tiny_environment
):
    """On an fp8 GPU (support faked: meta runs the real _scaled_mm call's shapes), go_fast requests use
    the stored codes' fp8 product, across a swap; go_fast=false requests dequantize."""
    import flux.loading
    from flux.fast.capability import FastSupport

    monkeypatch.setattr(flux.loading, "detect_fast_support", lambda device: FastSupport(True, "test GPU"))
    models = load_flux(("dev", "schnell"), device=META, dtype=torch.bfloat16, plan=plan("8bit", True))
    assert set(models.fast.transformers) == {"dev", "schnell"}
    ran: list[bool] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: ran.append(mod.use_fp8))
        for t in models.transformers.values()
        for m in t.modules()
        if isinstance(m, EightBitLinear)
    ]
    try:
        for model, go_fast in [("dev", True), ("schnell", True), ("dev", False)]:
            ran.clear()
            generate(models, build_request(prompt="a red circle", model=model, go_fast=go_fast, **SMALL))
            assert ran and set(ran) == {go_fast}, (model, go_fast)
    finally:
        for hook in hooks:
            hook.remove()


def test_the_fp8_product_on_stored_codes_matches_the_dequantized_one():
    """The float32 emulation of the fp8 product (activations quantized per row) against the
    dequantized weight's product: close, as go_fast's fp8 copies are to bf16."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    module = EightBitLinear(linear, "fp8", CPU, CPU)
    x = torch.randn(4, 10, 256)
    plain = module(x)
    module.use_fp8, module.backend = True, "emulate"
    fast = module(x)
    assert fast.shape == plain.shape
    assert ((fast - plain).norm() / plain.norm()) < 0.05
