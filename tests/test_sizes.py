import logging

import pytest

from errors import UserInputError
from flux.sizes import ASPECT_RATIOS, resolve_size, size_for_image

REPLICATE_TABLE = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}


def test_table_is_replicates_exactly():
    assert ASPECT_RATIOS == REPLICATE_TABLE


@pytest.mark.parametrize("ratio", REPLICATE_TABLE)
def test_quarter_megapixels_halves_both_sides(ratio):
    w, h = REPLICATE_TABLE[ratio]
    assert resolve_size(ratio, "0.25", None, None) == (w // 2, h // 2)
    assert resolve_size(ratio, "1", None, None) == (w, h)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ((256, 1440), (256, 1440)),
        ((1000, 777), (1008, 784)),
        ((300, 263), (304, 272)),
        ((1439, 257), (1440, 272)),
    ],
)
def test_custom_sizes_round_up_to_multiple_of_16(given, expected):
    assert resolve_size("custom", "1", *given) == expected


@pytest.mark.parametrize(
    ("args", "field", "fragment"),
    [
        (("7:3", "1", None, None), "aspect_ratio", "16:9"),
        (("1:1", "2", None, None), "megapixels", "0.25"),
        (("custom", "1", None, 512), "width", "required"),
        (("custom", "1", 512, None), "height", "required"),
        (("custom", "1", 255, 512), "width", "256-1440"),
        (("custom", "1", 512, 1441), "height", "256-1440"),
    ],
)
def test_bad_sizes_name_field_value_and_allowed(args, field, fragment):
    with pytest.raises(UserInputError) as error:
        resolve_size(*args)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: got ")
    assert fragment in str(error.value)


def test_width_and_height_with_a_preset_ratio_are_ignored_with_a_log_line(caplog):
    caplog.set_level(logging.WARNING)
    assert resolve_size("16:9", "1", 512, 700) == (1344, 768)
    assert "width=512, height=700 ignored: used only with aspect_ratio=custom" in caplog.text


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ((300, 200), (304, 208)),  # kept, each side rounded up to a multiple of 16
        ((1024, 1024), (1024, 1024)),
        ((3000, 2000), (1440, 960)),  # scaled down to fit 1440x1440
        ((2000, 3000), (960, 1440)),
        ((10000, 100), (1440, 16)),
    ],
)
def test_image_size_is_the_input_size_within_1440(image, expected):
    assert size_for_image(image) == expected


def test_megapixels_sent_as_numbers_are_the_same_choices():
    assert resolve_size("1:1", 0.25, None, None) == (512, 512)
    assert resolve_size("1:1", 1, None, None) == (1024, 1024)
    with pytest.raises(UserInputError, match="megapixels: got 0.5"):
        resolve_size("1:1", 0.5, None, None)
