"""A trained version through the real Cog server: COG_WEIGHTS becomes every request's LoRA.

Replicate starts a trained version with COG_WEIGHTS set to the training's output tar; cog hands it
to setup(weights=...). The version must then answer the seed's call (the one Replicate's guides
show) with its LoRA, exactly as if the same LoRA had been sent as lora_weights, never with the
base model's image.
"""

import base64
import json

import pytest
import torch
from cog_local import cog_server
from http_fixture import FixtureServer
from lora_fixtures import known_update, to_peft
from test_server_lora import block_shapes

from training.export import LORA_FILE, save_lora_file, write_tar

pytestmark = pytest.mark.server

# The seed's call on a trained version, plus a seed (to compare images) and a size the tiny model
# draws quickly.
SEED_CALL = {
    "prompt": "a photo of TOK on a beach",
    "num_inference_steps": 28,
    "guidance_scale": 7.5,
    "model": "dev",
    "seed": 5,
    "megapixels": "0.25",
    "output_format": "png",
}
URL_TOKEN = "delivery_token_canary_5521"


def image_bytes(result: dict) -> bytes:
    assert result["status"] == "succeeded", result.get("error")
    return base64.b64decode(result["output"][0].partition(",")[2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tar in the trainer's layout (training/export.py), with its metadata, and a second LoRA."""
    folder = tmp_path_factory.mktemp("trained")
    shapes = block_shapes()
    state, _ = to_peft(known_update(shapes, rank=4, alpha=4.0, seed=21, std=0.4))
    state = {k: v.to(torch.float16) for k, v in state.items()}
    out = folder / "out"
    out.mkdir()
    metadata = {
        "trigger_word": "TOK",
        "base_model": "black-forest-labs/FLUX.1-dev",
        "rank": "4",
        "alpha": "4",
    }
    save_lora_file(state, out / LORA_FILE, metadata)
    (out / "config.json").write_text(json.dumps({"trigger_word": "TOK"}))
    tar = write_tar(out, folder / "trained_model.tar")
    other, _ = to_peft(known_update(shapes, rank=2, alpha=2.0, seed=22, std=0.4))
    save_lora_file(other, folder / "other.safetensors", {})
    files = FixtureServer().start()
    files.add("/trained_model.tar", tar.read_bytes())
    files.add("/other.safetensors", (folder / "other.safetensors").read_bytes())
    yield {"tar": tar, "files": files}
    files.stop()


@pytest.fixture(scope="module")
def version_server(trained, tiny_env, tmp_path_factory):
    """The server as Replicate starts a trained version: COG_WEIGHTS is the training output's URL
    (with a token in its query, which must never be shown)."""
    from conftest import CogClient

    url = trained["files"].url(f"/trained_model.tar?token={URL_TOKEN}")
    folder = tmp_path_factory.mktemp("version-server")
    env = {**tiny_env, "COG_WEIGHTS": url, "FLUX_LORA_CACHE_DIR": str(folder / "cache")}
    with cog_server("predict", env=env, log_path=folder / "server.log") as server_url:
        yield CogClient(server_url, folder / "server.log")


def test_the_seed_call_draws_with_the_versions_lora(version_server, predict_server, trained):
    drawn = image_bytes(version_server.predict(**SEED_CALL))
    tar_url = trained["files"].url("/trained_model.tar")
    as_input = image_bytes(predict_server.predict(**SEED_CALL, lora_weights=tar_url))
    base = image_bytes(predict_server.predict(**SEED_CALL))
    assert drawn == as_input
    assert drawn != base
    # Fetched once, at setup; requests do not download it again.
    assert trained["files"].hits["/trained_model.tar"] == 2  # the version's setup, the lora_weights request
    log = version_server.log_path.read_text()
    assert "COG_WEIGHTS: this version's LoRA is" in log and "trigger word 'TOK'" in log
    assert URL_TOKEN not in log


def test_a_requests_own_lora_replaces_the_versions_and_extra_lora_adds(
    version_server, predict_server, trained
):
    other = trained["files"].url("/other.safetensors")
    tar_url = trained["files"].url("/trained_model.tar")
    replaced = image_bytes(version_server.predict(**SEED_CALL, replicate_weights=other))
    assert replaced == image_bytes(predict_server.predict(**SEED_CALL, lora_weights=other))
    added = image_bytes(version_server.predict(**SEED_CALL, extra_lora=other, extra_lora_scale=0.5))
    both = predict_server.predict(**SEED_CALL, lora_weights=tar_url, extra_lora=other, extra_lora_scale=0.5)
    assert added == image_bytes(both)
    # lora_scale 0 is the base model, exactly; and the version keeps serving its LoRA afterwards.
    assert image_bytes(version_server.predict(**SEED_CALL, lora_scale=0)) == image_bytes(
        predict_server.predict(**SEED_CALL)
    )
    schnell = {**SEED_CALL, "model": "schnell", "num_inference_steps": 4}
    assert image_bytes(version_server.predict(**schnell)) == image_bytes(
        predict_server.predict(**schnell, lora_weights=tar_url)
    )


def test_cog_weights_as_a_local_path(trained, tiny_env, tmp_path, predict_server):
    from conftest import CogClient

    env = {**tiny_env, "COG_WEIGHTS": str(trained["tar"]), "FLUX_LORA_CACHE_DIR": str(tmp_path / "cache")}
    with cog_server("predict", env=env, log_path=tmp_path / "server.log") as server_url:
        drawn = image_bytes(CogClient(server_url, tmp_path / "server.log").predict(**SEED_CALL))
    tar_url = trained["files"].url("/trained_model.tar")
    assert drawn == image_bytes(predict_server.predict(**SEED_CALL, lora_weights=tar_url))


def test_weights_that_cannot_be_fetched_fail_setup_naming_cog_weights(trained, tiny_env, tmp_path):
    env = {
        **tiny_env,
        "COG_WEIGHTS": trained["files"].url(f"/missing.tar?token={URL_TOKEN}"),
        "FLUX_LORA_CACHE_DIR": str(tmp_path / "cache"),
    }
    with pytest.raises(RuntimeError, match="setup failed") as failure:
        with cog_server("predict", env=env, log_path=tmp_path / "server.log"):
            pass
    message = str(failure.value) + (tmp_path / "server.log").read_text()
    assert "COG_WEIGHTS: cannot use" in message and "404" in message
    assert URL_TOKEN not in message
