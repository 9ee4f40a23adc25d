"""Aspect-ratio buckets: which sizes each training image is trained at, never upscaled.

Rules (the README repeats them for users):
- Each requested resolution R is a pixel budget of R x R. An image's bucket at R keeps the image's
  aspect ratio (clamped to 1:4..4:1; the rest is cropped), with sides floored to multiples of 64 so
  images of similar shape share a bucket and can be batched together.
- An image is trained at every requested resolution whose bucket fits inside it (multi-resolution
  training, what a list like "512,768,1024" asks for). It is never upscaled: a resolution larger than
  the image is skipped for that image.
- An image smaller than every requested resolution is still used once, at its own size floored to a
  multiple of 16 (the VAE's 8x reduction times FLUX.1's 2x2 latent packing), with a log line.
- Resizing covers the bucket (one downscale factor for both sides, Lanczos), then a centred crop.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass

from PIL import Image

log = logging.getLogger(__name__)

BUCKET_STEP = 64
MIN_SIDE_STEP = 16  # the smallest side granularity FLUX.1 accepts: 8x VAE, 2x2 packing
MAX_ASPECT = 4.0


@dataclass(frozen=True)
class Sample:
    """One training item: example `index` at bucket size width x height."""

    index: int
    width: int
    height: int
    resolution: int | None  # the requested resolution, None for an image used at its own size

    @property
    def bucket(self) -> tuple[int, int]:
        return (self.width, self.height)


def bucket_size(image_size: tuple[int, int], resolution: int) -> tuple[int, int] | None:
    """The bucket (width, height) of an image at a resolution, or None when it would need upscaling."""
    width, height = image_size
    aspect = min(max(width / height, 1 / MAX_ASPECT), MAX_ASPECT)
    bucket_w = int(resolution * math.sqrt(aspect)) // BUCKET_STEP * BUCKET_STEP
    bucket_h = int(resolution / math.sqrt(aspect)) // BUCKET_STEP * BUCKET_STEP
    if bucket_w < BUCKET_STEP or bucket_h < BUCKET_STEP or bucket_w > width or bucket_h > height:
        return None
    return bucket_w, bucket_h


def native_size(image_size: tuple[int, int]) -> tuple[int, int] | None:
    """An image smaller than every resolution: its own size (aspect clamped), floored to multiples of 16."""
    width, height = image_size
    if width / height > MAX_ASPECT:
        width = int(height * MAX_ASPECT)
    elif height / width > MAX_ASPECT:
        height = int(width * MAX_ASPECT)
    width = width // MIN_SIDE_STEP * MIN_SIDE_STEP
    height = height // MIN_SIDE_STEP * MIN_SIDE_STEP
    if width < MIN_SIDE_STEP or height < MIN_SIDE_STEP:
        return None
    return width, height


def assign_buckets(
    sizes: list[tuple[int, int]], resolutions: tuple[int, ...], names: list[str] | None = None
) -> list[Sample]:
    """Every (image, size) pair trained on; an image too small for any size at all is left out (logged)."""
    names = names or [f"image {i}" for i in range(len(sizes))]
    samples: list[Sample] = []
    small: list[str] = []
    for index, size in enumerate(sizes):
        fitting = [(r, bucket_size(size, r)) for r in resolutions]
        fitting = [(r, b) for r, b in fitting if b is not None]
        if fitting:
            samples.extend(Sample(index, w, h, r) for r, (w, h) in fitting)
            continue
        own = native_size(size)
        if own is None:
            log.warning("%s (%dx%d) is too small to train on and is skipped", names[index], *size)
            continue
        small.append(f"{names[index]} ({size[0]}x{size[1]})")
        samples.append(Sample(index, own[0], own[1], None))
    if small:
        log.warning(
            "%d images are smaller than the smallest resolution %d and are trained at their own size "
            "(never upscaled): %s",
            len(small),
            min(resolutions),
            ", ".join(small[:10]) + (" ..." if len(small) > 10 else ""),
        )
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for sample in samples:
        counts[sample.bucket] += 1
    log.info(
        "%d training samples in %d buckets: %s",
        len(samples),
        len(counts),
        ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items())),
    )
    return samples


def fit_to_bucket(image: Image.Image, width: int, height: int) -> Image.Image:
    """Downscale to cover width x height (never up), then crop the centre."""
    scale = max(width / image.width, height / image.height)
    if scale > 1:
        raise ValueError(f"bucket {width}x{height} would upscale a {image.width}x{image.height} image")
    if scale < 1:
        new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def epoch_batches(samples: list[Sample], batch_size: int, rng: random.Random) -> list[list[Sample]]:
    """One pass over the samples as batches of one bucket each (a bucket's remainder is a smaller batch)."""
    by_bucket: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for sample in samples:
        by_bucket[sample.bucket].append(sample)
    batches: list[list[Sample]] = []
    for bucket in sorted(by_bucket):
        members = list(by_bucket[bucket])
        rng.shuffle(members)
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches
