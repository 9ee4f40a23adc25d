"""LoRA training on the tiny model (CPU): config rules, buckets, the recipe, the tar, determinism, hub."""

import json
import logging
import random
import sys
import tarfile

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from errors import UserInputError
from tests.training_helpers import SAMPLES, make_zip, synthetic_cache
from training import buckets
from training.config import OPTIMIZERS, build_training_config, parse_resolutions
from training.dataset import replace_trigger
from training.export import draw_loss_curve
from training.hub import model_card, push_to_hub
from training.job import run_training
from training.loop import _class_captions, lora_adapter
from training.optimizers import build_optimizer, effective_learning_rate
from training.previews import PreviewSettings
from training.recipe import (
    block_linear_names,
    sample_shifted_timesteps,
    sample_timesteps,
    select_lora_targets,
)

FAST_PREVIEWS = PreviewSettings(count=2, steps=1, width=256, height=256)
NO_PREVIEWS = PreviewSettings(count=0)
SECRET = "hf_supersecrettoken123"


# ---------- configuration ----------


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 2),
        ("steps", 6001),
        ("steps", 10.5),
        ("learning_rate", 0),
        ("learning_rate", 11),
        ("learning_rate", float("nan")),
        ("batch_size", 0),
        ("batch_size", 33),
        ("lora_rank", 0),
        ("lora_rank", 129),
        ("caption_dropout_rate", 1.5),
        ("optimizer", "sgd"),
        ("resolution", "512,abc"),
        ("resolution", "32"),
        ("resolution", "4096"),
        ("resolution", " , "),
        ("layers_to_optimize_regex", "(unclosed"),
        ("seed", -1),
        ("hf_repo_id", "not a repo"),
        ("cache_latents_to_disk", "yes"),
        ("trigger_word", "two\nlines"),
        ("diff_output_preservation_class", "two\nlines"),
        ("diff_output_preservation_multiplier", -1),
        ("diff_output_preservation_multiplier", 11),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(UserInputError) as info:
        build_training_config(**{field: value, "seed": 1} if field != "seed" else {field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: got ")


def test_unusual_values_the_public_trainer_takes_are_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        config = build_training_config(learning_rate=0.5, batch_size=8, resolution="128,2048", seed=1)
    assert (config.learning_rate, config.batch_size, config.resolutions) == (0.5, 8, (128, 2048))
    for field in ("learning_rate=0.5", "batch_size=8", "128 is outside", "2048 is outside"):
        assert field in caplog.text
    # optimizer names match case-insensitively, as in the public trainer
    assert build_training_config(optimizer=" AdamW8bit", seed=1).optimizer == "adamw8bit"
    assert set(OPTIMIZERS) == {
        "adamw8bit", "adamw", "adam8bit", "adam", "lion8bit", "lion", "adagrad", "adafactor", "prodigy"
    }  # fmt: skip


def test_config_defaults_and_rules():
    config = build_training_config(seed=7)
    assert config.resolutions == (512, 768, 1024)
    assert (config.steps, config.lora_rank, config.lora_alpha, config.optimizer) == (
        1000,
        16,
        16,
        "adamw8bit",
    )
    assert config.to_json()["resolution"] == "512,768,1024"
    assert "hf_token" not in config.to_json()
    assert parse_resolutions("1000, 512,512") == (512, 1024)  # rounded to 64, sorted, unique
    # prodigy takes its multiplier-style learning rate; adamw does not
    assert build_training_config(optimizer="prodigy", learning_rate=1.0, seed=1).learning_rate == 1.0
    # a repo without a token fails before any training; a token without a repo is only a warning
    with pytest.raises(UserInputError, match="hf_token"):
        build_training_config(hf_repo_id="me/my-lora", seed=1)
    assert (
        build_training_config(hf_repo_id="me/my-lora", has_hf_token=True, seed=1).hf_repo_id == "me/my-lora"
    )
    assert build_training_config(seed=None).seed >= 0  # drawn and recorded
    # differential output preservation: off by default; the class word replaces the trigger word
    assert config.diff_output_preservation_class is None
    with pytest.raises(UserInputError, match="diff_output_preservation_class"):
        build_training_config(trigger_word="", diff_output_preservation_class="dog", seed=1)
    off = build_training_config(
        diff_output_preservation_class="dog", diff_output_preservation_multiplier=0, seed=1
    )
    assert off.diff_output_preservation_class is None
    assert replace_trigger("TOK, a TOK dog by TOKYO", "TOK", "dog") == "dog, a dog dog by TOKYO"
    # several class words, comma-separated, take turns; an empty one is refused
    several = build_training_config(diff_output_preservation_class=" man,woman , child", seed=1)
    assert several.diff_output_preservation_class == "man, woman, child"
    assert several.preservation_classes == ("man", "woman", "child")
    with pytest.raises(UserInputError, match="diff_output_preservation_class.*none empty"):
        build_training_config(diff_output_preservation_class="man,,woman", seed=1)


# ---------- buckets ----------


def test_buckets_never_upscale():
    rng = random.Random(0)
    sizes = [(rng.randint(20, 2500), rng.randint(20, 2500)) for _ in range(300)]
    samples = buckets.assign_buckets(sizes, (512, 768, 1024))
    assert {s.index for s in samples} == {i for i, (w, h) in enumerate(sizes) if w >= 16 and h >= 16}
    for sample in samples:
        width, height = sizes[sample.index]
        assert sample.width <= width and sample.height <= height
        assert sample.width % 16 == 0 and sample.height % 16 == 0
        if sample.resolution is not None:
            assert sample.width % 64 == 0 and sample.height % 64 == 0
            assert sample.width * sample.height <= sample.resolution**2
    # a large landscape photo is trained at every resolution, a 600 px one only at 512
    assert [(s.width, s.height) for s in buckets.assign_buckets([(3000, 2000)], (512, 768, 1024))] == [
        (576, 384),
        (896, 576),
        (1216, 832),
    ]
    assert [s.resolution for s in buckets.assign_buckets([(600, 600)], (512, 768))] == [512]
    assert buckets.assign_buckets([(100, 70)], (512,))[0].bucket == (96, 64)  # own size, floored


def test_fit_to_bucket_and_batches():
    image = Image.new("RGB", (300, 200), "red")
    assert buckets.fit_to_bucket(image, 192, 128).size == (192, 128)
    with pytest.raises(ValueError):
        buckets.fit_to_bucket(image, 320, 192)
    samples = [buckets.Sample(i, 64 if i % 2 else 128, 64, None) for i in range(7)]
    batches = buckets.epoch_batches(samples, 2, random.Random(1))
    assert sorted(s.index for b in batches for s in b) == list(range(7))
    assert all(len({s.bucket for s in b}) == 1 and len(b) <= 2 for b in batches)


# ---------- recipe pieces ----------


DEV_SHIFT = dict(
    use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


def test_timesteps_are_the_public_trainers_at_every_size():
    """sigmoid(N(0, 1)), unshifted (ai-toolkit's timestep_type sigmoid): median 0.5, ~20 % below 0.3."""
    small = sample_timesteps(20000, 256, DEV_SHIFT, torch.Generator().manual_seed(0))
    large = sample_timesteps(20000, 4096, DEV_SHIFT, torch.Generator().manual_seed(0))
    assert torch.equal(small, large)  # the image size does not enter
    assert 0 < large.min() and large.max() < 1
    assert abs(large.median().item() - 0.5) < 0.01
    assert abs((large < 0.3).float().mean().item() - 0.20) < 0.01


def test_shifted_timesteps_shift_with_resolution():
    small = sample_shifted_timesteps(20000, 256, DEV_SHIFT, torch.Generator().manual_seed(0))
    large = sample_shifted_timesteps(20000, 4096, DEV_SHIFT, torch.Generator().manual_seed(0))
    assert 0 < small.min() and large.max() < 1
    assert large.mean() > small.mean() + 0.05  # more tokens -> noisier timesteps, as the dev sampler
    # The figures at 1024x1024: median 0.76, 2.4 % of the steps below 0.3.
    assert abs(large.median().item() - 0.76) < 0.01
    assert abs((large < 0.3).float().mean().item() - 0.024) < 0.005


def test_loss_curve_draws():
    image = draw_loss_curve([1.0, 0.8, float("nan"), 0.5, 0.4])
    assert image.size == (800, 400)
    assert len(image.getcolors(1 << 16)) > 2  # axes, raw and smoothed lines


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_public_optimizer_steps_and_names_what_ran(name, caplog):
    """Each optimizer from its library takes a real step on CPU; the 8-bit ones (CUDA only) fall back
    to their 32-bit version with a warning naming both."""
    param = torch.nn.Parameter(torch.ones(4, 4))
    with caplog.at_level(logging.WARNING):
        optimizer, used = build_optimizer(name, [param], 1e-2, torch.device("cpu"))
    expected = {"adamw8bit": "adamw", "adam8bit": "adam", "lion8bit": "lion"}.get(name, name)
    assert used == expected
    if used != name:
        assert (
            f"optimizer {name} unavailable" in caplog.text
            and f"falling back to optimizer {used}" in caplog.text
        )
    expected_class = {
        "adamw": "AdamW", "adam": "Adam", "lion": "Lion", "adagrad": "Adagrad", "adafactor": "Adafactor",
        "prodigy": "Prodigy",
    }[used]  # fmt: skip
    assert type(optimizer).__name__ == expected_class
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert (param.detach() < 1).all()  # moved against the gradient


def test_prodigy_learning_rate_is_a_multiplier_and_small_ones_mean_one():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert build_optimizer("prodigy", params, 4e-4, torch.device("cpu"))[0].param_groups[0]["lr"] == 1.0
    assert build_optimizer("prodigy", params, 0.5, torch.device("cpu"))[0].param_groups[0]["lr"] == 0.5
    assert effective_learning_rate("adamw", 4e-4) == 4e-4


def test_a_missing_library_falls_back_with_a_fitting_rate(monkeypatch, caplog):
    params = [torch.nn.Parameter(torch.zeros(2))]
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails
    with caplog.at_level(logging.WARNING):
        optimizer, used = build_optimizer("prodigy", params, 1.0, torch.device("cpu"))
    assert used == "adamw" and optimizer.param_groups[0]["lr"] == 4e-4  # not Prodigy's multiplier
    assert "prodigyopt" in caplog.text
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    assert build_optimizer("lion", params, 1e-4, torch.device("cpu"))[1] == "adamw"


# ---------- training on the tiny model ----------


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """The session's tiny models (conftest); every training here must leave them as it found them."""
    return tiny_models


@pytest.fixture(scope="module")
def data_zip(tmp_path_factory):
    return make_zip(tmp_path_factory.mktemp("data") / "photos.zip")


@pytest.fixture(scope="module")
def trained(tiny, data_zip, tmp_path_factory):
    """One 5-step training with previews, shared by the assertions on its output."""
    transformer = tiny.transformers["dev"]
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    config = build_training_config(
        steps=5,
        lora_rank=4,
        resolution="256",
        seed=3,
        batch_size=2,
        optimizer="adamw",
        autocaption_prefix="a photo of",
        autocaption_suffix="studio light",
    )
    out = tmp_path_factory.mktemp("out")
    tar_path = run_training(config, data_zip, out, models=tiny, previews=FAST_PREVIEWS, log_every=1)
    folder = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        tar.extractall(folder, filter="data")
    return dict(tar=tar_path, names=names, folder=folder, before=before, config=config)


def test_training_tar_has_every_member(trained):
    assert sorted(trained["names"]) == [
        "captions.txt",
        "config.json",
        "lora.safetensors",
        "loss.png",
        "previews/preview-0.webp",
        "previews/preview-1.webp",
    ]
    folder = trained["folder"]
    assert Image.open(folder / "previews/preview-0.webp").size == (256, 256)
    assert Image.open(folder / "loss.png").size == (800, 400)
    captions = (folder / "captions.txt").read_text().splitlines()
    assert captions[:2] == ["photos/img0.png\ta red square TOK", "photos/img1.png\tTOK, a blue block"]
    # Images without a .txt: the (tiny, random) captioner's words between the prefix and suffix, added in code.
    for index, line in enumerate(captions[2:], start=2):
        assert line.startswith(f"photos/img{index}.png\tTOK, a photo of ") and line.endswith(" studio light")
    config = json.loads((folder / "config.json").read_text())
    assert config["steps"] == 5 and config["seed"] == 3 and config["resolution"] == "256"
    assert config["training"]["optimizer_used"] == "adamw"
    assert (config["autocaption"], config["autocaption_prefix"]) == (True, "a photo of")
    assert "hf_token" not in json.dumps(config)


def test_lora_file_is_peft_fp16_with_metadata(trained, tiny):
    with safe_open(trained["folder"] / "lora.safetensors", "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    expected_modules = block_linear_names(tiny.transformers["dev"])
    assert sorted(keys) == sorted(
        f"transformer.{m}.lora_{ab}.weight" for m in expected_modules for ab in ("A", "B")
    )
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert tensors["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 4
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert any(t.float().abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    assert metadata["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert metadata["trigger_word"] == "TOK"
    assert (metadata["steps"], metadata["rank"], metadata["alpha"], metadata["resolutions"]) == (
        "5",
        "4",
        "4",
        "256",
    )
    assert metadata["software"] and metadata["software_version"]
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 4


def test_loss_is_finite_and_logged(trained):
    config = json.loads((trained["folder"] / "config.json").read_text())
    assert 0 < config["training"]["final_loss"] < 10


def test_base_transformer_left_clean(trained, tiny):
    transformer = tiny.transformers["dev"]
    after = transformer.state_dict()
    assert after.keys() == trained["before"].keys()
    assert all(torch.equal(after[k], v) for k, v in trained["before"].items())
    assert not any("lora" in name for name, _ in transformer.named_modules())
    assert not any(p.requires_grad for p in transformer.parameters())


def test_same_seed_same_bytes_memory_or_disk_cache(tiny, data_zip, tmp_path):
    common = dict(steps=3, lora_rank=2, resolution="256", seed=11, optimizer="adamw")
    files = []
    for index, on_disk in enumerate((False, True)):
        config = build_training_config(**common, cache_latents_to_disk=on_disk)
        tar_path = run_training(config, data_zip, tmp_path / str(index), models=tiny, previews=NO_PREVIEWS)
        with tarfile.open(tar_path) as tar:
            files.append(tar.extractfile("lora.safetensors").read())
    assert files[0] == files[1]  # the same seed gives the same bytes, cached in memory or on disk


def test_output_preservation_changes_the_lora_and_is_recorded(tiny, data_zip, tmp_path):
    """diff_output_preservation_class through the whole job: its captions cached, the second term
    trained (a different LoRA from the same seed; another with a second class word taking turns), the
    setting saved in config.json."""
    common = dict(steps=3, lora_rank=2, resolution="256", seed=11, optimizer="adamw")
    files, configs = [], []
    for index, preserved in enumerate((None, "square", "square,circle")):
        config = build_training_config(**common, diff_output_preservation_class=preserved)
        tar_path = run_training(config, data_zip, tmp_path / str(index), models=tiny, previews=NO_PREVIEWS)
        with tarfile.open(tar_path) as tar:
            files.append(tar.extractfile("lora.safetensors").read())
            configs.append(json.loads(tar.extractfile("config.json").read()))
    assert len(set(files)) == 3
    assert configs[1]["diff_output_preservation_class"] == "square"
    assert configs[2]["diff_output_preservation_class"] == "square, circle"
    assert configs[1]["diff_output_preservation_multiplier"] == 1.0


def test_layers_regex_filters_and_no_match_lists_layers(tiny, data_zip, tmp_path):
    transformer = tiny.transformers["dev"]
    chosen = select_lora_targets(transformer, r"transformer.single_transformer_blocks.(0|1).proj_out")
    assert chosen == ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]
    assert select_lora_targets(transformer, r"\.attn\.add_q_proj$") == [
        "transformer_blocks.0.attn.add_q_proj"
    ]
    with pytest.raises(UserInputError) as info:
        select_lora_targets(transformer, "nothing_like_this")
    assert info.value.field == "layers_to_optimize_regex"
    assert "transformer.single_transformer_blocks.0..1.proj_out" in str(info.value)
    assert "transformer.transformer_blocks.0.attn.to_q" in str(info.value)

    config = build_training_config(
        steps=3,
        lora_rank=2,
        resolution="256",
        seed=1,
        layers_to_optimize_regex="single_transformer_blocks.1.proj_out",
        gradient_checkpointing=True,  # and gradients still reach the LoRA through checkpointed blocks
    )
    tar_path = run_training(config, data_zip, tmp_path, models=tiny, previews=NO_PREVIEWS)
    with tarfile.open(tar_path) as tar, open(tmp_path / "l.safetensors", "wb") as out:
        out.write(tar.extractfile("lora.safetensors").read())
    with safe_open(tmp_path / "l.safetensors", "pt") as f:
        assert sorted(f.keys()) == [
            "transformer.single_transformer_blocks.1.proj_out.lora_A.weight",
            "transformer.single_transformer_blocks.1.proj_out.lora_B.weight",
        ]
        assert f.get_tensor("transformer.single_transformer_blocks.1.proj_out.lora_B.weight").abs().sum() > 0
    assert not tiny.transformers["dev"].is_gradient_checkpointing


def test_adapter_removed_even_when_training_fails(tiny):
    transformer = tiny.transformers["dev"]
    with (
        pytest.raises(RuntimeError, match="boom"),
        lora_adapter(transformer, 2, ["transformer_blocks.0.attn.to_q"], 0),
    ):
        assert any("lora" in n for n, _ in transformer.named_modules())
        raise RuntimeError("boom")
    assert not any("lora" in n for n, _ in transformer.named_modules())


# ---------- Hugging Face push ----------


class FakeHfApi:
    calls: list = []
    fail = False

    def __init__(self, token):
        self.token = token

    def create_repo(self, **kwargs):
        FakeHfApi.calls.append(("create_repo", kwargs, self.token))
        if FakeHfApi.fail:
            raise RuntimeError(f"401 Unauthorized for token {self.token}")
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        from pathlib import Path

        files = sorted(p.name for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file())
        FakeHfApi.calls.append(("upload_folder", {**kwargs, "files": files}, self.token))


def test_push_uploads_folder_and_card(tmp_path):
    config = build_training_config(hf_repo_id="me/tok-lora", has_hf_token=True, seed=5, trigger_word="ZQX")
    card = model_card(config, [("previews/preview-0.webp", "a photo of ZQX")])
    assert "base_model: black-forest-labs/FLUX.1-dev" in card
    assert "license_name: flux-1-dev-non-commercial-license" in card
    assert 'instance_prompt: "ZQX"' in card
    assert 'load_lora_weights("me/tok-lora", weight_name="lora.safetensors")' in card
    assert 'lora_weights="me/tok-lora"' in card
    assert "![a photo of ZQX](previews/preview-0.webp)" in card
    (tmp_path / "README.md").write_text(card)
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    FakeHfApi.calls, FakeHfApi.fail = [], False
    url = push_to_hub(tmp_path, "me/tok-lora", SECRET, api_factory=FakeHfApi)
    assert url == "https://huggingface.co/me/tok-lora"
    (name1, create, token1), (name2, upload, token2) = FakeHfApi.calls
    assert (name1, create["repo_id"], create["exist_ok"], token1) == (
        "create_repo",
        "me/tok-lora",
        True,
        SECRET,
    )
    assert (name2, upload["repo_id"], upload["files"], token2) == (
        "upload_folder",
        "me/tok-lora",
        ["README.md", "lora.safetensors"],
        SECRET,
    )


def test_failed_push_is_logged_without_token(tmp_path, caplog):
    FakeHfApi.calls, FakeHfApi.fail = [], True
    with caplog.at_level(logging.INFO):
        assert push_to_hub(tmp_path, "me/tok-lora", SECRET, api_factory=FakeHfApi) is None
    assert "failed" in caplog.text and "401 Unauthorized" in caplog.text
    assert SECRET not in caplog.text


def test_training_with_push_returns_tar_even_when_push_fails(tiny, data_zip, tmp_path, monkeypatch, caplog):
    FakeHfApi.calls, FakeHfApi.fail = [], True
    monkeypatch.setattr("training.job.push_to_hub", lambda *a: push_to_hub(*a, api_factory=FakeHfApi))
    config = build_training_config(
        steps=3, lora_rank=2, resolution="256", seed=1, hf_repo_id="me/x", has_hf_token=True
    )
    with caplog.at_level(logging.INFO):
        tar_path = run_training(
            config, data_zip, tmp_path, models=tiny, previews=NO_PREVIEWS, hf_token=SECRET
        )
    with tarfile.open(tar_path) as tar:
        assert {"lora.safetensors", "README.md"} <= set(tar.getnames())
    assert FakeHfApi.calls and FakeHfApi.calls[0][0] == "create_repo"
    assert SECRET not in caplog.text


def test_several_class_words_take_turns():
    """With several class words each sample's preservation caption is drawn among its class captions,
    so every class word gets steps; with one there is no draw (the generator's stream is unchanged)."""
    cache = synthetic_cache(SAMPLES, preserved=True)  # class captions 2 and 3 for every sample
    generator = torch.Generator().manual_seed(0)
    picks = [pick for _ in range(20) for pick in _class_captions([0, 1], cache, generator)]
    assert set(picks) == {2, 3} and 10 <= picks.count(2) <= 30
    cache.preserved_captions_of_sample = [[2]] * len(SAMPLES)
    state = generator.get_state()
    assert _class_captions([0, 1], cache, generator) == [2, 2]
    assert torch.equal(generator.get_state(), state)
