"""FLUX_MEMORY_PLAN through the real Cog server (the CPU plays the GPU: the plan's moves, swaps and
8-bit storage all run; tests/test_memory_plans_run.py shows the same code keeps one device on meta).

The swap plan draws what the resident plan draws (it only moves weights: on the CPU, copies at other
addresses may take other vector paths, so equal up to float rounding); under every plan a model's base
comes back bit for bit after any LoRA and model switches; the 8bit plan draws its own base.
"""

import io

import numpy as np
import pytest
from cog_local import cog_server
from http_fixture import FixtureServer
from lora_fixtures import known_update, to_peft
from PIL import Image
from safetensors.torch import save_file
from test_server_lora import block_shapes
from test_server_version import image_bytes

pytestmark = pytest.mark.server

CALL = {
    "prompt": "a red circle",
    "num_inference_steps": 2,
    "seed": 4,
    "megapixels": "0.25",
    "output_format": "png",
}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan-loras")
    files = FixtureServer().start()
    for name, seed in (("a", 31), ("b", 32)):
        state, _ = to_peft(known_update(block_shapes(), rank=4, alpha=4.0, seed=seed, std=0.4))
        save_file({k: v.contiguous() for k, v in state.items()}, folder / f"{name}.safetensors")
        files.add(f"/{name}.safetensors", (folder / f"{name}.safetensors").read_bytes())
    yield files
    files.stop()


def plan_server(plan: str, tiny_env, folder):
    from conftest import CogClient

    env = {**tiny_env, "FLUX_MEMORY_PLAN": plan, "FLUX_LORA_CACHE_DIR": str(folder / "cache")}
    return cog_server("predict", env=env, log_path=folder / "server.log"), CogClient


def max_pixel_difference(a: bytes, b: bytes) -> int:
    pixels = [np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in (a, b)]
    return int(np.abs(pixels[0] - pixels[1]).max())


def switches(client, files) -> list[bytes]:
    """dev, dev + a, schnell + b, dev + a + b, schnell, dev: models and LoRAs switching back and forth."""
    a, b = files.url("/a.safetensors"), files.url("/b.safetensors")
    calls = [
        dict(model="dev"),
        dict(model="dev", lora_weights=a),
        dict(model="schnell", lora_weights=b),
        dict(model="dev", lora_weights=a, extra_lora=b, extra_lora_scale=0.5),
        dict(model="schnell"),
        dict(model="dev"),
    ]
    return [image_bytes(client.predict(**CALL, **call)) for call in calls]


@pytest.mark.slow  # a second server with both tiny variants (~30 s); the meta and CPU tests cover swap too
def test_the_swap_plan_draws_what_the_resident_plan_draws(predict_server, lora_files, tiny_env, tmp_path):
    server, client_class = plan_server("swap", tiny_env, tmp_path)
    with server as url:
        swapped = switches(client_class(url, tmp_path / "server.log"), lora_files)
    assert swapped[0] == swapped[5]  # dev's base, exactly, after the switches
    for ours, resident in zip(swapped, switches(predict_server, lora_files), strict=True):
        assert max_pixel_difference(ours, resident) <= 2
    log = (tmp_path / "server.log").read_text()
    assert "memory plan swap: 1 transformer on the GPU, the other in host memory" in log
    assert "schnell moved to the GPU" in log and "dev back in host memory" in log


@pytest.mark.slow  # a server of its own (~30 s); the same switches run in-process in test_memory_plans_run.py
def test_the_8bit_plan_keeps_its_base_exact_across_switches(predict_server, lora_files, tiny_env, tmp_path):
    server, client_class = plan_server("8bit", tiny_env, tmp_path)
    with server as url:
        drawn = switches(client_class(url, tmp_path / "server.log"), lora_files)
    assert drawn[0] == drawn[5] and drawn[4] != drawn[0]  # dev's base, exactly, after the switches
    assert len(set(drawn[:4])) == 4  # each LoRA changes the image
    assert drawn[0] != image_bytes(predict_server.predict(**CALL, model="dev"))  # 8-bit weights: its own base
    log = (tmp_path / "server.log").read_text()
    assert "memory plan 8bit" in log and "block Linears in int8" in log  # no fp8 units on the CPU
    assert "T5 in host memory, moved in for the prompt" in log and "t5 moved to the GPU" in log


@pytest.mark.slow  # a server start that fails (~10 s); tests/test_memory_plan.py checks the message itself
def test_an_unknown_plan_fails_setup_naming_the_setting(tiny_env, tmp_path):
    server, _ = plan_server("offload", tiny_env, tmp_path)
    with pytest.raises(RuntimeError, match="setup failed") as failure:
        with server:
            pass
    message = str(failure.value) + (tmp_path / "server.log").read_text()
    assert "FLUX_MEMORY_PLAN" in message and "auto or one of: resident, swap, 8bit" in message


@pytest.mark.slow  # a trainer server of its own (~40 s)
def test_training_on_the_8bit_base_through_cog_gives_a_lora_predict_takes(predict_server, tiny_env, tmp_path):
    """FLUX_MEMORY_PLAN=8bit in the trainer (the 24 GB cards' plan): the tar's LoRA draws in predict
    (on the bf16 base) as a LoRA trained on the bf16 base does."""
    from cog_local import run_job
    from test_training_server import zip_data_url

    env = {**tiny_env, "FLUX_MEMORY_PLAN": "8bit", "LORA_PREVIEW_STEPS": "1"}
    inputs = {
        "input_images": zip_data_url(tmp_path),
        "steps": 4,
        "resolution": "256",
        "seed": 1,
        "learning_rate": 1e-2,
    }
    with cog_server("train", env=env, log_path=tmp_path / "train.log") as url:
        trained = run_job(url, "train", inputs, timeout=600)
    assert trained["status"] == "succeeded", trained.get("error")
    log = (tmp_path / "train.log").read_text()
    assert "memory plan 8bit" in log and "t5 moved to the GPU" in log and "t5 back in host memory" in log
    request = {**CALL, "model": "dev", "prompt": "a TOK square"}
    base = image_bytes(predict_server.predict(**request))
    with_lora = image_bytes(predict_server.predict(**request, lora_weights=trained["output"]["weights"]))
    assert with_lora != base
