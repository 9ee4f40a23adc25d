import logging

import pytest

from errors import UserInputError
from flux.request import MAX_SEED, build_request, denoising_steps
from flux.variants import VARIANTS, get_variant, parse_variant_list


def test_variant_rules():
    schnell, dev = VARIANTS["schnell"], VARIANTS["dev"]
    assert (schnell.default_steps, schnell.recommended_max_steps, schnell.max_sequence_length) == (4, 4, 256)
    assert (dev.default_steps, dev.recommended_max_steps, dev.max_sequence_length) == (28, 50, 512)
    assert dev.uses_guidance and not schnell.uses_guidance
    assert dev.gated and not schnell.gated


def test_defaults_follow_the_variant():
    assert build_request(prompt="x", model="schnell").num_inference_steps == 4
    assert build_request(prompt="x", model="dev").num_inference_steps == 28
    request = build_request(prompt="x")
    assert (request.variant.name, request.width, request.height, request.output_format) == (
        "dev",
        1024,
        1024,
        "webp",
    )
    assert (request.num_outputs, request.guidance, request.output_quality, request.seed) == (1, 3.0, 80, None)


@pytest.mark.parametrize(
    ("inputs", "field", "fragment"),
    [
        ({"prompt": None}, "prompt", "a text"),
        ({"model": "pro"}, "model", "dev"),
        ({"output_format": "gif"}, "output_format", "webp, jpg, png"),
        ({"num_outputs": 0}, "num_outputs", "1 to 4"),
        ({"num_outputs": 5}, "num_outputs", "1 to 4"),
        ({"num_inference_steps": 0}, "num_inference_steps", "1 to 50"),
        ({"model": "schnell", "num_inference_steps": 51}, "num_inference_steps", "1 to 50"),
        ({"model": "dev", "num_inference_steps": 51}, "num_inference_steps", "1 to 50"),
        ({"guidance": -0.1}, "guidance", "0 to 10"),
        ({"guidance": 10.5}, "guidance", "0 to 10"),
        ({"guidance": float("nan")}, "guidance", "0 to 10"),
        ({"guidance_scale": 11}, "guidance_scale", "0 to 10"),
        ({"guidance": 2, "guidance_scale": 3.5}, "guidance_scale", "the same setting as guidance"),
        ({"output_quality": 101}, "output_quality", "0 to 100"),
        ({"output_quality": -1}, "output_quality", "0 to 100"),
        ({"prompt_strength": 1.5}, "prompt_strength", "0 to 1"),
        ({"prompt_strength": -0.5}, "prompt_strength", "0 to 1"),
        ({"seed": MAX_SEED + 1}, "seed", "empty or negative: a random seed"),
        ({"seed": "abc"}, "seed", "integer"),
        ({"num_outputs": True}, "num_outputs", "integer"),
    ],
)
def test_bad_inputs_name_field_value_and_allowed(inputs, field, fragment):
    with pytest.raises(UserInputError) as error:
        build_request(**{"prompt": "a cat", **inputs})
    message = str(error.value)
    assert error.value.field == field
    assert message.startswith(f"{field}: got {inputs[field]!r}")
    assert fragment in message


def test_public_calls_are_accepted_with_their_public_meaning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    # An empty prompt is an unconditional prompt; a mask without an image is ignored (text-to-image).
    assert build_request(prompt="").prompt == ""
    assert build_request(prompt="x", mask=tmp_path / "mask.png").mask is None
    assert "mask given without an image" in caplog.text
    # schnell takes what the public trained-version predictor takes (1-50), with a warning above 4.
    assert build_request(prompt="x", model="schnell", num_inference_steps=28).num_inference_steps == 28
    assert "distilled for 4 steps" in caplog.text
    # A prompt_strength that leaves no step is no error (generate() returns the source image).
    request = build_request(prompt="x", model="schnell", image=tmp_path / "a.png", prompt_strength=0.0)
    assert denoising_steps(request.num_inference_steps, request.prompt_strength) == 0
    assert denoising_steps(4, 0.1) == 1 and denoising_steps(28, 0.8) == 23 and denoising_steps(4, 1.0) == 4


@pytest.mark.parametrize(
    ("guidance", "guidance_scale", "used"),
    [(None, None, 3.0), (2.5, None, 2.5), (None, 7.5, 7.5), (4, 4.0, 4.0), (0, None, 0.0)],
)
def test_guidance_and_guidance_scale_are_one_setting(guidance, guidance_scale, used):
    assert build_request(prompt="x", guidance=guidance, guidance_scale=guidance_scale).guidance == used


@pytest.mark.parametrize(
    ("seed", "used"), [(None, None), (-1, None), (-123456, None), (0, 0), (MAX_SEED, MAX_SEED)]
)
def test_empty_or_negative_seed_is_random_and_any_torch_seed_works(seed, used):
    assert build_request(prompt="x", seed=seed).seed == used


def test_variant_list_setting():
    assert parse_variant_list("schnell") == ("schnell",)
    assert parse_variant_list(" dev , schnell,dev") == ("dev", "schnell")
    with pytest.raises(UserInputError, match="FLUX_VARIANTS"):
        parse_variant_list("dev,pro")
    with pytest.raises(UserInputError, match="model: got 'xl'"):
        get_variant("xl")
