"""`cog build` reads predict.py and train.py as text: what it reads must be what Python runs.

scripts/cog_schema.py applies cog's static rules (replicate/cog pkg/schema/python); cog's own inspector
(`cog._inspector.create_predictor`) gives Python's view. Any input the two see differently would be
built into the image with another default, range, choice list or requiredness than the code has.
"""

import math
import textwrap

import pytest
from cog._adt import PrimitiveType, Repetition
from cog._inspector import create_predictor
from cog_schema import ADAPTERS, SchemaError, input_component, openapi_schema, static_inputs

from flux.fast.step_cache import STEP_CACHE_LEVELS, STEP_CACHE_OFF
from flux.request import DEFAULT_GUIDANCE, MAX_GUIDANCE, MAX_OUTPUTS, OUTPUT_FORMATS
from flux.sizes import ASPECT_RATIOS, CUSTOM, MAX_SIDE, MEGAPIXELS, MIN_SIDE
from flux.variants import MAX_STEPS, MIN_STEPS, VARIANTS
from lora.serving import SCALE_RANGE
from training.config import DEFAULTS, MAX_BATCH, MAX_RANK, MIN_BATCH, MIN_RANK, OPTIMIZERS
from training.config import MAX_STEPS as MAX_STEPS_TRAIN
from training.config import MIN_STEPS as MIN_STEPS_TRAIN
from training.tracking import DEFAULT_INTERVAL, DEFAULT_PROJECT

REQUIRED = {"predict": {"prompt"}, "train": set()}  # train: input_images or a pretrained LoRA URL
PRIMITIVE_NAMES = {
    PrimitiveType.STRING: "str",
    PrimitiveType.INTEGER: "int",
    PrimitiveType.FLOAT: "float",
    PrimitiveType.BOOL: "bool",
    PrimitiveType.PATH: "Path",
    PrimitiveType.SECRET: "Secret",
}


def python_inputs(mode: str) -> dict:
    filename, name, _ = ADAPTERS[mode]
    return create_predictor(filename.removesuffix(".py"), name).inputs


@pytest.mark.parametrize("mode", ["predict", "train"])
def test_cog_reads_every_input_as_python_does(mode):
    static = {item.name: item for item in static_inputs(mode)}
    python = python_inputs(mode)
    assert list(static) == list(python)
    for name, field in python.items():
        item = static[name]
        assert item.primitive == PRIMITIVE_NAMES[field.type.primitive], name
        assert item.nullable == (field.type.repetition is Repetition.OPTIONAL), (
            f"{name}: declare `T | None` for an input whose default is None"
        )
        assert item.description == field.description, f"{name}: cog reads another description"
        assert item.ge == field.ge and item.le == field.le, f"{name}: cog reads other ge/le (literals only)"
        assert item.choices == field.choices, f"{name}: cog reads other choices"
        if name not in REQUIRED[mode]:
            assert item.has_default, f"{name}: cog would make it required"
            assert item.default == field.default, f"{name}: cog reads default {item.default!r}"


@pytest.mark.parametrize("mode", ["predict", "train"])
def test_only_the_main_input_is_required(mode):
    component, _ = input_component(static_inputs(mode), "Input")
    assert set(component.get("required", [])) == REQUIRED[mode]


def test_predict_literals_are_the_library_constants():
    inputs = python_inputs("predict")
    assert sorted(inputs["model"].choices) == sorted(VARIANTS)  # dev first, as on the public models
    assert inputs["model"].default == "dev"
    assert inputs["aspect_ratio"].choices == [*ASPECT_RATIOS, CUSTOM]
    assert inputs["megapixels"].choices == list(MEGAPIXELS)
    assert inputs["output_format"].choices == list(OUTPUT_FORMATS)
    assert inputs["step_cache"].choices == list(STEP_CACHE_LEVELS)
    assert inputs["step_cache"].default == STEP_CACHE_OFF  # opt-in: public calls keep their meaning
    for side in ("width", "height"):
        assert (inputs[side].ge, inputs[side].le) == (MIN_SIDE, MAX_SIDE)
    assert inputs["num_outputs"].le == MAX_OUTPUTS
    assert (inputs["num_inference_steps"].ge, inputs["num_inference_steps"].le) == (MIN_STEPS, MAX_STEPS)
    for name in ("guidance", "guidance_scale"):
        assert (inputs[name].ge, inputs[name].le) == (0, MAX_GUIDANCE)
        assert f"empty: {DEFAULT_GUIDANCE:g}" in inputs[name].description
    for name in ("lora_scale", "extra_lora_scale"):
        assert (inputs[name].ge, inputs[name].le) == SCALE_RANGE


