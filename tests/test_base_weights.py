"""Where base weights come from: explicit folder, project folder, Hub download; a clear error offline."""

import shutil

import pytest

from weights import base_models
from weights.base_models import PIPELINE_FILES, WeightsNotFoundError, resolve_base_weights


@pytest.fixture
def no_project_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(base_models, "PROJECT_MODELS_DIR", tmp_path / "project-models")
    monkeypatch.delenv("FLUX_WEIGHTS_DIR", raising=False)
    return tmp_path / "project-models"


def test_explicit_folder_comes_first(tiny_weights, no_project_weights, monkeypatch):
    shutil.copytree(tiny_weights / "FLUX.1-schnell", no_project_weights / "FLUX.1-schnell")
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(tiny_weights))
    assert (
        resolve_base_weights("FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell", False)
        == tiny_weights / "FLUX.1-schnell"
    )


def test_project_folder_is_used_without_the_variable(tiny_weights, no_project_weights):
    shutil.copytree(tiny_weights / "FLUX.1-dev", no_project_weights / "FLUX.1-dev")
    assert (
        resolve_base_weights("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", True)
        == no_project_weights / "FLUX.1-dev"
    )


def test_incomplete_folder_is_not_taken(tiny_weights, tmp_path, no_project_weights, monkeypatch):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_weights / "FLUX.1-dev", partial / "FLUX.1-dev")
    shutil.rmtree(partial / "FLUX.1-dev" / "text_encoder_2")
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(partial))
    monkeypatch.setenv("FLUX_ALLOW_DOWNLOAD", "0")
    with pytest.raises(WeightsNotFoundError, match="FLUX.1-dev not found"):
        resolve_base_weights("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", True)


def test_offline_without_weights_says_what_where_and_how(no_project_weights, monkeypatch):
    monkeypatch.setenv("FLUX_ALLOW_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a real download attempt, refused by huggingface_hub offline
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", "/nonexistent/flux")
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_base_weights("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", True)
    message = str(error.value)
    assert "FLUX.1-dev not found" in message
    assert "/nonexistent/flux/FLUX.1-dev" in message and str(no_project_weights / "FLUX.1-dev") in message
    assert "download failed" in message
    assert "hf download black-forest-labs/FLUX.1-dev" in message and "HF_TOKEN" in message


def test_download_fetches_only_pipeline_files_with_token(no_project_weights, tiny_weights, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, token):
        calls.append((repo_id, allow_patterns, token))
        shutil.copytree(tiny_weights / "FLUX.1-dev", local_dir)
        return str(local_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("FLUX_ALLOW_DOWNLOAD", "1")  # the fake above stands in for the network
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    folder = resolve_base_weights("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", True)
    assert folder == no_project_weights / "FLUX.1-dev"
    assert calls == [("black-forest-labs/FLUX.1-dev", PIPELINE_FILES, "hf_secret")]
    # The single-file BFL checkpoints at the repo root are never fetched.
    assert not any(
        pattern.startswith("*") or pattern.endswith(".safetensors") and "/" not in pattern
        for pattern in PIPELINE_FILES
    )
