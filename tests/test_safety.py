"""Safety checker: the tiny classifier through the real loading path, threshold-forced decisions, the drop and
fail rules; helper-weights resolution (env folder, project folder, download patterns, the offline error)."""

import json
import logging
import shutil

import pytest
from PIL import Image

from flux.safety import AllImagesFlaggedError, SafetyChecker, filter_images, threshold_from_env
from toys.tiny_helpers import build_tiny_safety_checker
from weights import base_models, helper_models
from weights.helper_models import SAFETY_CHECKER, HelperWeightsNotFoundError, resolve_helper_weights


@pytest.fixture(scope="module")
def helpers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-helpers")
    build_tiny_safety_checker(root)
    return root


@pytest.fixture
def env(helpers_dir, tmp_path, monkeypatch):
    """Only the tiny folder is found: the project folder is empty and downloads are off."""
    monkeypatch.setattr(base_models, "PROJECT_MODELS_DIR", tmp_path / "project-models")
    monkeypatch.setenv("FLUX_HELPER_WEIGHTS_DIR", str(helpers_dir))
    monkeypatch.setenv("FLUX_ALLOW_DOWNLOAD", "0")
    monkeypatch.delenv("FLUX_SAFETY_THRESHOLD", raising=False)
    return helpers_dir


def images(count: int) -> list[Image.Image]:
    # Different content (and sizes, which the processor resizes away) so that the scores differ.
    return [Image.new("RGB", (40 + 8 * i, 32), (60 * i, 255 - 50 * i, 17 * i)) for i in range(count)]


def test_loads_the_tiny_classifier_from_the_helper_folder(env):
    checker = SafetyChecker.load("cpu")
    assert resolve_helper_weights(SAFETY_CHECKER) == env / "nsfw_image_detection"
    assert checker.threshold == 0.5 and checker.model.config.id2label[checker.nsfw_index] == "nsfw"
    probabilities = checker.nsfw_probabilities(images(3))
    assert len(probabilities) == 3 and all(0.0 < p < 1.0 for p in probabilities)
    # One batch gives what one image at a time gives.
    single = [checker.nsfw_probabilities([image])[0] for image in images(3)]
    assert probabilities == pytest.approx(single, abs=1e-5)
    assert checker.flagged([]) == []


def test_threshold_forces_the_decision(env, monkeypatch):
    assert SafetyChecker.load("cpu", threshold=0.0).flagged(images(3)) == [True, True, True]
    assert SafetyChecker.load("cpu", threshold=1.01).flagged(images(3)) == [False, False, False]
    monkeypatch.setenv("FLUX_SAFETY_THRESHOLD", "0")
    assert SafetyChecker.load("cpu").flagged(images(2)) == [True, True]
    monkeypatch.setenv("FLUX_SAFETY_THRESHOLD", "1.01")
    assert SafetyChecker.load("cpu").flagged(images(2)) == [False, False]


def test_each_image_is_judged_on_its_own_score(env):
    checker = SafetyChecker.load("cpu")
    probabilities = checker.nsfw_probabilities(images(4))
    assert len(set(probabilities)) > 1, "the tiny classifier should score different images differently"
    checker.threshold = (min(probabilities) + max(probabilities)) / 2
    assert checker.flagged(images(4)) == [p > checker.threshold for p in probabilities]
    assert True in checker.flagged(images(4)) and False in checker.flagged(images(4))


@pytest.mark.parametrize("raw", ["abc", "-0.1", "2"])
def test_bad_threshold_variable_is_refused(monkeypatch, raw):
    monkeypatch.setenv("FLUX_SAFETY_THRESHOLD", raw)
    with pytest.raises(ValueError, match="FLUX_SAFETY_THRESHOLD"):
        threshold_from_env()


def test_flagged_images_are_dropped_with_a_log_line(caplog):
    caplog.set_level(logging.INFO, logger="flux.safety")
    kept = filter_images(["out-0", "out-1", "out-2"], [False, True, False])
    assert kept == ["out-0", "out-2"]
    assert "output 1 was flagged as NSFW and removed" in caplog.text
    assert "output 0" not in caplog.text and "output 2" not in caplog.text
    assert filter_images([], []) == []


def test_all_flagged_fails_the_request():
    with pytest.raises(AllImagesFlaggedError, match="all 3 images were flagged") as error:
        filter_images(images(3), [True, True, True])
    assert "disable_safety_checker=true" in str(error.value) and "prompt or seed" in str(error.value)
    with pytest.raises(AllImagesFlaggedError, match="the only image was flagged"):
        filter_images(images(1), [True])
    with pytest.raises(ValueError, match="2 images but 1 safety decisions"):
        filter_images(images(2), [True])


def test_a_classifier_without_an_nsfw_label_is_refused(helpers_dir, tmp_path, monkeypatch):
    other = tmp_path / "other"
    shutil.copytree(helpers_dir / "nsfw_image_detection", other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "cat", "1": "dog"}, {"cat": 0, "dog": 1}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no single 'nsfw' label"):
        SafetyChecker.load("cpu", folder=other)


def test_offline_without_weights_says_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(base_models, "PROJECT_MODELS_DIR", tmp_path / "project-models")
    monkeypatch.setenv("FLUX_HELPER_WEIGHTS_DIR", "/nonexistent/helpers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a real download attempt, refused by huggingface_hub offline
    monkeypatch.delenv("FLUX_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(HelperWeightsNotFoundError) as error:
        SafetyChecker.load("cpu")
    message = str(error.value)
    assert "NSFW safety checker" in message and "Falconsai/nsfw_image_detection" in message
    assert "/nonexistent/helpers/nsfw_image_detection" in message
    assert str(tmp_path / "project-models" / "nsfw_image_detection") in message
    assert "config.json, preprocessor_config.json, model.safetensors" in message
    assert "download failed" in message
    assert "hf download Falconsai/nsfw_image_detection --local-dir" in message
    assert "python -m weights.helper_models safety_checker" in message
    monkeypatch.setenv("FLUX_ALLOW_DOWNLOAD", "0")
    with pytest.raises(HelperWeightsNotFoundError, match=r"downloads are off \(FLUX_ALLOW_DOWNLOAD=0\)"):
        SafetyChecker.load("cpu")


def test_explicit_incomplete_folder_is_an_error(helpers_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(helpers_dir / "nsfw_image_detection", partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(HelperWeightsNotFoundError, match="the folder given is incomplete"):
        SafetyChecker.load("cpu", folder=partial)


def test_download_fetches_only_safetensors_and_configs(helpers_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(base_models, "PROJECT_MODELS_DIR", tmp_path / "project-models")
    monkeypatch.delenv("FLUX_HELPER_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("FLUX_ALLOW_DOWNLOAD", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, token):
        calls.append((repo_id, allow_patterns))
        shutil.copytree(helpers_dir / "nsfw_image_detection", local_dir)
        return str(local_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    checker = SafetyChecker.load("cpu", threshold=1.01)
    assert checker.flagged(images(1)) == [False]
    assert calls == [("Falconsai/nsfw_image_detection", list(SAFETY_CHECKER.allow_patterns))]
    for model in helper_models.HELPER_MODELS.values():
        assert not any(p.endswith((".bin", ".pt", ".ckpt", ".pth", "*")) for p in model.allow_patterns)
    # Found on disk the second time: no new download.
    SafetyChecker.load("cpu")
    assert len(calls) == 1
