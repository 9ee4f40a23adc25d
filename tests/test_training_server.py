"""train.py through the real Cog HTTP server in train mode (`--x-mode train`) on the tiny model."""

import base64
import contextlib
import io
import json
import tarfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load
from safetensors.torch import save as save_bytes

from tests.training_helpers import make_zip

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def train_server(tiny_env, tmp_path_factory):
    from cog_local import cog_server

    log_path = tmp_path_factory.mktemp("server") / "train-server.log"
    # One denoising step per preview keeps the previews' path exercised but cheap on the CPU.
    with cog_server("train", env={**tiny_env, "LORA_PREVIEW_STEPS": "1"}, log_path=log_path) as url:
        yield url


@contextlib.contextmanager
def safe_open_bytes(data: bytes):
    """The metadata of a safetensors file held in memory."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as file:
        file.write(data)
        file.flush()
        with safe_open(file.name, "pt") as f:
            yield f.metadata()


def zip_data_url(tmp_path) -> str:
    raw = make_zip(tmp_path / "photos.zip").read_bytes()
    return f"data:application/zip;base64,{base64.b64encode(raw).decode()}"


def test_training_through_cog_returns_the_tar(train_server, tmp_path):
    from cog_local import decode_data_url, run_job

    inputs = {
        "input_images": zip_data_url(tmp_path),
        "trigger_word": "ZQX",
        "steps": 3,
        "resolution": "256",
        "lora_rank": 2,
        "seed": 4,
        "optimizer": "adamw8bit",
        "hf_token": "hf_never_in_logs_123",
    }
    result = run_job(train_server, "train", inputs, timeout=600)
    assert result["status"] == "succeeded", result.get("error")
    assert set(result["output"]) == {"weights"}
    raw = decode_data_url(result["output"]["weights"])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = set(tar.getnames())
        config = json.loads(tar.extractfile("config.json").read())
        (tmp_path / "lora.safetensors").write_bytes(tar.extractfile("lora.safetensors").read())
    assert {"lora.safetensors", "config.json", "captions.txt", "loss.png"} <= names
    assert {f"previews/preview-{i}.webp" for i in range(3)} <= names
    assert (config["trigger_word"], config["steps"], config["lora_rank"]) == ("ZQX", 3, 2)
    assert config["training"]["optimizer_used"] == "adamw"  # no bitsandbytes on the CPU: the named fallback
    with safe_open(tmp_path / "lora.safetensors", "pt") as f:
        assert f.metadata()["trigger_word"] == "ZQX"
        assert all(k.startswith("transformer.") and ".lora_" in k for k in f.keys())
    logs = result.get("logs") or ""
    assert "step 3/3 | loss" in logs
    assert "falling back to optimizer adamw" in logs
    assert "hf_never_in_logs_123" not in logs + json.dumps(config)


def test_bad_input_fails_with_the_field_named(train_server, tmp_path):
    from cog_local import run_job

    result = run_job(train_server, "train", {"input_images": zip_data_url(tmp_path), "resolution": "12,abc"})
    assert result["status"] == "failed"
    assert "resolution" in result["error"]
    result = run_job(
        train_server,
        "train",
        {"input_images": zip_data_url(tmp_path), "hf_repo_id": "me/my-lora", "steps": 3},
    )
    assert result["status"] == "failed"
    assert "hf_token" in result["error"]
    result = run_job(
        train_server,
        "train",
        {"input_images": zip_data_url(tmp_path), "diff_output_preservation_multiplier": 11, "steps": 3},
    )
    assert result["status"] == "failed"
    assert "diff_output_preservation_multiplier" in result["error"] and "11" in result["error"]


def test_the_trained_tar_works_as_lora_weights_in_predict(train_server, predict_server, tmp_path):
    """Both servers, as a user chains them: `cog train` output fed back as lora_weights / replicate_weights."""
    from cog_local import decode_data_url, run_job

    inputs = {
        "input_images": zip_data_url(tmp_path),
        "steps": 4,
        "resolution": "256",
        "learning_rate": 1e-2,
        "seed": 1,
        "autocaption": False,
    }
    trained = run_job(train_server, "train", inputs, timeout=600)
    assert trained["status"] == "succeeded", trained.get("error")
    tar_url = trained["output"]["weights"]
    assert tar_url.startswith("data:")  # the tar itself, as Cog returns it
    with tarfile.open(fileobj=io.BytesIO(decode_data_url(tar_url))) as tar:
        captions = tar.extractfile("captions.txt").read().decode().splitlines()
    assert "photos/img2.png\tTOK" in captions  # autocaption off: the trigger word alone
    request = {
        "prompt": "a TOK square",
        "model": "dev",
        "num_inference_steps": 2,
        "megapixels": "0.25",
        "seed": 9,
    }
    base = predict_server.predict(**request)
    with_lora = predict_server.predict(**request, lora_weights=tar_url)
    as_replicate = predict_server.predict(**request, replicate_weights=tar_url)
    at_zero = predict_server.predict(**request, lora_weights=tar_url, lora_scale=0)
    for result in (base, with_lora, as_replicate, at_zero):
        assert result["status"] == "succeeded", result.get("error")
    assert with_lora["output"] != base["output"]
    assert as_replicate["output"] == with_lora["output"]
    assert at_zero["output"] == base["output"]


def test_continue_from_lora_through_cog(train_server, tmp_path):
    """Scaled down from 600 + 400 against 1,000 steps: 40 steps with save_training_state, continued
    for 5 from that tar, against 45 in one go. The continuation starts where the first stopped (its
    first loss near the first training's last, far below a fresh start's) and gives the very LoRA of
    the uninterrupted training; the new tar records what it continued from."""
    from cog_local import decode_data_url, run_job

    common = {
        "input_images": zip_data_url(tmp_path),
        "resolution": "256",
        "lora_rank": 4,
        "learning_rate": 3e-2,
        "seed": 2,
        "optimizer": "adamw",
        "caption_dropout_rate": 0.0,
        "autocaption": False,
    }

    def train(**inputs) -> tuple[dict, dict[str, bytes], dict]:
        result = run_job(train_server, "train", {**common, **inputs}, timeout=600)
        assert result["status"] == "succeeded", result.get("error")
        with tarfile.open(fileobj=io.BytesIO(decode_data_url(result["output"]["weights"]))) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        return json.loads(files["config.json"]), files, result

    first, first_files, first_result = train(steps=40, save_training_state=True)
    assert "training_state.tensors" in first_files
    tar_url = first_result["output"]["weights"]
    continued, continued_files, continued_result = train(steps=5, continue_from_lora=tar_url)
    whole, whole_files, _ = train(steps=45)
    start, last_before = continued["training"]["first_loss"], first["training"]["final_loss"]
    fresh = whole["training"]["first_loss"]  # the same first batch, noise and noise level (same seed)
    assert start < 0.8 * fresh and abs(start - last_before) < 0.15 * fresh, (start, last_before, fresh)
    assert continued_files["lora.safetensors"] != whole_files["lora.safetensors"]  # metadata differs ...
    continued_lora = load(continued_files["lora.safetensors"])
    whole_lora = load(whole_files["lora.safetensors"])
    assert all(torch.equal(continued_lora[k], whole_lora[k]) for k in whole_lora)  # ... the tensors do not
    logs = continued_result.get("logs") or ""
    assert "continuing from data:" in logs and "continuing exactly from step 40" in logs
    with safe_open_bytes(continued_files["lora.safetensors"]) as metadata:
        assert metadata["continued_from_steps"] == "40" and metadata["trigger_word"] == "TOK"
    assert (
        continued["continue_from_lora"].startswith("data:")
        and "base64" not in continued["continue_from_lora"]
    )


@pytest.mark.parametrize("what", ["an SDXL LoRA", "not a LoRA"])
def test_continue_from_lora_refuses_what_cannot_be_continued(train_server, tmp_path, what):
    from cog_local import run_job

    if what == "an SDXL LoRA":
        payload = save_bytes(
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            }
        )
    else:
        payload = b"\x80\x04\x95 a pickle, not safetensors"
    reference = "data:application/octet-stream;base64," + base64.b64encode(payload).decode()
    result = run_job(
        train_server,
        "train",
        {"input_images": zip_data_url(tmp_path), "steps": 3, "continue_from_lora": reference},
    )
    assert result["status"] == "failed"
    assert "continue_from_lora: got" in result["error"], result["error"]
