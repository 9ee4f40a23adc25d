"""Shared pieces of the training tests: a small zip of images, some with captions."""

import io
import zipfile
from pathlib import Path

from PIL import Image

# (colour, size, caption or None): small images of different shapes, half of them captioned.
IMAGES = [
    ("red", (64, 64), "a red square [trigger]"),
    ("blue", (96, 64), "a blue block"),
    ("green", (64, 128), None),
    ("yellow", (80, 80), None),
]


def make_zip(path: Path, images=IMAGES) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for index, (colour, size, caption) in enumerate(images):
            buffer = io.BytesIO()
            image = Image.new("RGB", size, colour)
            image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
            image.save(buffer, "PNG")
            archive.writestr(f"photos/img{index}.png", buffer.getvalue())
            if caption is not None:
                archive.writestr(f"photos/img{index}.txt", caption)
    return path
