"""Step caching (step_cache, flux/fast/step_cache.py) on the committed flux-mini, through generate().

Block forwards are counted by a pre-hook on every transformer block, not taken from cache-dit's own
statistics, and compared with the report generate() returns. Images are compared byte for byte where
nothing may change (a request without caching after one with it) and by PSNR where caching may change a
little. The levels' measured figures (40 prompts, both variants) are in bench/RESULTS.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_fast_compile import CountingBackend
from test_flux_mini_draws import WEIGHTS, committed

import flux.fast.path as fast_path
from errors import UserInputError
from flux.fast.capability import FastSupport
from flux.fast.step_cache import LEVELS, STEP_CACHE_LEVELS
from flux.generate import generate
from flux.request import build_request
from toys.mini import quality

PROMPT = "a small red circle on a white background"
BLOCKS = 6  # flux-mini: 2 double + 4 single blocks


@pytest.fixture(scope="module")
def models():
    committed()
    from flux.loading import load_flux

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLUX_WEIGHTS_DIR", str(WEIGHTS))
        yield load_flux(("dev", "schnell"), device=torch.device("cpu"))


@pytest.fixture
def counter(models):
    counter = quality.BlockCounter(models.transformers["dev"])
    yield counter
    counter.remove()


def draw(models, level: str, **inputs):
    inputs = dict(prompt=PROMPT, model="dev", aspect_ratio="custom", width=256, height=256, seed=7) | inputs
    return generate(models, build_request(output_format="png", step_cache=level, **inputs))


def pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index]).astype(np.float64)


def test_each_level_skips_more_block_forwards_and_counts_them_right(models, counter):
    off = draw(models, "off")
    assert off.step_cache is None and counter.take() == 28 * BLOCKS
    skipped = []
    for level in LEVELS:
        result = draw(models, level)
        report = result.step_cache
        assert report.steps == 28 and report.blocks == BLOCKS
        assert counter.take() == report.block_forwards  # what ran is what the report says
        skipped.append(report.skipped_share)
        assert quality.psnr(pixels(result), pixels(off)) > 25, level
    # Measured on this prompt: see bench/RESULTS.md; each level skips more than the one before.
    assert 0 < skipped[0] < skipped[1] < skipped[2]
    assert skipped[1] >= 0.35  # the recommended level: at least 35 % of dev's block forwards skipped


def test_a_request_without_caching_after_one_with_it_gives_the_uncached_bytes(models):
    transformer = models.transformers["dev"]
    before = dict(vars(transformer))
    first = draw(models, "off").images[0].tobytes()
    draw(models, "strong")
    assert dict(vars(transformer)).keys() == before.keys()  # cache-dit's patched forward and hooks are gone
    assert "forward" not in vars(transformer)
    assert draw(models, "off").images[0].tobytes() == first


@pytest.mark.slow  # ~13 s: `./run.sh test -m slow`
def test_the_cache_follows_the_request_steps_img2img_inpainting_and_batches(models, counter, tmp_path):
    report_steps = draw(models, "medium", num_inference_steps=12).step_cache
    counter.take()
    result = draw(models, "medium", num_inference_steps=12)
    assert result.step_cache.steps == 12 and counter.take() == result.step_cache.block_forwards
    assert report_steps.cached_steps == result.step_cache.cached_steps  # a fresh cache every request

    source = tmp_path / "source.png"
    draw(models, "off").images[0].save(source)
    mask = tmp_path / "mask.png"
    canvas = Image.new("L", (256, 256), 0)
    canvas.paste(255, (64, 64, 192, 192))
    canvas.save(mask)
    counter.take()
    for extra, steps in (
        (dict(image=source, prompt_strength=0.5), 14),  # img2img: 28 steps at strength 0.5 run 14
        (dict(image=source, mask=mask, prompt_strength=0.75), 21),
    ):
        uncached = draw(models, "off", prompt="a small blue square on a white background", **extra)
        assert counter.take() == steps * BLOCKS
        cached = draw(models, "medium", prompt="a small blue square on a white background", **extra)
        assert cached.step_cache.steps == steps
        assert counter.take() == cached.step_cache.block_forwards < steps * BLOCKS
        assert quality.psnr(pixels(cached), pixels(uncached)) > 25

    batch = draw(models, "medium", num_outputs=2, seed=11)
    assert len(batch.images) == 2 and batch.step_cache.cached_steps > 0
    assert counter.take() == batch.step_cache.block_forwards  # one forward per step for the whole batch


@pytest.mark.slow  # ~8 s: `./run.sh test -m slow`
def test_a_lora_switch_never_reuses_a_cache_built_under_other_weights(models, tmp_path):
    from lora.apply import LoraFuser
    from tests.lora_fixtures import known_update, linear_names, save, to_peft

    transformer = models.transformers["dev"]
    shapes = linear_names(transformer)
    blocks = [name for name in shapes if "transformer_blocks" in name]
    files = {}
    for seed in (1, 2):
        sd, metadata = to_peft(known_update(shapes, blocks, rank=4, std=0.05, seed=seed))
        files[seed] = save(tmp_path / f"lora-{seed}.safetensors", sd, metadata)
    from lora.formats import read_lora_file

    fuser = LoraFuser(transformer)
    try:
        fuser.set_loras([("b", read_lora_file(files[2], transformer), 1.0)])
        b_alone = draw(models, "medium").images[0].tobytes()
        fuser.set_loras([("a", read_lora_file(files[1], transformer), 1.0)])
        a = draw(models, "medium").images[0].tobytes()
        fuser.set_loras([("b", read_lora_file(files[2], transformer), 1.0)])
        b_after_a = draw(models, "medium").images[0].tobytes()
    finally:
        fuser.clear()
    assert a != b_alone
    assert b_after_a == b_alone


@pytest.mark.slow  # ~30 s of compiling: `./run.sh test -m slow`
def test_cached_steps_run_go_fasts_compiled_blocks_and_compile_nothing_new(models, monkeypatch):
    """go_fast set up for real on the CPU (fp8 copies, blocks compiled with aot_eager, counted): a cached
    request runs its computed blocks through the compiled graphs, skips the rest, adds no graph, and the
    next uncached go_fast request gives its bytes again."""
    torch._dynamo.reset()
    backend = CountingBackend()
    monkeypatch.setattr(fast_path, "detect_fast_support", lambda device: FastSupport(True, "test GPU"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    previous = models.fast
    transformer = models.transformers["schnell"]
    try:
        models.fast = fast_path.setup_fast(
            {"schnell": transformer},
            torch.device("cpu"),
            {"schnell": 256},
            mode="auto",
            warmup_shapes=((256, 256, 1),),
            compile_options=dict(backend=backend),
        )
        inputs = dict(model="schnell", num_inference_steps=8, go_fast=True)
        fast_uncached = draw(models, "off", **inputs)
        graphs, calls = len(backend.graphs), backend.calls
        assert calls > 0
        cached = draw(models, "strong", **inputs)
        assert cached.step_cache.cached_steps > 0
        assert backend.calls - calls == cached.step_cache.block_forwards  # every block that ran, compiled
        assert len(backend.graphs) == graphs
        assert quality.psnr(pixels(cached), pixels(fast_uncached)) > 25
        assert draw(models, "off", **inputs).images[0].tobytes() == fast_uncached.images[0].tobytes()
    finally:
        fast = models.fast.transformers.get("schnell")
        if fast is not None:
            fast.set_fast(False)
            for name, module in fast.linears.items():  # the plain Linears back for the other tests
                parent, _, attr = name.rpartition(".")
                plain = torch.nn.Linear(module.in_features, module.out_features)
                plain.weight, plain.bias = module.weight, module.bias
                setattr(transformer.get_submodule(parent), attr, plain)
        models.fast = previous
        torch._dynamo.reset()


@pytest.mark.parametrize("value", ["fast", "", "ON", None, 1])
def test_an_unknown_level_is_refused_naming_the_input(value):
    with pytest.raises(UserInputError, match="step_cache") as error:
        build_request(prompt="x", step_cache=value)
    assert ", ".join(STEP_CACHE_LEVELS) in str(error.value)


def test_a_request_that_fails_mid_way_still_takes_the_cache_off(models):
    from flux.fast.step_cache import step_caching

    transformer = models.transformers["dev"]
    before = dict(vars(transformer))
    with pytest.raises(RuntimeError, match="cancelled"):
        with step_caching(transformer, "medium", 28):
            assert getattr(transformer, "_is_cached", False)  # cache-dit is on inside
            raise RuntimeError("cancelled")
    assert dict(vars(transformer)) == before
