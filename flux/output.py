"""Write generated images as out-0.webp, out-1.webp, ... in the requested format."""

from pathlib import Path

from PIL import Image

PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
OUTPUT_PREFIX = "flux-out-"  # the server's output folder in the temp folder (weights.owned_folders)


def save_images(images: list[Image.Image], out_dir: Path, output_format: str, quality: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = out_dir / f"out-{index}.{output_format}"
        options = {} if output_format == "png" else {"quality": quality}  # png is lossless: quality is moot
        image.convert("RGB").save(path, format=PIL_FORMATS[output_format], **options)
        paths.append(path)
    return paths
