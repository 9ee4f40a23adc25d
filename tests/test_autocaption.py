"""Autocaption: the tiny Florence-2 through the real loading path, the caption rules (prefix, suffix, trigger
word, existing .txt captions), progress logs, unloading, and the offline error."""

import logging

import pytest
import torch
from PIL import Image

from toys.tiny_helpers import build_tiny_captioner
from training.autocaption import Captioner, autocaption_dataset, autocaption_examples, compose_caption
from training.dataset import TrainingExample
from weights import base_models
from weights.helper_models import HelperWeightsNotFoundError

FAST = dict(max_new_tokens=6)  # random weights never stop on their own: keep generation short


@pytest.fixture(scope="module")
def helpers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-helpers")
    build_tiny_captioner(root)
    return root


@pytest.fixture
def env(helpers_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(base_models, "PROJECT_MODELS_DIR", tmp_path / "project-models")
    monkeypatch.setenv("FLUX_HELPER_WEIGHTS_DIR", str(helpers_dir))
    monkeypatch.setenv("FLUX_ALLOW_DOWNLOAD", "0")
    return helpers_dir


def example(name: str, caption: str = "TOK", source: str = "trigger") -> TrainingExample:
    color = (len(name) * 40 % 256, 90, 200)
    return TrainingExample(Image.new("RGB", (48, 40), color), caption, name, source)


def dataset() -> list[TrainingExample]:
    return [
        example("a.png"),
        example("b.png", "TOK, my own words", "txt"),
        example("c.png"),
        example("d.png", "a [trigger] drawing", "txt"),
    ]


class FakeCaptioner:
    def __init__(self, text: str = "The image shows a red house under a blue sky."):
        self.text = text
        self.seen: list[tuple[int, ...]] = []

    def caption(self, image: Image.Image) -> str:
        self.seen.append(image.getpixel((0, 0)))
        return self.text


@pytest.mark.parametrize(
    "caption, trigger, prefix, suffix, expected",
    [
        (
            "a red house",
            "TOK",
            "a photo of",
            "in the style of X",
            "TOK, a photo of a red house in the style of X",
        ),
        ("a red house", "TOK", None, None, "TOK, a red house"),
        ("a red house", "TOK", "  photo of TOK,  ", "", "photo of TOK, a red house"),  # trigger already there
        (
            "a red house",
            "TOK",
            None,
            "[trigger] style",
            "a red house TOK style",
        ),  # [trigger] becomes the word
        ("", "TOK", "a photo of", None, "TOK, a photo of"),  # an empty caption keeps prefix and trigger
        ("a  red\nhouse", "", "a photo of", "by Y", "a photo of a red house by Y"),  # no trigger word
    ],
)
def test_compose_caption(caption, trigger, prefix, suffix, expected):
    assert compose_caption(caption, trigger, prefix, suffix) == expected


def test_only_images_without_a_txt_are_captioned(caplog):
    caplog.set_level(logging.INFO, logger="training.autocaption")
    examples = dataset()
    fake = FakeCaptioner()
    result = autocaption_examples(examples, fake, "TOK", "a photo of", "high detail")
    assert [e.source for e in result] == ["a.png", "b.png", "c.png", "d.png"]
    assert len(fake.seen) == 2  # a.png and c.png only
    assert result[1] is examples[1] and result[3] is examples[3]  # .txt captions untouched
    for captioned in (result[0], result[2]):
        assert (
            captioned.caption == "TOK, a photo of The image shows a red house under a blue sky. high detail"
        )
        assert captioned.caption_source == "autocaption"
    assert result[0].image is examples[0].image
    assert "captioned 1/2 (" in caplog.text and "captioned 2/2 (" in caplog.text
    assert "s/image)" in caplog.text


def test_progress_is_logged_at_most_about_twenty_times(caplog):
    caplog.set_level(logging.INFO, logger="training.autocaption")
    autocaption_examples([example(f"{i}.png") for i in range(100)], FakeCaptioner(), "TOK")
    lines = [r.message for r in caplog.records if r.message.startswith("captioned ")]
    assert (
        len(lines) == 20
        and lines[0].startswith("captioned 5/100")
        and lines[-1].startswith("captioned 100/100")
    )


def test_tiny_florence_captions_through_the_real_path(env):
    captioner = Captioner.load("cpu", **FAST)
    text = captioner.caption(Image.new("RGB", (80, 50), (10, 200, 30)))
    assert isinstance(text, str) and text == " ".join(text.split())
    assert "<image>" not in text and "</s>" not in text and "<s>" not in text
    # Greedy-deterministic: the same image, the same caption.
    assert captioner.caption(Image.new("RGB", (80, 50), (10, 200, 30))) == text
    captioner.unload()
    assert captioner.model is None
    with pytest.raises(RuntimeError, match="unloaded"):
        captioner.caption(Image.new("RGB", (8, 8)))


def test_autocaption_dataset_captions_then_unloads(env, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="training.autocaption")
    loaded = []
    real_load = Captioner.load.__func__

    def spy_load(cls, device="cpu", folder=None, **options):
        captioner = real_load(cls, device, folder, **FAST)
        loaded.append(captioner)
        return captioner

    monkeypatch.setattr(Captioner, "load", classmethod(spy_load))
    examples = dataset()
    result = autocaption_dataset(examples, "TOK", prefix="a photo of", suffix="in the style of X")
    for captioned in (result[0], result[2]):
        assert captioned.caption.startswith("TOK, a photo of")  # the trigger word goes first when missing
        assert captioned.caption.endswith("in the style of X")
        assert captioned.caption_source == "autocaption"
    assert result[1] == examples[1] and result[3] == examples[3]
    assert len(loaded) == 1 and loaded[0].model is None  # unloaded before training
    assert "captioned 2/2" in caplog.text and "captioner unloaded" in caplog.text


def test_captioner_is_unloaded_when_captioning_fails(monkeypatch):
    unloaded = []

    class Failing(FakeCaptioner):
        def caption(self, image):
            raise RuntimeError("out of memory")

        def unload(self):
            unloaded.append(True)

    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, device, folder, **options: Failing()))
    with pytest.raises(RuntimeError, match="out of memory"):
        autocaption_dataset(dataset(), "TOK")
    assert unloaded == [True]


