"""go_fast and step_cache through the real Cog server on the CPU: every value succeeds; what may not change the
image gives the same bytes; the fallback and the cache are logged."""

import pytest
from test_server_predict import succeeded

pytestmark = pytest.mark.server
INPUTS = dict(prompt="a blue square", model="schnell", num_inference_steps=2, megapixels="0.25", seed=21)


def test_go_fast_true_and_false_give_the_same_image_on_cpu(predict_server):
    fast = succeeded(predict_server.predict(go_fast=True, output_format="png", **INPUTS))
    standard = succeeded(predict_server.predict(go_fast=False, output_format="png", **INPUTS))
    default = succeeded(predict_server.predict(output_format="png", **INPUTS))
    assert fast == standard == default  # data URLs of the PNG files: byte for byte
    logs = predict_server.log_path.read_text()
    assert "go_fast not set up: device is cpu" in logs  # at setup
    assert "go_fast: using the standard bf16 path" in logs  # at the first go_fast request, once
    assert logs.count("go_fast: using the standard bf16 path") == 1


def test_go_fast_must_be_a_boolean(predict_server):
    result = predict_server.predict(go_fast="sometimes", **INPUTS)
    assert result["status"] == "failed"
    assert "go_fast" in result["error"]


def test_step_cache_through_the_server_then_off_gives_the_uncached_bytes(predict_server):
    inputs = dict(INPUTS, model="dev", num_inference_steps=12, output_format="png")
    uncached = succeeded(predict_server.predict(**inputs))
    for level in ("light", "medium", "strong"):
        assert len(succeeded(predict_server.predict(step_cache=level, **inputs))) == 1
    assert succeeded(predict_server.predict(step_cache="off", **inputs)) == uncached
    assert succeeded(predict_server.predict(**inputs)) == uncached
    logs = predict_server.log_path.read_text()
    assert "step_cache=strong: " in logs and "of 12 steps served from the cache" in logs


def test_an_unknown_step_cache_level_is_refused_naming_the_input(predict_server):
    result = predict_server.predict(step_cache="turbo", **INPUTS)
    assert result["status"] == "failed"
    assert "step_cache" in result["error"]
    assert succeeded(predict_server.predict(**INPUTS))  # the server keeps serving
