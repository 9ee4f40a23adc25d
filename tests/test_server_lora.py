"""LoRA inputs through the real Cog server on the tiny model: sources, scales, two at once, switching."""

import base64
import io
import tarfile

import pytest
import torch
from http_fixture import FixtureServer
from lora_fixtures import known_update, save, to_kohya, to_peft
from test_lora_sources import hf_repo

from toys.tiny import build_transformer

pytestmark = pytest.mark.server
PRIVATE_TOKEN = "hf_private_token_for_the_test_9876"
BASE = {
    "prompt": "a red circle",
    "model": "schnell",
    "num_inference_steps": 2,
    "megapixels": "0.25",
    "seed": 11,
    "output_format": "png",
}


def block_shapes() -> dict[str, tuple[int, int]]:
    transformer = build_transformer(guidance_embeds=False)
    return {
        name: tuple(module.weight.shape)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name
    }


def tar_of(name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    shapes = block_shapes()
    a = save(folder / "a.safetensors", *to_peft(known_update(shapes, rank=4, alpha=4.0, seed=1, std=0.4)))
    b = save(folder / "b.safetensors", *to_kohya(known_update(shapes, rank=2, alpha=1.0, seed=2, std=0.4)))
    sdxl = save(
        folder / "sdxl.safetensors",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        },
    )
    return {"a": a, "b": b, "sdxl": sdxl}


@pytest.fixture(scope="module")
def files_server(lora_files):
    server = FixtureServer().start()
    server.add("/a.safetensors", lora_files["a"].read_bytes())
    server.add("/b.safetensors", lora_files["b"].read_bytes())
    server.add("/sdxl.safetensors", lora_files["sdxl"].read_bytes())
    server.add("/trained.tar", tar_of("output/lora.safetensors", lora_files["a"].read_bytes()))
    server.add("/model.bin", b"\x80\x04\x95 pickle")
    # A private Hugging Face repo holding LoRA a, readable only with PRIVATE_TOKEN.
    hf_repo(
        server,
        "alice/private",
        {"lora.safetensors": lora_files["a"].read_bytes()},
        require_auth=f"Bearer {PRIVATE_TOKEN}",
    )
    server.routes["/hf/api/models/alice/private/revision/main"].require_auth = f"Bearer {PRIVATE_TOKEN}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tiny_env, tmp_path_factory, files_server):
    from cog_local import cog_server
    from conftest import CogClient

    folder = tmp_path_factory.mktemp("lora-server")
    env = {**tiny_env, "FLUX_LORA_CACHE_DIR": str(folder / "cache"), "HF_ENDPOINT": files_server.url("/hf")}
    env.pop("HF_TOKEN", None)
    with cog_server("predict", env=env, log_path=folder / "server.log") as url:
        yield CogClient(url, folder / "server.log")


def image(server, **inputs) -> str:
    result = server.predict(**{**BASE, **inputs})
    assert result["status"] == "succeeded", result.get("error")
    return result["output"][0]


def test_lora_changes_the_output_and_scale_zero_is_the_base(server, files_server):
    base = image(server)
    with_a = image(server, lora_weights=files_server.url("/a.safetensors"))
    assert with_a != base
    assert image(server, lora_weights=files_server.url("/a.safetensors")) == with_a
    assert image(server, lora_weights=files_server.url("/a.safetensors"), lora_scale=0) == base
    assert image(server, lora_weights=files_server.url("/a.safetensors"), lora_scale=0.5) not in (
        base,
        with_a,
    )


def test_trained_tar_as_replicate_weights_and_data_url(server, files_server, lora_files):
    with_a = image(server, lora_weights=files_server.url("/a.safetensors"))
    assert image(server, replicate_weights=files_server.url("/trained.tar")) == with_a
    data = "data:application/octet-stream;base64," + base64.b64encode(lora_files["a"].read_bytes()).decode()
    assert image(server, lora_weights=data) == with_a


def test_two_loras_apply_together(server, files_server):
    a, b = files_server.url("/a.safetensors"), files_server.url("/b.safetensors")
    only_a = image(server, lora_weights=a)
    only_b = image(server, lora_weights=b)
    both = image(server, lora_weights=a, extra_lora=b, extra_lora_scale=0.7)
    assert len({only_a, only_b, both}) == 3
    assert image(server, lora_weights=a, extra_lora=b, extra_lora_scale=0) == only_a


def test_switching_does_not_drift(server, files_server):
    a, b = files_server.url("/a.safetensors"), files_server.url("/b.safetensors")
    base, first_a = image(server), image(server, lora_weights=a)
    for _ in range(3):
        image(server, lora_weights=b)
        assert image(server) == base
        assert image(server, lora_weights=a) == first_a


def test_an_unchanged_lora_is_not_downloaded_or_applied_again(server, files_server):
    url = files_server.url("/b.safetensors")
    image(server, lora_weights=url, lora_scale=1.25)
    hits = files_server.hits["/b.safetensors"]
    again = server.predict(**{**BASE, "lora_weights": url, "lora_scale": 1.25})
    assert again["status"] == "succeeded"
    assert "(cached)" in again["logs"] and "downloaded" not in again["logs"]
    assert "LoRAs on" not in again["logs"]  # the fuser saw the same set and changed nothing
    assert files_server.hits["/b.safetensors"] == hits


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("/sdxl.safetensors", "lora_weights: got"),
        ("/model.bin", "safetensors"),
        ("/missing.safetensors", "404"),
    ],
)
def test_a_bad_lora_fails_clearly_and_leaves_the_base_untouched(server, files_server, reference, expected):
    base = image(server)
    result = server.predict(**{**BASE, "lora_weights": files_server.url(reference)})
    assert result["status"] == "failed"
    assert expected in result["error"]
    assert image(server) == base


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"lora_scale": 3.5, "lora_weights": "x/y"}, "lora_scale: 3.5 is greater than the maximum of 3"),
        ({"extra_lora_scale": -2}, "extra_lora_scale: -2 is less than the minimum of -1"),
        ({"lora_weights": "a/b", "replicate_weights": "c/d"}, "replicate_weights: got 'c/d'"),
    ],
)
def test_bad_lora_inputs(server, inputs, expected):
    result = server.predict(**{**BASE, **inputs})
    assert result["status"] == "failed"
    assert expected in result["error"]


def test_hf_api_token_reads_a_private_repo_and_is_never_shown(server, files_server):
    with_a = image(server, lora_weights=files_server.url("/a.safetensors"))
    refused = server.predict(
        **{**BASE, "lora_weights": "hf:alice/private", "hf_api_token": "hf_wrong_token_1"}
    )
    assert refused["status"] == "failed" and "hf_api_token" in refused["error"]
    assert "hf_wrong_token_1" not in refused["error"]
    result = server.predict(
        **{**BASE, "lora_weights": "huggingface.co/alice/private", "hf_api_token": PRIVATE_TOKEN}
    )
    assert result["status"] == "succeeded", result.get("error")
    assert result["output"][0] == with_a
    assert PRIVATE_TOKEN not in result["logs"] and PRIVATE_TOKEN not in server.log_path.read_text()


def test_extra_lora_equal_to_the_main_one_is_applied_once(server, files_server):
    a = files_server.url("/a.safetensors")
    result = server.predict(**{**BASE, "lora_weights": a, "extra_lora": a})
    assert result["status"] == "succeeded"
    assert result["output"][0] == image(server, lora_weights=a)
    # extra_lora alone acts as the main LoRA, at its own scale.
    assert image(server, extra_lora=a, extra_lora_scale=0.5) == image(server, lora_weights=a, lora_scale=0.5)
