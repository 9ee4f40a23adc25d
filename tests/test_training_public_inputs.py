"""The public trainer's other inputs through the real Cog server in train mode: a pretrained Hugging Face
LoRA packaged without training, W&B tracking (offline) with a Lion optimizer named as users write it."""

import base64
import io
import json
import tarfile

import pytest
import torch
from http_fixture import FixtureServer
from lora_fixtures import known_update, save, to_kohya
from safetensors import safe_open
from test_lora_sources import hf_repo

from lora.formats import read_lora_file_for_shapes
from tests.training_helpers import make_zip
from training.pretrained import dev_linear_shapes

pytestmark = pytest.mark.server

TOKEN = "hf_read_token_for_pretrained_4321"
WANDB_KEY = "wandb_server_key_never_logged_abcdef0123456"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A kohya-layout LoRA (alpha 1, rank 2: scale 0.5) in a private Hugging Face repo."""
    folder = tmp_path_factory.mktemp("pretrained")
    shapes = {k: v for k, v in dev_linear_shapes().items() if "transformer_blocks." in k}
    update = known_update(shapes, rank=2, alpha=1.0, seed=7, std=0.3)
    path = save(folder / "style.safetensors", *to_kohya(update))
    server = FixtureServer().start()
    hf_repo(server, "bob/style", {"style.safetensors": path.read_bytes()}, require_auth=f"Bearer {TOKEN}")
    server.routes["/hf/api/models/bob/style/revision/main"].require_auth = f"Bearer {TOKEN}"
    yield dict(server=server, update=update, shapes=shapes)
    server.stop()


@pytest.fixture(scope="module")
def train_server(tiny_env, tmp_path_factory, pretrained):
    from cog_local import cog_server

    folder = tmp_path_factory.mktemp("train-public")
    env = {
        **tiny_env,
        "LORA_PREVIEW_STEPS": "0",
        "HF_ENDPOINT": pretrained["server"].url("/hf"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(folder / "wandb"),
        "WANDB_CONFIG_DIR": str(folder / "wandb-config"),
        "WANDB_CACHE_DIR": str(folder / "wandb-cache"),
    }
    (folder / "wandb").mkdir()
    with cog_server("train", env=env, log_path=folder / "server.log") as url:
        yield url, folder


def weights_of(result, tmp_path) -> tuple[set[str], dict, dict]:
    from cog_local import decode_data_url

    raw = decode_data_url(result["output"]["weights"])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = set(tar.getnames())
        config = json.loads(tar.extractfile("config.json").read())
        (tmp_path / "lora.safetensors").write_bytes(tar.extractfile("lora.safetensors").read())
    with safe_open(tmp_path / "lora.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return names, config, tensors


def test_a_pretrained_hf_lora_becomes_the_output_without_images(train_server, pretrained, tmp_path):
    from cog_local import run_job

    url, _ = train_server
    reference = "https://huggingface.co/bob/style/resolve/main/style.safetensors"
    result = run_job(
        url,
        "train",
        {"skip_training_and_use_pretrained_hf_lora_url": reference, "hf_token": TOKEN},
        timeout=300,
    )
    assert result["status"] == "succeeded", result.get("error")
    names, config, tensors = weights_of(result, tmp_path)
    assert names == {"lora.safetensors", "config.json"}
    assert config["skip_training_and_use_pretrained_hf_lora_url"] == reference
    # converted to the layout a training writes, with the same weight updates as the kohya original
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    converted = read_lora_file_for_shapes(tmp_path / "lora.safetensors", pretrained["shapes"])
    assert set(converted) == set(pretrained["update"])
    for module, known in pretrained["update"].items():
        torch.testing.assert_close(converted[module].delta().double(), known.delta(), rtol=1e-4, atol=1e-6)
    assert TOKEN not in (result.get("logs") or "")


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("https://example.com/lora.safetensors", "a Hugging Face LoRA"),
        (
            "https://huggingface.co/bob/missing/resolve/main/x.safetensors",
            "skip_training_and_use_pretrained_hf_lora_url",
        ),
    ],
)
def test_a_bad_pretrained_reference_fails_naming_the_field(train_server, reference, expected):
    from cog_local import run_job

    url, _ = train_server
    result = run_job(
        url, "train", {"skip_training_and_use_pretrained_hf_lora_url": reference, "hf_token": TOKEN}
    )
    assert result["status"] == "failed"
    assert "skip_training_and_use_pretrained_hf_lora_url: got " in result["error"]
    assert expected in result["error"]


def test_wandb_tracking_and_lion_through_cog(train_server, tmp_path):
    from cog_local import run_job

    url, folder = train_server
    raw = make_zip(tmp_path / "photos.zip").read_bytes()
    inputs = {
        "input_images": f"data:application/zip;base64,{base64.b64encode(raw).decode()}",
        "steps": 4,
        "resolution": "256",
        "lora_rank": 2,
        "optimizer": "Lion",
        "learning_rate": 1e-4,
        "seed": 1,
        "wandb_api_key": WANDB_KEY,
        "wandb_project": "flux-tests",
        "wandb_run": "server-run",
        "wandb_sample_prompts": "a photo of TOK",
        "wandb_sample_interval": 4,
        "wandb_save_interval": 2,
    }
    result = run_job(url, "train", inputs, timeout=600)
    assert result["status"] == "succeeded", result.get("error")
    _, config, _ = weights_of(result, tmp_path)
    assert config["optimizer"] == "lion" and config["training"]["optimizer_used"] == "lion"
    assert config["training"]["ema_decay"] == 0.99
    logs = result.get("logs") or ""
    assert "logging to Weights & Biases: project flux-tests, run server-run" in logs
    (files,) = list((folder / "wandb").glob("wandb/offline-run-*/files"))
    assert sorted(p.name for p in files.glob("lora-step-*")) == [
        "lora-step-00002.safetensors",
        "lora-step-00004.safetensors",
    ]
    assert len(list((files / "media" / "images").rglob("*.png"))) == 1
    assert WANDB_KEY not in logs + json.dumps(config)
