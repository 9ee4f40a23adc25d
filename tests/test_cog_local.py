"""The local `cog predict`-style runner converts -i values by the declared input types, as the cog CLI does."""

import base64

import pytest
from cog_local import declared_types, parse_inputs, write_outputs


def test_values_follow_the_declared_types(tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(b"\x89PNG fake")
    inputs = parse_inputs(
        [
            "prompt=123",
            "megapixels=0.25",
            "seed=7",
            "guidance=3.5",
            "disable_safety_checker=true",
            f"image=@{image}",
        ]
    )
    assert inputs["prompt"] == "123" and inputs["megapixels"] == "0.25"
    assert inputs["seed"] == 7 and inputs["guidance"] == 3.5 and inputs["disable_safety_checker"] is True
    assert inputs["image"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    assert declared_types("train")["hf_token"] == "Secret"
    assert parse_inputs(["trigger_word=1234", "steps=20"], "train") == {"trigger_word": "1234", "steps": 20}


def test_outputs_are_written_as_files(tmp_path):
    url = "data:image/png;base64," + base64.b64encode(b"png-bytes").decode()
    written = write_outputs([url, url], tmp_path)
    assert [p.name for p in written] == ["out-0.png", "out-1.png"]
    tar = "data:application/x-tar;base64," + base64.b64encode(b"tar-bytes").decode()
    assert [p.name for p in write_outputs({"weights": tar}, tmp_path)] == ["weights.tar"]
    assert (tmp_path / "weights.tar").read_bytes() == b"tar-bytes"


def test_an_input_the_model_does_not_declare_is_refused_with_the_closest_names():
    with pytest.raises(
        SystemExit, match="no input 'guidance_sclae'; did you mean guidance_scale or guidance"
    ):
        parse_inputs(["prompt=a cat", "guidance_sclae=3"])
    with pytest.raises(SystemExit, match="no input 'stepz'; did you mean steps"):
        parse_inputs(["stepz=10"], "train")


def test_optional_inputs_keep_their_declared_type():
    # `str | None` inputs stay text even when the text looks like a number (a LoRA named 123, say).
    assert parse_inputs(["lora_weights=123", "seed=-1", "width=1000"]) == {
        "lora_weights": "123",
        "seed": -1,
        "width": 1000,
    }