def test_nothing_to_caption_loads_nothing(monkeypatch):
    def no_load(cls, device, folder):
        raise AssertionError("the captioner should not be loaded")

    monkeypatch.setattr(Captioner, "load", classmethod(no_load))
    examples = [example("b.png", "TOK, mine", "txt")]
    assert autocaption_dataset(examples, "TOK", "prefix", "suffix") == examples


def test_unload_returns_cuda_memory(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    model = torch.nn.Linear(2, 2)
    captioner = Captioner(model, processor=None, device="cuda")
    captioner.unload()
    assert captioner.model is None and emptied == [True]
    assert next(model.parameters()).device.type == "cpu"
    captioner.unload()  # twice is harmless
    assert emptied == [True]


def test_offline_without_weights_says_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(base_models, "PROJECT_MODELS_DIR", tmp_path / "project-models")
    monkeypatch.delenv("FLUX_HELPER_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("FLUX_ALLOW_DOWNLOAD", "0")
    with pytest.raises(HelperWeightsNotFoundError) as error:
        autocaption_dataset(dataset(), "TOK")
    message = str(error.value)
    assert "autocaption model" in message and "florence-community/Florence-2-large" in message
    assert str(tmp_path / "project-models" / "Florence-2-large") in message
    assert "downloads are off" in message
    assert (
        "hf download florence-community/Florence-2-large" in message
        and "--include '*.safetensors'" in message
    )
    assert "python -m weights.helper_models captioner" in message and "FLUX_HELPER_WEIGHTS_DIR" in message
