"""The saved LoRA is the EMA of the trained weights; W&B gets loss, samples and the LoRA, offline here."""

import logging
import tarfile

import pytest
import torch
from safetensors import safe_open

import training.job
from tests.training_helpers import make_zip
from training.config import build_training_config
from training.job import run_training
from training.loop import EMA_DECAY
from training.previews import PreviewSettings
from training.tracking import build_wandb_settings

FAST_PREVIEWS = PreviewSettings(count=0, width=256, height=256, steps=1)
KEY = "wandb_key_never_shown_0123456789abcdef01"


def file_key(param_name: str) -> str:
    """`blocks.0.attn.to_q.lora_A.trained.weight` -> the saved file's `transformer.blocks.0...lora_A.weight`."""
    return "transformer." + param_name.replace(".trained.weight", ".weight")


def read_tar_lora(tar_path, folder):
    with tarfile.open(tar_path) as tar:
        tar.extract("lora.safetensors", folder, filter="data")
    with safe_open(folder / "lora.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture()
def recorded_steps(monkeypatch):
    """Wrap the job's train_lora so each step's raw LoRA weights and its EMA are recorded."""
    raw, averaged = [], []
    real = training.job.train_lora

    def recording(transformer, *args, on_step=None, **kwargs):
        def record(report):
            lora = lambda: {n: p.detach().clone() for n, p in transformer.named_parameters() if ".lora_" in n}  # noqa: E731
            raw.append(lora())
            with report.averaged_weights():
                averaged.append(lora())
            if on_step is not None:
                on_step(report)

        return real(transformer, *args, on_step=record, **kwargs)

    monkeypatch.setattr(training.job, "train_lora", recording)
    return raw, averaged


def test_the_saved_lora_is_the_ema_of_the_steps(tiny_models, tmp_path, recorded_steps):
    raw, averaged = recorded_steps
    config = build_training_config(
        steps=6, lora_rank=2, resolution="256", seed=5, optimizer="adamw", learning_rate=1e-2
    )
    tar = run_training(
        config, make_zip(tmp_path / "d.zip"), tmp_path / "out", models=tiny_models, previews=FAST_PREVIEWS
    )
    saved = read_tar_lora(tar, tmp_path)

    # diffusers' EMAModel: decay 0 at the first update, then min(0.99, n / (9 + n)) at update n
    expected = {k: v.clone() for k, v in raw[0].items()}
    for n, weights in enumerate(raw[1:], start=2):
        decay = min(EMA_DECAY, n / (9 + n))
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * weights[k]
        for k in expected:
            torch.testing.assert_close(averaged[n - 1][k], expected[k])
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(saved[file_key(name)].float(), value.float(), rtol=2e-3, atol=1e-4)
        if "lora_B" in name:
            moved += int(not torch.allclose(raw[-1][name], value))
    assert moved > 0  # the last step's weights differ from what was saved: it really is the average


@pytest.fixture()
def wandb_offline(monkeypatch, tmp_path):
    """A real wandb run in offline mode, its folder kept under tmp_path; Run.log calls recorded."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    (tmp_path / "wandb-dir").mkdir()
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def log(self, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    return tmp_path / "wandb-dir", logged


def test_wandb_gets_loss_samples_and_the_lora(tiny_models, tmp_path, wandb_offline, caplog):
    run_dir, logged = wandb_offline
    config = build_training_config(steps=4, lora_rank=2, resolution="256", seed=2, optimizer="adamw")
    settings = build_wandb_settings(
        project="p",
        run="my-run",
        sample_interval=2,
        save_interval=3,
        sample_prompts="a red square TOK\n\n a blue TOK ",
    )
    with caplog.at_level(logging.INFO):
        tar = run_training(
            config,
            make_zip(tmp_path / "d.zip"),
            tmp_path / "out",
            models=tiny_models,
            previews=FAST_PREVIEWS,  # also the W&B samples' settings
            wandb_api_key=KEY,
            wandb=settings,
        )
    losses = [(step, data["train/loss"]) for step, data in logged if "train/loss" in data]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert all(0 < loss < 10 for _, loss in losses)
    samples = [(step, sorted(data)) for step, data in logged if any(k.startswith("samples/") for k in data)]
    both = ["samples/a blue TOK", "samples/a red square TOK"]
    assert samples == [(2, both), (4, both)]  # every interval and the last step
    (files,) = list(run_dir.glob("wandb/offline-run-*/files"))
    assert len(list((files / "media" / "images").rglob("*.png"))) == 4  # 2 prompts x 2 intervals
    weights = sorted(p.name for p in files.glob("lora-step-*.safetensors"))
    assert weights == ["lora-step-00003.safetensors", "lora-step-00004.safetensors"]  # interval and last
    final = read_tar_lora(tar, tmp_path)
    with safe_open(files / "lora-step-00004.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(k), final[k]) for k in final)  # the EMA, as in the tar
    # the key is nowhere: not in logs, not in the run's files
    assert KEY not in caplog.text
    for path in (tmp_path / "wandb-dir").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_failing_wandb_never_fails_the_training(tiny_models, tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise ConnectionError(f"api.wandb.ai unreachable (key {KEY})")

    monkeypatch.setattr(wandb, "init", broken_init)
    config = build_training_config(steps=3, lora_rank=2, resolution="256", seed=2, optimizer="adamw")
    with caplog.at_level(logging.WARNING):
        tar = run_training(
            config,
            make_zip(tmp_path / "d.zip"),
            tmp_path / "out",
            models=tiny_models,
            previews=FAST_PREVIEWS,
            wandb_api_key=KEY,
            wandb=build_wandb_settings(sample_prompts="x"),
        )
    assert tar.exists()
    assert "Weights & Biases is unavailable" in caplog.text and KEY not in caplog.text


@pytest.mark.parametrize(
    "field, value",
    [
        ("sample_interval", 0),
        ("save_interval", "10"),
        ("project", "two\nlines"),
        ("sample_prompts", "\n".join(f"p{i}" for i in range(11))),
    ],
)
def test_wandb_settings_errors_name_the_field(field, value):
    from errors import UserInputError

    with pytest.raises(UserInputError) as info:
        build_wandb_settings(**{field: value})
    assert info.value.field == f"wandb_{field}"
