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
    ("given", "expected"), [((256, 1440), (256, 1440)), ((1001, 777), (1008, 784)), ((300, 263), (304, 256))]
)
def test_custom_sizes_round_to_multiple_of_16(given, expected):
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
        (("1:1", "1", 512, None), "width", "custom"),
    ],
)
def test_bad_sizes_name_field_value_and_allowed(args, field, fragment):
    with pytest.raises(UserInputError) as error:
        resolve_size(*args)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: got ")
    assert fragment in str(error.value)


def test_image_size_keeps_aspect_ratio_at_the_pixel_count():
    w, h = size_for_image((3000, 2000), "1")
    assert (w % 16, h % 16) == (0, 0)
    assert abs(w / h - 1.5) < 0.02
    assert abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.03
    w4, h4 = size_for_image((3000, 2000), "0.25")
    assert abs(w4 * h4 - 512 * 512) / (512 * 512) < 0.05


def test_image_size_caps_extreme_panoramas():
    w, h = size_for_image((10000, 100), "1")
    assert w <= 1536 and h >= 16


def test_megapixels_sent_as_numbers_are_the_same_choices():
    assert resolve_size("1:1", 0.25, None, None) == (512, 512)
    assert resolve_size("1:1", 1, None, None) == (1024, 1024)
    with pytest.raises(UserInputError, match="megapixels: got 0.5"):
        resolve_size("1:1", 0.5, None, None)
