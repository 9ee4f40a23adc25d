"""Decoding of user images (img2img source, mask, training images): formats, conversions, refusals."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from errors import UserInputError
from flux.images import NEUTRAL_GREY, open_user_image, open_user_mask


def _gradient(width: int = 48, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels (the data is one short row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 30)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("PNG", ".png"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("TIFF", ".tif")]
)
def test_lossless_formats_round_trip(tmp_path: Path, fmt: str, suffix: str) -> None:
    source = _gradient()
    path = tmp_path / f"img{suffix}"
    source.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    image = open_user_image(path, "image")
    assert image.mode == "RGB"
    assert image.size == (48, 32)
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_jpeg_decodes_close_to_source(tmp_path: Path) -> None:
    source = _gradient()
    path = tmp_path / "photo.jpg"
    source.save(path, "JPEG", quality=95)
    image = open_user_image(path, "image")
    assert image.mode == "RGB" and image.size == (48, 32)
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(source, dtype=int))
    assert diff.mean() < 4


def test_text_file_named_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(UserInputError) as info:
        open_user_image(path, "image")
    message = str(info.value)
    assert message.startswith("image:") and "notes.png" in message and "not one" in message


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    full = tmp_path / "full.png"
    noisy.save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UserInputError) as info:
        open_user_image(cut, "image")
    assert "cut.png" in str(info.value) and "could not be decoded" in str(info.value)


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    full = tmp_path / "full.jpg"
    noisy.save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UserInputError, match="cut.jpg"):
        open_user_image(cut, "image")


def test_decompression_bomb_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(100_000, 100_000))
    assert path.stat().st_size < 200
    started = time.perf_counter()
    with pytest.raises(UserInputError) as info:
        open_user_image(path, "image")
    assert time.perf_counter() - started < 1.0
    assert "bomb.png" in str(info.value) and "pixels" in str(info.value)


def test_pixel_limit_is_ours_not_pillows_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 8000x8000 = 64 M pixels: under Pillow's default warning level, over our 40 M default.
    path = tmp_path / "big.png"
    path.write_bytes(_png_declaring(8000, 8000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # another library may switch Pillow's check off
    with pytest.raises(UserInputError, match="8000x8000"):
        open_user_image(path, "image")
    small = tmp_path / "small.png"
    _gradient().save(small)
    with pytest.raises(UserInputError, match="at most 1,000"):
        open_user_image(small, "image", max_pixels=1000)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    image = open_user_image(path, "image")
    assert image.size == (20, 40)
    # Turned clockwise, the stored top-left corner ends up top-right.
    top_right = np.asarray(image)[2, 17]
    top_left = np.asarray(image)[2, 2]
    assert top_right[0] > 200 and top_right[2] < 60
    assert top_left[2] > 200 and top_left[0] < 60


def test_rgba_is_composited_onto_grey(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 8))
    path = tmp_path / "cutout.png"
    rgba.save(path)
    pixels = np.asarray(open_user_image(path, "image"))
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert tuple(pixels[0, 7]) == NEUTRAL_GREY  # not the red hidden under alpha 0


def test_grey_with_alpha_is_composited(tmp_path: Path) -> None:
    la = Image.new("LA", (4, 4), (255, 0))
    path = tmp_path / "la.png"
    la.save(path)
    assert tuple(np.asarray(open_user_image(path, "image"))[0, 0]) == NEUTRAL_GREY


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = open_user_image(path, "image")
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image)[8, 8]
    assert red > 230 and green < 25 and blue < 25


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16).repeat(4, 0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    pixels = np.asarray(open_user_image(path, "image"))
    assert pixels.shape == (4, 4, 3)
    assert list(pixels[0, :, 0]) == [0, 128, 255, 4]
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (6, 6), 0)
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    palette_image.paste(1, (0, 0, 3, 6))
    path = tmp_path / "sticker.png"
    palette_image.save(path, transparency=0)
    pixels = np.asarray(open_user_image(path, "image"))
    assert tuple(pixels[0, 0]) == (0, 255, 0)
    assert tuple(pixels[0, 5]) == NEUTRAL_GREY


def test_one_bit_image(tmp_path: Path) -> None:
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (4, 0, 8, 8))
    path = tmp_path / "scan.png"
    bilevel.save(path)
    pixels = np.asarray(open_user_image(path, "image"))
    assert tuple(pixels[0, 0]) == (0, 0, 0) and tuple(pixels[0, 7]) == (255, 255, 255)


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = open_user_image(path, "image")
    assert image.mode == "RGB" and image.size == (10, 10)
    assert tuple(np.asarray(image)[5, 5]) == (255, 0, 0)


def test_disallowed_format_is_refused(tmp_path: Path) -> None:
    # A valid image in a format outside the allowed list (here PPM) is not parsed at all.
    path = tmp_path / "old.png"
    _gradient().save(path, "PPM")
    with pytest.raises(UserInputError, match="not one"):
        open_user_image(path, "image")


def test_result_is_detached_from_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _gradient().save(path)
    image = open_user_image(path, "image")
    path.unlink()  # the file handle was closed and the pixels are in memory
    assert image.getpixel((0, 0)) == (0, 0, 255)


def test_mask_is_resized_and_grey(tmp_path: Path) -> None:
    mask = Image.new("RGB", (10, 10), (0, 0, 0))
    mask.paste((255, 255, 255), (0, 0, 5, 10))  # repaint the left half
    path = tmp_path / "mask.png"
    mask.save(path)
    result = open_user_mask(path, size=(40, 20))
    assert result.mode == "L" and result.size == (40, 20)
    pixels = np.asarray(result)
    assert pixels[10, 2] == 255 and pixels[10, 37] == 0


def test_mask_transparency_means_keep(tmp_path: Path) -> None:
    mask = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 4, 8))
    path = tmp_path / "mask.png"
    mask.save(path)
    pixels = np.asarray(open_user_mask(path, size=(8, 8)))
    assert pixels[0, 0] == 255 and pixels[0, 7] == 0


def test_mask_errors_name_the_mask_field(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    path.write_bytes(b"GIF89a nonsense")
    with pytest.raises(UserInputError) as info:
        open_user_mask(path, size=(8, 8))
    assert str(info.value).startswith("mask:") and "mask.png" in str(info.value)


def test_camera_multi_picture_jpeg_gives_first_picture(tmp_path: Path) -> None:
    path = tmp_path / "camera.jpg"
    first, second = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    first.save(path, "MPO", save_all=True, append_images=[second])
    with Image.open(path) as raw:
        assert raw.format == "MPO"
    red, green, blue = np.asarray(open_user_image(path, "image"))[4, 4]
    assert red > 240 and green < 15 and blue < 15


def test_embedded_colour_profile_is_honoured(tmp_path: Path) -> None:
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = _gradient()
    path = tmp_path / "tagged.png"
    source.save(path, icc_profile=srgb)
    pixels = np.asarray(open_user_image(path, "image"), dtype=int)
    assert np.abs(pixels - np.asarray(source, dtype=int)).max() <= 2  # sRGB -> sRGB is (nearly) identity


def test_unusable_colour_profile_falls_back_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from PIL import ImageCms

    xyz = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()  # not an RGB profile
    path = tmp_path / "odd.png"
    Image.new("RGB", (4, 4), (100, 150, 200)).save(path, icc_profile=xyz)
    with caplog.at_level("INFO"):
        image = open_user_image(path, "image")
    assert image.getpixel((0, 0)) == (100, 150, 200)
    assert "odd.png" in caplog.text and "colour profile not usable" in caplog.text
