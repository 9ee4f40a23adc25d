"""Decoding images that users send: img2img sources, inpainting masks, training images.

Every user image goes through `open_user_image`, so the rules live in one place:
- only common photo/graphics formats are parsed (Pillow also knows EPS, which runs Ghostscript, and
  dozens of exotic formats; none of them is needed here and each is attack surface);
- the declared size is checked against an explicit pixel limit before any pixel is decoded, so a
  small file that declares 100000x100000 pixels fails fast instead of allocating gigabytes;
- truncated and unreadable files are refused with a message naming the field and the file;
- the result is always a fully loaded RGB image: EXIF orientation applied, transparency composited,
  CMYK / 16-bit / palette / 1-bit / grey converted, first frame of an animation.

Transparency is composited onto mid grey (128, 128, 128) by default. Grey keeps both dark and light
content visible (a white logo on a transparent background would vanish on white, a black one on
black), and it is the neutral value of the VAE's [-1, 1] input range, so it biases img2img and
training the least. Masks use black instead: a transparent area of a mask means "keep".
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
NEUTRAL_GREY = (128, 128, 128)
BLACK = (0, 0, 0)

# Pillow format ids that are parsed at all ("JPEG" also opens camera multi-picture JPEGs as MPO).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF")
_ALLOWED_TEXT = "expected a JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF image"


def open_user_image(
    path: Path | str,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    background: tuple[int, int, int] = NEUTRAL_GREY,
) -> Image.Image:
    """Decode a user's image file into a fully loaded RGB image, or raise UserInputError."""
    path = Path(path)
    name = path.name
    try:
        # Pillow's own bomb check warns above its global limit and raises above twice that. Turn the
        # warning into an error here, and check our explicit limit below regardless of the global
        # (another library may have set Image.MAX_IMAGE_PIXELS = None).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=list(ALLOWED_FORMATS)) as image:
                _check_declared_size(image.size, field, name, max_pixels)
                image.seek(0)  # first frame of an animation or multi-page TIFF
                image.load()
                return _to_rgb(_apply_orientation(image, name), background, name)
    except UserInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserInputError(
            field, name, f"the image declares too many pixels (at most {max_pixels:,}): {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise UserInputError(field, name, f"{_ALLOWED_TEXT}; this file is not one") from exc
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure on user data is the user's file
        raise UserInputError(
            field, name, f"{_ALLOWED_TEXT}; this one could not be decoded (truncated or corrupt?): {exc}"
        ) from exc


def open_user_mask(
    path: Path | str,
    field: str = "mask",
    *,
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode an inpainting mask as mode "L" at `size` (width, height): white = repaint, black = keep.

    A mask of another size is resized (stretched), not refused; grey levels are kept as they are
    (soft edges), the pipeline decides how to use them. Transparent areas count as black (keep).
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"mask size must be positive, got {size}")
    mask = open_user_image(path, field, max_pixels, background=BLACK).convert("L")
    if mask.size != (width, height):
        if abs(mask.width / mask.height - width / height) > 0.01 * (width / height):
            log.warning(
                "%s: %s is %dx%d, a different aspect ratio than the image (%dx%d); stretching it",
                field,
                Path(path).name,
                mask.width,
                mask.height,
                width,
                height,
            )
        mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    return mask


def _check_declared_size(size: tuple[int, int], field: str, name: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise UserInputError(field, name, f"{_ALLOWED_TEXT}; this one declares a size of {width}x{height}")
    if width * height > max_pixels:
        raise UserInputError(
            field,
            name,
            f"the image declares {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} allowed",
        )


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    # Phones store pixels sideways and an EXIF tag saying how to turn them; viewers honour it, so
    # the user expects the turned image. Broken EXIF is not worth refusing an image over.
    try:
        turned = ImageOps.exif_transpose(image)
    except Exception as exc:
        log.warning("%s: unreadable EXIF orientation (%s); using the pixels as stored", name, exc)
        return image
    return turned if turned is not None else image


def _to_rgb(image: Image.Image, background: tuple[int, int, int], name: str) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
        mode = image.mode
    if "icc_profile" in image.info and mode in ("RGB", "CMYK"):
        converted = _icc_to_srgb(image, name)
        if converted is not None:
            image, mode = converted, "RGB"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit grey to 8 bits; Pillow's plain convert clips everything above 255 to white."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # Float images come either normalised to [0, 1] or in [0, 255]; anything else is clipped.
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        values = np.nan_to_num(values) * scale
    else:
        # I;16 and I (how Pillow opens 16-bit PNG/TIFF grey) use the 16-bit range.
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _icc_to_srgb(image: Image.Image, name: str) -> Image.Image | None:
    # Phones shoot Display P3 and print files are CMYK with a profile; converting through the
    # embedded profile keeps the colours the user saw. Failing that, the plain conversion is used.
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        srgb = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
    except Exception as exc:
        log.info("%s: embedded colour profile not usable (%s); converting without it", name, exc)
        return None
