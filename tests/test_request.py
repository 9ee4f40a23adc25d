import pytest

from errors import UserInputError
from flux.request import build_request, denoising_steps
from flux.variants import VARIANTS, get_variant, parse_variant_list


def test_variant_rules():
    schnell, dev = VARIANTS["schnell"], VARIANTS["dev"]
    assert (schnell.default_steps, schnell.max_steps, schnell.max_sequence_length) == (4, 4, 256)
    assert (dev.default_steps, dev.max_steps, dev.max_sequence_length) == (28, 50, 512)
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
        ({"prompt": ""}, "prompt", "non-empty"),
        ({"prompt": "   "}, "prompt", "non-empty"),
        ({"model": "pro"}, "model", "dev"),
        ({"output_format": "gif"}, "output_format", "webp, jpg, png"),
        ({"num_outputs": 0}, "num_outputs", "1 to 4"),
        ({"num_outputs": 5}, "num_outputs", "1 to 4"),
        ({"num_inference_steps": 0}, "num_inference_steps", "1 to 50 for model=dev"),
        ({"model": "schnell", "num_inference_steps": 5}, "num_inference_steps", "1 to 4 for model=schnell"),
        ({"model": "dev", "num_inference_steps": 51}, "num_inference_steps", "1 to 50 for model=dev"),
        ({"guidance": -0.1}, "guidance", "0 to 10"),
        ({"guidance": 10.5}, "guidance", "0 to 10"),
        ({"guidance": float("nan")}, "guidance", "0 to 10"),
        ({"output_quality": 101}, "output_quality", "0 to 100"),
        ({"output_quality": -1}, "output_quality", "0 to 100"),
        ({"prompt_strength": 1.5}, "prompt_strength", "0 to 1"),
        ({"prompt_strength": -0.5}, "prompt_strength", "0 to 1"),
        ({"seed": -1}, "seed", "0 to"),
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


def test_mask_without_image_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="mask: .*needs an image"):
        build_request(prompt="x", mask=tmp_path / "mask.png")


def test_prompt_strength_that_leaves_no_step_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="prompt_strength: got 0.0.*no denoising step"):
        build_request(prompt="x", model="schnell", image=tmp_path / "a.png", prompt_strength=0.0)
    assert denoising_steps(4, 0.1) == 1 and denoising_steps(28, 0.8) == 23 and denoising_steps(4, 1.0) == 4


def test_variant_list_setting():
    assert parse_variant_list("schnell") == ("schnell",)
    assert parse_variant_list(" dev , schnell,dev") == ("dev", "schnell")
    with pytest.raises(UserInputError, match="FLUX_VARIANTS"):
        parse_variant_list("dev,pro")
    with pytest.raises(UserInputError, match="model: got 'xl'"):
        get_variant("xl")
