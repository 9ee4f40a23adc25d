"""predict.py through the real Cog HTTP server on the tiny model, as Replicate and `cog predict` talk to it."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flux.sizes import ASPECT_RATIOS

pytestmark = pytest.mark.server
FAST = {"model": "schnell", "num_inference_steps": 1}


def decode(data_url: str) -> Image.Image:
    header, _, payload = data_url.partition(",")
    assert header.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def succeeded(result: dict) -> list:
    assert result["status"] == "succeeded", result.get("error")
    return result["output"]


def test_health_check_is_ready(predict_server):
    assert predict_server.health()["status"] == "READY"


@pytest.mark.parametrize("megapixels", ["1", "0.25"])
@pytest.mark.parametrize("aspect_ratio", list(ASPECT_RATIOS))
def test_every_aspect_ratio_and_megapixels(predict_server, aspect_ratio, megapixels):
    output = succeeded(
        predict_server.predict(
            prompt="a cat", aspect_ratio=aspect_ratio, megapixels=megapixels, output_format="png", **FAST
        )
    )
    w, h = ASPECT_RATIOS[aspect_ratio]
    expected = (w, h) if megapixels == "1" else (w // 2, h // 2)
    assert decode(output[0]).size == expected


def test_custom_size_is_rounded_up_to_a_multiple_of_16(predict_server):
    output = succeeded(
        predict_server.predict(prompt="a cat", aspect_ratio="custom", width=1000, height=300, **FAST)
    )
    assert decode(output[0]).size == (1008, 304)


def test_width_and_height_with_a_preset_ratio_are_ignored(predict_server):
    result = predict_server.predict(
        prompt="a cat", aspect_ratio="16:9", megapixels="0.25", width=300, height=300, **FAST
    )
    assert decode(succeeded(result)[0]).size == (672, 384)
    assert "width=300, height=300 ignored" in result["logs"]


@pytest.mark.parametrize(("output_format", "pil_format"), [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_every_output_format(predict_server, output_format, pil_format):
    output = succeeded(
        predict_server.predict(
            prompt="a cat", megapixels="0.25", output_format=output_format, output_quality=50, **FAST
        )
    )
    assert decode(output[0]).format == pil_format


def test_output_quality_changes_lossy_files(predict_server):
    sizes = [
        len(
            succeeded(
                predict_server.predict(
                    prompt="a cat", megapixels="0.25", seed=5, output_format="jpg", output_quality=q, **FAST
                )
            )[0]
        )
        for q in (10, 95)
    ]
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("num_outputs", [1, 4])
def test_num_outputs(predict_server, num_outputs):
    output = succeeded(
        predict_server.predict(prompt="a cat", megapixels="0.25", num_outputs=num_outputs, seed=1, **FAST)
    )
    assert len(output) == num_outputs
    assert len({item for item in output}) == num_outputs  # different images, not one copied


def test_seed_gives_byte_identical_files_and_is_logged(predict_server):
    first = predict_server.predict(
        prompt="a dog", model="dev", num_inference_steps=2, megapixels="0.25", seed=1234
    )
    second = predict_server.predict(
        prompt="a dog", model="dev", num_inference_steps=2, megapixels="0.25", seed=1234
    )
    assert succeeded(first) == succeeded(second)
    assert "Using seed: 1234" in first["logs"]


def test_random_seed_is_drawn_and_logged(predict_server):
    logs = predict_server.predict(prompt="a dog", megapixels="0.25", **FAST)["logs"]
    assert "Using seed: " in logs


@pytest.mark.parametrize(("source_size", "expected"), [((300, 200), (304, 208)), ((1600, 800), (1440, 720))])
def test_img2img_keeps_the_input_size(predict_server, source_size, expected):
    source = Image.new("RGB", source_size, (200, 30, 30))
    output = succeeded(
        predict_server.predict(
            prompt="a cat", image=data_url(png_bytes(source)), prompt_strength=0.5, megapixels="0.25", **FAST
        )
    )
    assert decode(output[0]).size == expected  # megapixels does not apply to img2img, as on the public models


def test_prompt_strength_that_leaves_no_step_returns_the_image(predict_server):
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    result = predict_server.predict(
        prompt="a cat", image=data_url(png_bytes(source)), prompt_strength=0.0, output_format="png", **FAST
    )
    assert np.array_equal(np.asarray(decode(succeeded(result)[0]).convert("RGB")), np.asarray(source))
    assert "leaves no denoising step: returning the input image" in result["logs"]


def test_inpainting_keeps_pixels_outside_the_mask(predict_server):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 128), 0)  # a different size than the image: resized, not refused
    mask.paste(255, (0, 0, 64, 128))  # left half repainted
    output = succeeded(
        predict_server.predict(
            prompt="a cat",
            model="schnell",
            image=data_url(png_bytes(source)),
            mask=data_url(png_bytes(mask)),
            prompt_strength=1.0,
            megapixels="0.25",
            output_format="png",
        )
    )
    result = np.asarray(decode(output[0]).convert("RGB")).astype(int)
    expected = np.asarray(source.resize(result.shape[1::-1], Image.Resampling.LANCZOS)).astype(int)
    half = result.shape[1] // 2
    keep_error = np.abs(result[:, half + 8 :] - expected[:, half + 8 :]).mean()
    repaint_change = np.abs(result[:, : half - 8] - expected[:, : half - 8]).mean()
    assert keep_error < 2, keep_error
    assert repaint_change > 20, repaint_change


def truncated_png() -> bytes:
    return png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]


def bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# Ranges and choices are checked first by the schema the server loads (as in the built image), the
# rest by the library; either way the message names the field and the value.
BAD_INPUTS = [
    ({"aspect_ratio": "7:3"}, 'aspect_ratio: "7:3" is not one of'),
    ({"model": "pro"}, 'model: "pro" is not one of'),
    ({"output_format": "gif"}, 'output_format: "gif" is not one of'),
    ({"megapixels": "2"}, 'megapixels: "2" is not one of'),
    ({"aspect_ratio": "custom"}, "width: got None; required"),
    ({"aspect_ratio": "custom", "width": 512}, "height: got None; required"),
    ({"aspect_ratio": "custom", "width": 100, "height": 512}, "width: 100 is less than the minimum of 256"),
    (
        {"aspect_ratio": "custom", "width": 512, "height": 2000},
        "height: 2000 is greater than the maximum of 1440",
    ),
    ({"num_outputs": 0}, "num_outputs: 0 is less than the minimum of 1"),
    ({"num_outputs": 5}, "num_outputs: 5 is greater than the maximum of 4"),
    ({"model": "schnell", "num_inference_steps": 0}, "num_inference_steps: 0 is less than the minimum of 1"),
    (
        {"model": "dev", "num_inference_steps": 51},
        "num_inference_steps: 51 is greater than the maximum of 50",
    ),
    ({"guidance": 11}, "guidance: 11 is greater than the maximum of 10"),
    ({"guidance": -1}, "guidance: -1 is less than the minimum of 0"),
    ({"guidance": 2, "guidance_scale": 3.5}, "guidance_scale: got 3.5; the same setting as guidance"),
    ({"prompt_strength": 1.5}, "prompt_strength: 1.5 is greater than the maximum of 1"),
    ({"output_quality": 101}, "output_quality: 101 is greater than the maximum of 100"),
    ({"output_quality": -1}, "output_quality: -1 is less than the minimum of 0"),
    ({"prompt": 5}, "prompt: 5 is not of type"),
    ({"image": data_url(b"this is not an image", "text/plain")}, "image: got"),
    ({"image": data_url(truncated_png())}, "truncated or corrupt"),
    ({"image": data_url(bomb_png())}, "the image declares"),
]


# What Cog's server (coglet 0.23) writes before a predictor's exception; nothing in predict.py adds to it.
COGLET_PREFIX = "Prediction failed: Prediction failed: UserInputError: "


@pytest.mark.parametrize(("inputs", "expected"), BAD_INPUTS, ids=[expected for _, expected in BAD_INPUTS])
def test_bad_input_fails_clearly_and_the_server_keeps_serving(predict_server, inputs, expected):
    result = predict_server.predict(**{"prompt": "a cat", "megapixels": "0.25", **inputs})
    assert result["status"] == "failed"
    assert expected in result["error"]
    assert "Traceback" not in result["error"]
    if ": got " in expected:  # the library's message, after the words coglet 0.23 puts first (README)
        assert result["error"].startswith(COGLET_PREFIX + expected), result["error"]
    assert len(succeeded(predict_server.predict(prompt="a cat", megapixels="0.25", **FAST))) == 1


def test_requests_reload_nothing_after_setup(predict_server):
    setup_logs = predict_server.health()["setup"]["logs"]
    assert "loading transformer" in setup_logs
    result = predict_server.predict(prompt="a cat", megapixels="0.25", model="dev", num_inference_steps=1)
    succeeded(result)
    assert "loading" not in result["logs"]


@pytest.fixture(scope="module")
def strict_checker_server(tiny_env, tmp_path_factory):
    """A server whose safety checker flags everything (threshold 0), to see the drop/fail rule end to end."""
    from cog_local import cog_server
    from conftest import CogClient

    folder = tmp_path_factory.mktemp("strict")
    with cog_server(
        "predict", env={**tiny_env, "FLUX_SAFETY_THRESHOLD": "0"}, log_path=folder / "log"
    ) as url:
        yield CogClient(url, folder / "log")


def test_safety_checker_flags_and_the_request_fails_clearly(strict_checker_server):
    result = strict_checker_server.predict(prompt="a cat", megapixels="0.25", num_outputs=2, **FAST)
    assert result["status"] == "failed"
    assert "all 2 images were flagged as NSFW" in result["error"]
    assert "disable_safety_checker" in result["error"]  # says how to get the images anyway


def test_disabled_safety_checker_is_not_run(strict_checker_server):
    result = strict_checker_server.predict(
        prompt="a cat", megapixels="0.25", disable_safety_checker=True, **FAST
    )
    assert len(succeeded(result)) == 1
    assert "flagged" not in result["logs"]


def test_safety_checker_input_must_be_a_boolean(predict_server):
    result = predict_server.predict(prompt="a cat", megapixels="0.25", disable_safety_checker="yes", **FAST)
    assert result["status"] == "failed"
    assert 'disable_safety_checker: "yes" is not of type "boolean"' in result["error"]


def test_a_prompt_over_the_t5_limit_is_truncated_with_a_warning(predict_server):
    result = predict_server.predict(prompt="a red circle " * 150, megapixels="0.25", **FAST)
    assert len(succeeded(result)) == 1
    assert "T5 tokens; FLUX.1 schnell reads at most 256" in result["logs"]


def test_a_request_without_prompt_is_refused_by_the_schema(predict_server):
    result = predict_server.predict(megapixels="0.25", **FAST)
    assert result["status"] == "failed" and result["error"] == "prompt: Field required"