def test_train_literals_are_the_library_constants():
    inputs = python_inputs("train")
    assert (inputs["steps"].ge, inputs["steps"].le) == (MIN_STEPS_TRAIN, MAX_STEPS_TRAIN)
    assert (inputs["lora_rank"].ge, inputs["lora_rank"].le) == (MIN_RANK, MAX_RANK)
    assert (inputs["batch_size"].ge, inputs["batch_size"].le) == (MIN_BATCH, MAX_BATCH)
    for name, value in DEFAULTS.items():
        assert inputs[name].default == value, name
    for name in OPTIMIZERS:
        assert name in inputs["optimizer"].description
    assert inputs["wandb_project"].default == DEFAULT_PROJECT
    for name in ("wandb_sample_interval", "wandb_save_interval"):
        assert inputs[name].default == DEFAULT_INTERVAL


def test_the_bundled_schema_has_both_adapters():
    schemas = openapi_schema()["components"]["schemas"]
    assert {"Input", "Output", "TrainingInput", "TrainingOutput"} <= set(schemas)
    assert schemas["Output"]["type"] == "array"
    assert sorted(schemas["model"]["enum"]) == sorted(VARIANTS)


# The reader follows cog's rules, shown on small sources (each is a way a build breaks or drifts).


def _read(tmp_path, body: str):
    (tmp_path / "predict.py").write_text(textwrap.dedent(body))
    return {item.name: item for item in static_inputs("predict", root=tmp_path)}


def test_unreadable_choices_stop_the_build(tmp_path):
    with pytest.raises(SchemaError, match="choices expression list\\(VARIANTS\\)"):
        _read(
            tmp_path,
            """
            from flux.variants import VARIANTS
            class Runner:
                def run(self, model: str = Input(default="dev", choices=list(VARIANTS))) -> str: ...
            """,
        )


def test_what_cog_silently_reads_otherwise(tmp_path):
    inputs = _read(
        tmp_path,
        """
        LOW = 1
        CHOICES = ["a", "b"]
        DEFAULT_NAME = "a"
        class Runner:
            def run(
                self,
                seed: int = Input(description="plain", default=None),
                steps: int = Input(description=f"from {LOW}", default=DEFAULTS["steps"], ge=LOW, le=2**5),
                name: str = Input(description="one " "two", default=DEFAULT_NAME, choices=CHOICES),
                token: Secret = Input(default=None),
                strength: float | None = Input(default=-0.5, ge=-1, le=1.0),
            ) -> str: ...
        """,
    )
    assert inputs["seed"].required  # default None on a plain int: required in the image
    assert inputs["steps"].default is None and inputs["steps"].required  # a subscript is not read
    assert inputs["steps"].description is None  # an f-string is dropped
    assert inputs["steps"].ge is None and inputs["steps"].le is None  # only number literals
    assert inputs["name"].description == 'one " "two'  # raw text between the outer quotes
    assert inputs["name"].default == "a" and inputs["name"].choices == ["a", "b"]  # same-file constants
    assert not inputs["token"].required  # cog's exception for Secret
    assert (inputs["strength"].default, inputs["strength"].ge, inputs["strength"].le) == (-0.5, -1.0, 1.0)
    assert math.isclose(inputs["strength"].le, 1.0) and inputs["strength"].nullable
