"""Calls that work on Replicate's public FLUX models and trained versions work here and mean the same.

Each test sends through the real Cog server (with the schema `cog build` bundles) a call a user copies
from a public guide or from Replicate's own test cases for those models.
"""

import threading
import time
import urllib.error

import cog_local
import pytest
from PIL import Image
from test_server_predict import FAST, data_url, decode, png_bytes, succeeded

pytestmark = pytest.mark.server
SMALL = {"megapixels": "0.25", "output_format": "png"}


def test_the_trained_version_guide_call_works(predict_server):
    result = predict_server.predict(
        prompt="A portrait photo of a space station, bad 70s food",
        num_inference_steps=28,
        guidance_scale=7.5,
        model="dev",
    )
    assert len(succeeded(result)) == 1


def test_guidance_scale_changes_a_dev_image_like_guidance(predict_server):
    def image(**guidance) -> str:
        return succeeded(
            predict_server.predict(
                prompt="a dog", model="dev", num_inference_steps=2, seed=5, **SMALL, **guidance
            )
        )[0]

    low, high = image(guidance_scale=1.0), image(guidance_scale=7.5)
    assert low != high
    assert image(guidance=7.5) == high  # one setting under two names
    assert image() == image(guidance=3.0)  # the default both document


def test_schnell_accepts_what_the_trained_version_predictor_accepts(predict_server):
    result = predict_server.predict(prompt="a cat", model="schnell", num_inference_steps=8, **SMALL)
    assert len(succeeded(result)) == 1
    assert "distilled for 4 steps" in result["logs"]


@pytest.mark.parametrize("seed", [-1, -987654])
def test_a_negative_seed_draws_a_random_one(predict_server, seed):
    result = predict_server.predict(prompt="a cat", seed=seed, **FAST, **SMALL)
    succeeded(result)
    drawn = int(result["logs"].split("Using seed: ")[1].split()[0])
    assert drawn >= 0


def test_a_seed_beyond_32_bits_is_reproducible(predict_server):
    seed = 2**63 + 12345
    first, second = (predict_server.predict(prompt="a cat", seed=seed, **FAST, **SMALL) for _ in range(2))
    assert succeeded(first) == succeeded(second)
    assert f"Using seed: {seed}" in first["logs"]


def test_an_empty_prompt_is_an_unconditional_prompt(predict_server):
    result = predict_server.predict(prompt="", **FAST, **SMALL)
    assert len(succeeded(result)) == 1
    assert "prompt is empty" in result["logs"]


def test_a_mask_without_an_image_is_text_to_image(predict_server):
    mask = data_url(png_bytes(Image.new("L", (64, 64), 255)))
    result = predict_server.predict(prompt="a cat", mask=mask, seed=3, **FAST, **SMALL)
    plain = predict_server.predict(prompt="a cat", seed=3, **FAST, **SMALL)
    assert succeeded(result) == succeeded(plain)
    assert decode(succeeded(result)[0]).size == (512, 512)
    assert "mask given without an image: ignored" in result["logs"]


def test_unknown_inputs_are_dropped_by_the_server_as_in_the_built_image(predict_server):
    # Cog's server drops what the schema does not declare (only its own log says so); the local runner,
    # like the cog CLI, refuses such names before sending (tests/test_cog_local.py).
    result = predict_server.predict(prompt="a cat", guidance_sclae=9, **FAST, **SMALL)
    assert len(succeeded(result)) == 1
    assert "Stripped unknown input fields" in predict_server.log_path.read_text()


def test_a_request_sent_while_the_slot_is_busy_is_retried(predict_server, monkeypatch):
    answers = []
    real_post = cog_local.post_json

    def recording_post(url, body, timeout=3600):
        try:
            result = real_post(url, body, timeout)
            answers.append(200)
            return result
        except urllib.error.HTTPError as error:
            answers.append(error.code)
            raise

    monkeypatch.setattr(cog_local, "post_json", recording_post)
    slow = threading.Thread(
        target=predict_server.predict, kwargs=dict(prompt="a cat", model="dev", num_inference_steps=28)
    )
    slow.start()
    time.sleep(1.0)  # the slow request holds the server's one slot
    try:
        result = predict_server.predict(prompt="a dog", **FAST, **SMALL)
    finally:
        slow.join()
    assert len(succeeded(result)) == 1
    assert 409 in answers, answers  # the server said "at capacity" and the client waited for the slot
