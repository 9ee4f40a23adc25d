"""The real generation paths (flux/generate.py) with every model on the `meta` device.

No GPU here, and code that runs on CUDA must still be shown to keep its tensors on one device. `meta`
behaves like CUDA where it matters: it refuses any non-0-dim tensor from another device in an op (a
noise or timestep tensor made on the CPU and mixed with the latents fails), and it computes shapes
without values. load_flux puts every model on the one device, as on a GPU; the tokenizers, the CPU
noise generator (moved to the device by the pipeline) and the PIL images are the parts the real code
keeps on the host. Only the last step, tensor -> PIL (which needs values), is replaced: the VAE decode
itself still runs on meta.
"""

import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

import flux.fast.path as fast_path
from flux.fast.capability import FastSupport
from flux.fast.fp8 import Fp8Linear
from flux.generate import generate
from flux.loading import load_flux
from flux.request import build_request
from lora.apply import LoraFuser
from lora.formats import LoraUpdate

META = torch.device("meta")
SMALL = dict(megapixels="0.25", aspect_ratio="1:1", num_inference_steps=2, seed=1)


@pytest.fixture(scope="module")
def meta_models(offline_tiny_environment):
    """Both tiny variants loaded by load_flux onto meta (bf16, as on a GPU), go_fast not set up."""
    models = load_flux(("dev", "schnell"), device=META, dtype=torch.bfloat16, fast=False)
    on_meta = [models.vae, models.text_encoder, models.text_encoder_2, *models.transformers.values()]
    assert all(p.device == META for module in on_meta for p in module.parameters())
    return models


@pytest.fixture()
def decoded(monkeypatch):
    """Replace only tensor -> PIL (values needed): records what reached it, returns blank images."""
    seen: list[torch.Tensor] = []

    def postprocess(self, image, output_type="pil", do_denormalize=None):
        seen.append(image)
        return [Image.new("RGB", (image.shape[-1], image.shape[-2])) for _ in range(image.shape[0])]

    monkeypatch.setattr(VaeImageProcessor, "postprocess", postprocess)
    return seen


@pytest.fixture()
def fast_on_meta(meta_models, monkeypatch):
    """go_fast set up as on an H200 (fp8 copies, the real _scaled_mm path; not compiled: compiling on
    meta is tests/test_fast_compile.py's), removed again after the test."""
    monkeypatch.setattr(fast_path, "detect_fast_support", lambda device: FastSupport(True, "test GPU"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    previous = meta_models.fast
    meta_models.fast = fast_path.setup_fast(meta_models.transformers, META, mode="nocompile")
    assert set(meta_models.fast.transformers) == {"dev", "schnell"}
    yield meta_models
    for fast in meta_models.fast.transformers.values():
        fast.set_fast(False)
        for name, module in fast.linears.items():  # put the plain Linears back for the other tests
            parent, _, attr = name.rpartition(".")
            plain = torch.nn.Linear(module.in_features, module.out_features, device=META)
            plain.weight, plain.bias = module.weight, module.bias
            setattr(fast.transformer.get_submodule(parent), attr, plain)
    meta_models.fast = previous


def source_image(tmp_path, size=(320, 256)):
    path = tmp_path / "source.png"
    Image.new("RGB", size, (200, 40, 40)).save(path)
    return path


def mask_image(tmp_path, size=(320, 256)):
    path = tmp_path / "mask.png"
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    mask.save(path)
    return path


def check_decoded(seen, result, batch):
    assert len(seen) == 1
    assert seen[0].device == META and tuple(seen[0].shape) == (batch, 3, result.height, result.width)
    assert [image.size for image in result.images] == [(result.width, result.height)] * batch


@pytest.mark.parametrize("model", ["schnell", "dev"])
def test_txt2img_runs_on_one_device(meta_models, decoded, model):
    result = generate(meta_models, build_request(prompt="a red circle", model=model, num_outputs=2, **SMALL))
    check_decoded(decoded, result, batch=2)
    assert (result.width, result.height) == (512, 512)


def test_img2img_runs_on_one_device(meta_models, decoded, tmp_path):
    request = build_request(prompt="a red circle", model="dev", image=source_image(tmp_path), **SMALL)
    result = generate(meta_models, request)
    check_decoded(decoded, result, batch=1)
    assert (result.width, result.height) == (320, 256)


def test_inpainting_runs_on_one_device(meta_models, decoded, tmp_path):
    """One denoising step (2 steps at prompt_strength 0.5): between two steps diffusers' inpaint loop
    builds `torch.tensor([timesteps[i + 1]])`, which reads the value (a host sync on CUDA, impossible
    on meta). The masked blend, the source's VAE encode and its noising all still run on meta."""
    request = build_request(
        prompt="a red circle",
        model="schnell",
        image=source_image(tmp_path),
        mask=mask_image(tmp_path),
        num_outputs=2,
        prompt_strength=0.5,
        **SMALL,
    )
    result = generate(meta_models, request)
    check_decoded(decoded, result, batch=2)


@pytest.mark.parametrize("go_fast", [True, False])
def test_go_fast_with_a_fused_lora_runs_on_one_device(fast_on_meta, decoded, go_fast):
    """A LoRA fused into the meta weights (backups on meta too: values cannot leave meta), then a
    request with go_fast on (fp8 copies re-quantized after the fuse) or off."""
    models = fast_on_meta
    transformer = models.transformers["dev"]
    fast = models.fast.transformers["dev"]
    fuser = LoraFuser(transformer, backup_device=META)
    name = "single_transformer_blocks.0.proj_out"
    rows, cols = transformer.get_submodule(name).weight.shape
    lora = {name: LoraUpdate(down=torch.randn(4, cols), up=torch.randn(rows, 4), alpha=4.0)}  # CPU, as read
    ran_fp8 = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: ran_fp8.append(mod.use_fp8))
        for m in transformer.modules()
        if isinstance(m, Fp8Linear)
    ]
    try:
        fuser.set_loras([("a", lora, 1.0)])
        assert fast.linears[name].stale
        request = build_request(prompt="TOK", model="dev", go_fast=go_fast, **SMALL)
        result = generate(models, request)
        assert not fast.linears[name].stale if go_fast else fast.linears[name].stale
    finally:
        fuser.clear()
        for hook in hooks:
            hook.remove()
    check_decoded(decoded, result, batch=1)
    assert ran_fp8 and all(flag is go_fast for flag in ran_fp8)
