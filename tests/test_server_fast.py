"""go_fast through the real Cog server on the CPU: both values succeed, give the same bytes, fallback logged."""

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
