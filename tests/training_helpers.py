"""Shared pieces of the training tests: a small zip of images, some with captions; a synthetic cache
and the tiny transformer on the meta device (the CPU's stand-in for an accelerator)."""

import io
import zipfile
from pathlib import Path

import torch
from PIL import Image

from toys.tiny import TEXT_DIM, build_transformer
from training.buckets import Sample
from training.cache import TensorStore, TrainingCache

SEQ = 7  # T5 tokens of the synthetic cache's prompts
SAMPLES = [Sample(0, 64, 64, 64), Sample(1, 64, 64, 64), Sample(2, 96, 64, 64)]

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


def synthetic_cache(samples: list[Sample], preserved: bool = False) -> TrainingCache:
    """A cache as build_cache leaves it (CPU tensors), without running the VAE and text encoders;
    preserved: with the captions of two class words the preservation loss reads (captions 2 and 3)."""
    g = torch.Generator().manual_seed(0)
    latents, texts = TensorStore(None), TensorStore(None)
    for number, s in enumerate(samples):
        latents.put(str(number), {"latents": torch.randn(16, s.height // 8, s.width // 8, generator=g)})
    for number in range(4 if preserved else 2):  # caption 0, the empty caption 1, the class-word ones
        texts.put(
            str(number),
            {"prompt": torch.randn(SEQ, TEXT_DIM, generator=g), "pooled": torch.randn(TEXT_DIM, generator=g)},
        )
    return TrainingCache(
        latents=latents,
        texts=texts,
        caption_of_sample=[0] * len(samples),
        dropout_caption=1,
        preserved_captions_of_sample=[[2, 3]] * len(samples) if preserved else None,
    )


def meta_transformer(guidance_embeds: bool = True) -> torch.nn.Module:
    """The tiny dev (or schnell, without guidance input) transformer, frozen, on the meta device."""
    return build_transformer(guidance_embeds=guidance_embeds, seed=0).requires_grad_(False).to("meta")
