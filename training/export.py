"""What a training hands back: a folder (also what is pushed to the Hub) and the same files as a tar.

    lora.safetensors   PEFT keys with the `transformer.` prefix, fp16, alpha = rank; metadata below
    config.json        every training input (never the Hugging Face token) plus what was really used
    captions.txt       `<image in zip>\t<caption used>`, one line per image
    loss.png           the loss per step and its moving average
    previews/*.webp    images generated with the LoRA from fixed prompts with the trigger word

The safetensors metadata carries diffusers' `lora_adapter_metadata` (rank, alpha, targets) so
diffusers and this container load it at the trained strength, plus plain keys for people and tools.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import tarfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save

from training.config import TrainingConfig

log = logging.getLogger(__name__)

SOFTWARE_NAME = "cog-flux-lora-trainer"
SOFTWARE_VERSION = "0.1.0"
BASE_MODEL_REPO = "black-forest-labs/FLUX.1-dev"
LORA_FILE = "lora.safetensors"
TAR_NAME = "trained_model.tar"


def adapter_metadata(
    rank: int, alpha: int, target_modules: list[str], rank_pattern: dict[str, int] | None = None
) -> dict:
    """diffusers' `lora_adapter_metadata` of a plain LoRA on the transformer (before json.dumps);
    rank_pattern: layers of another rank (alpha = rank there too)."""
    adapter = {
        "transformer.r": rank,
        "transformer.lora_alpha": alpha,
        "transformer.target_modules": sorted(target_modules),
        "transformer.use_dora": False,
        "transformer.use_rslora": False,
    }
    if rank_pattern:
        adapter["transformer.rank_pattern"] = dict(sorted(rank_pattern.items()))
        adapter["transformer.alpha_pattern"] = dict(sorted(rank_pattern.items()))
    return adapter


def lora_metadata(
    config: TrainingConfig,
    target_modules: list[str],
    steps_done: int,
    rank_pattern: dict[str, int] | None = None,
    continued_from: tuple[str, int] | None = None,
) -> dict[str, str]:
    """continued_from: (the earlier LoRA as shown, the steps its own metadata recorded)."""
    adapter = adapter_metadata(config.lora_rank, config.lora_alpha, target_modules, rank_pattern)
    continued = {}
    if continued_from is not None:
        continued = {"continued_from": continued_from[0], "continued_from_steps": str(continued_from[1])}
    return {
        **continued,
        "format": "pt",
        "lora_adapter_metadata": json.dumps(adapter, sort_keys=True),
        "base_model": BASE_MODEL_REPO,
        "trigger_word": config.trigger_word,
        "steps": str(steps_done),
        "rank": str(config.lora_rank),
        "alpha": str(config.lora_alpha),
        "resolutions": ",".join(str(r) for r in config.resolutions),
        "software": SOFTWARE_NAME,
        "software_version": SOFTWARE_VERSION,
        "diffusers_version": _package_version("diffusers"),
        "peft_version": _package_version("peft"),
        "torch_version": _package_version("torch"),
    }


def save_lora_file(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """safetensors with its JSON header in sorted key order: the library writes the metadata map in
    arbitrary order, and the same training must give the same bytes."""
    data = save(state, metadata=metadata)
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    canonical += b" " * (-len(canonical) % 8)  # the format pads the header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(canonical)) + canonical + data[8 + header_len :])
    return path


def write_training_folder(
    folder: Path,
    *,
    lora_state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    config_json: dict,
    captions: list[tuple[str, str]],
    losses: list[float],
) -> Path:
    """Write everything but the previews (those are rendered into folder/previews by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_lora_file(lora_state, folder / LORA_FILE, metadata)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    lines = [f"{source}\t{' '.join(caption.split())}" for source, caption in captions]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    draw_loss_curve(losses).save(folder / "loss.png")
    return folder


def write_tar(folder: Path, tar_path: Path) -> Path:
    """Tar the folder's files (paths relative to it, sorted, so predict.py finds lora.safetensors at the top)."""
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    log.info("wrote %s (%.1f MB)", tar_path.name, tar_path.stat().st_size / 1e6)
    return tar_path


def draw_loss_curve(losses: list[float], size: tuple[int, int] = (800, 400)) -> Image.Image:
    """Loss per step (light) and its moving average (dark) on a linear axis, with min/max labels."""
    width, height = size
    left, right, top, bottom = 60, 20, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    values = [v for v in losses if math.isfinite(v)]
    if not values:
        draw.text((left + 10, top + 10), "no loss recorded", fill="black")
        return image
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def point(index: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * (index / max(1, len(losses) - 1))
        y = height - bottom - (height - top - bottom) * ((value - low) / span)
        return x, y

    raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    smooth, average = [], None
    window = max(1, len(losses) // 20)
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            continue
        average = value if average is None else average + (value - average) / min(i + 1, window)
        smooth.append(point(i, average))
    if len(raw) > 1:
        draw.line(raw, fill=(170, 190, 230), width=1)
        draw.line(smooth, fill=(20, 60, 160), width=2)
    else:
        draw.ellipse((raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2), fill=(20, 60, 160))
    draw.text((4, top), f"{high:.3f}", fill="black")
    draw.text((4, height - bottom - 10), f"{low:.3f}", fill="black")
    draw.text((left, height - bottom + 8), "step 1", fill="black")
    draw.text((width - right - 70, height - bottom + 8), f"step {len(losses)}", fill="black")
    draw.text((width // 2 - 20, height - bottom + 8), "loss", fill="black")
    return image


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
