"""The library path on the tiny model: variants share encoders, seeds reproduce, loading happens once."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from errors import UserInputError
from flux.generate import generate
from flux.loading import load_flux
from flux.output import save_images
from flux.request import build_request


def small(**inputs):
    return build_request(
        **{
            "prompt": "a red circle",
            "model": "schnell",
            "megapixels": "0.25",
            "aspect_ratio": "1:1",
            **inputs,
        }
    )


def test_both_variants_share_one_vae_and_one_pair_of_text_encoders(tiny_models):
    assert set(tiny_models.transformers) == {"dev", "schnell"}
    assert tiny_models.transformers["dev"].config.guidance_embeds
    assert not tiny_models.transformers["schnell"].config.guidance_embeds
    assert tiny_models.scheduler_configs["dev"]["use_dynamic_shifting"]
    assert not tiny_models.scheduler_configs["schnell"]["use_dynamic_shifting"]
    t5_modules = [m for m in vars(tiny_models).values() if type(m).__name__ == "T5EncoderModel"]
    assert len(t5_modules) == 1


def test_same_seed_same_images_different_seed_different(tiny_models):
    first = generate(tiny_models, small(seed=7, num_outputs=2))
    again = generate(tiny_models, small(seed=7, num_outputs=2))
    other = generate(tiny_models, small(seed=8, num_outputs=2))
    as_arrays = [[np.asarray(image) for image in result.images] for result in (first, again, other)]
    assert all(np.array_equal(a, b) for a, b in zip(as_arrays[0], as_arrays[1], strict=True))
    assert not np.array_equal(as_arrays[0][0], as_arrays[2][0])
    assert not np.array_equal(as_arrays[0][0], as_arrays[0][1])  # the two outputs of one request differ


def test_no_seed_draws_one_and_reports_it(tiny_models, capsys):
    result = generate(tiny_models, small())
    assert f"Using seed: {result.seed}" in capsys.readouterr().out
    replay = generate(tiny_models, small(seed=result.seed))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(replay.images[0]))


def test_dev_uses_guidance_and_schnell_ignores_it(tiny_models):
    def pixels(**inputs):
        return np.asarray(generate(tiny_models, small(seed=1, **inputs)).images[0]).astype(int)

    assert not np.array_equal(
        pixels(model="dev", num_inference_steps=2, guidance=1.0),
        pixels(model="dev", num_inference_steps=2, guidance=9.0),
    )
    assert np.array_equal(pixels(guidance=1.0), pixels(guidance=9.0))


def test_output_files_are_byte_identical_under_a_seed(tiny_models, tmp_path):
    for output_format in ("webp", "jpg", "png"):
        files = []
        for attempt in range(2):
            images = generate(tiny_models, small(seed=3)).images
            files.append(save_images(images, tmp_path / f"{output_format}-{attempt}", output_format, 80)[0])
        assert files[0].name == f"out-0.{output_format}"
        assert files[0].read_bytes() == files[1].read_bytes()
        decoded = Image.open(io.BytesIO(files[0].read_bytes()))
        assert decoded.format == {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}[output_format]


def test_long_prompt_is_truncated_with_a_warning(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="flux.generate"):
        generate(tiny_models, small(prompt="a red circle " * 200, seed=1))
    assert any("T5 tokens" in r.message and "at most 256" in r.message for r in caplog.records)


def test_a_variant_that_was_not_loaded_is_a_clear_error(tiny_env, monkeypatch):
    for key, value in tiny_env.items():
        monkeypatch.setenv(key, value)
    schnell_only = load_flux(("schnell",))
    with pytest.raises(UserInputError, match="model: got 'dev'; this container loaded only: schnell"):
        generate(schnell_only, small(model="dev"))


def test_generating_reloads_nothing(tiny_models, monkeypatch):
    """setup() loads once: a request must never call from_pretrained again."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    def refuse(*args, **kwargs):
        raise AssertionError("a request reloaded weights")

    for cls in (AutoencoderKL, FluxTransformer2DModel, CLIPTextModel, T5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    assert len(generate(tiny_models, small(seed=1)).images) == 1
