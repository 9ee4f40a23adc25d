"""The checks of flux-mini's quality bars, as functions the benchmark and the tests share.

Every image goes through the container's own path (build_request -> generate) at the smallest size a
request accepts (256x256), and is judged by the deterministic scorer (toys.shape_scorer).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flux.fast.targets import repeated_blocks
from flux.generate import generate
from flux.loading import FluxModels
from flux.request import build_request
from toys.mini.spec import DEFAULT_DIR
from toys.shape_scorer import Score, score_image
from toys.shapes import (
    SHAPES,
    SIZES,
    Attributes,
    Example,
    generate_concept_dataset,
    held_out_prompts,
    render,
    write_dataset,
)

log = logging.getLogger(__name__)

SIDE = 256
# The heart asked for with no colour, size or place (words every training caption has).
CONCEPT_PROMPT = "a TOK on a white background"
# The class words a heart LoRA is trained to leave as the base draws them
# (diff_output_preservation_class): the world's own shape words, each taking turns.
PRESERVED_CLASSES = ", ".join(SHAPES)


@dataclass(frozen=True)
class Accuracy:
    color: float  # share of images whose scored colour is the prompted one
    shape: float  # share whose scored shape is the prompted one
    count: int


def held_out_examples(count: int, build: Path = DEFAULT_DIR) -> list[Example]:
    """The held-out colour/shape prompts every flux-mini check draws: the world the flux-mini in
    `build` trains on: plain backgrounds (no two-tone ones since issue 13), its shape sizes."""
    return held_out_prompts(count, seed=0, size=SIDE, two_tone=0.0, sizes=trained_sizes(build))


def trained_sizes(build: Path) -> tuple[str, ...]:
    """The shape sizes the transformer of the flux-mini in `build` saw (all, for builds from before
    MiniSpec.sizes)."""
    spec = json.loads((Path(build) / "build_info.json").read_text(encoding="utf-8"))["spec"]
    return tuple(spec.get("sizes", SIZES))


def prompts_of(examples: list[Example]) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) triples, as accuracy() takes them."""
    return [(e.caption, e.attributes.color, e.attributes.shape) for e in examples]


def draw(models: FluxModels, prompt: str, seed: int, model: str = "dev", steps: int | None = None, **extra):
    request = build_request(
        prompt=prompt,
        model=model,
        aspect_ratio="custom",
        width=SIDE,
        height=SIDE,
        seed=seed,
        num_inference_steps=steps,
        output_format="png",
        **extra,
    )
    return generate(models, request).images[0]


def accuracy(
    models: FluxModels, prompts: list[tuple[str, str, str]], seed: int = 0, **kwargs
) -> tuple[Accuracy, list[Score]]:
    """prompts: (prompt, colour, shape). One image per prompt, seeds seed, seed+1, ..."""
    scores = [draw(models, p, seed + i, **kwargs) for i, (p, _, _) in enumerate(prompts)]
    scores = [score_image(image) for image in scores]
    color = np.mean([s.color == c for s, (_, c, _) in zip(scores, prompts, strict=True)])
    shape = np.mean([s.shape == h for s, (_, _, h) in zip(scores, prompts, strict=True)])
    return Accuracy(float(color), float(shape), len(prompts)), scores


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class BlockCounter:
    """Counts a transformer's block forwards with a pre-hook on every block: on the eager path (go_fast's
    compiled blocks are counted by their compile backend instead, tests/test_step_cache.py)."""

    def __init__(self, transformer):
        self.count = 0
        self.handles = [block.register_forward_pre_hook(self._hit) for block in repeated_blocks(transformer)]

    def _hit(self, module, args) -> None:
        self.count += 1

    def take(self) -> int:
        """The forwards since the last take()."""
        count, self.count = self.count, 0
        return count

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def source_image(attrs: Attributes) -> Image.Image:
    return render(attrs)


def save_temp_png(image: Image.Image, folder: Path, name: str) -> Path:
    path = folder / name
    image.save(path)
    return path


def centre_distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


def concept_zip(folder: Path, images: int = 15, seed: int = 0) -> Path:
    """The training zip a user would send to teach the heart: `images` hearts of any colour, medium or
    large, anywhere, on white, each captioned with TOK in place of the shape word."""
    return write_dataset(generate_concept_dataset(images, seed=seed, size=SIDE), Path(folder) / "hearts.zip")


def concept_prompts(count: int, seed: int = 99) -> list[str]:
    """Prompts that ask for the heart in the world's words ("a large red TOK on a white background,
    top left"): captions of new concept examples, none of them a training image's (seed 0)."""
    return [e.caption for e in generate_concept_dataset(count, seed=seed, size=SIDE)]


def lora_from_tar(tar_bytes: bytes, folder: Path) -> Path:
    """The lora.safetensors of a trained weights tar (the trainer's output)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("lora.safetensors"))
        archive.extract(member, folder, filter="data")
    return Path(folder) / member.name


def fuse(models: FluxModels, lora_file: Path, scale: float = 1.0):
    """Fuse a LoRA file into dev's transformer; returns the fuser (call .clear() to restore)."""
    from lora.apply import LoraFuser
    from lora.formats import read_lora_file

    transformer = models.transformers["dev"]
    fuser = LoraFuser(transformer)
    fuser.set_loras([("concept", read_lora_file(lora_file, transformer), scale)])
    return fuser


def temp_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="flux-mini-"))


def edit(
    models: FluxModels,
    prompt: str,
    seed: int,
    image: Image.Image,
    strength: float,
    mask: Image.Image | None = None,
    steps: int = 28,
) -> Image.Image:
    """img2img (or inpainting with `mask`) at 256x256 with dev, on the components generate() uses.

    Calls the diffusers pipelines on generate()'s components directly, to set the scheduler and size
    exactly; the request path now keeps a source's size too (flux.sizes.size_for_image)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxInpaintPipeline

    from flux.generate import keep_unmasked

    pipeline_class = FluxImg2ImgPipeline if mask is None else FluxInpaintPipeline
    pipe = pipeline_class(
        transformer=models.transformers["dev"],
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.scheduler_configs["dev"]),
        vae=models.vae,
        text_encoder=models.text_encoder,
        text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer,
        tokenizer_2=models.tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    extra = {} if mask is None else {"mask_image": mask}
    with torch.inference_mode():
        out = pipe(
            prompt=prompt,
            image=image,
            strength=strength,
            width=SIDE,
            height=SIDE,
            num_inference_steps=steps,
            guidance_scale=3.0,
            max_sequence_length=512,
            generator=torch.Generator("cpu").manual_seed(seed),
            **extra,
        ).images[0]
    return out if mask is None else keep_unmasked(image, mask, out)


def bench_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every flux-mini quality bench on held-out prompts takes; add its own, then parse
    and pass the result to use_bench_arguments."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--variants", default="dev,schnell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    return parser


def use_bench_arguments(args: argparse.Namespace) -> None:
    """Warnings only, the thread count (one: comparable CPU times), flux-mini's weights, no download."""
    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ["FLUX_WEIGHTS_DIR"] = str(args.weights.resolve())
    os.environ.setdefault("FLUX_ALLOW_DOWNLOAD", "0")
