"""Latents and text embeddings computed once before the loop, kept in memory or on disk.

The VAE and both text encoders are needed only here; afterwards they leave the accelerator, so the
loop has the transformer, its LoRA, the optimizer and the activations to itself. On disk
(cache_latents_to_disk) each entry is a safetensors file read back per step: host memory stays flat
with large datasets, at the cost of a small read per step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flux.loading import FluxModels
from training.buckets import Sample, fit_to_bucket
from training.processes import SINGLE, Processes
from training.recipe import encode_latents, image_to_pixels

log = logging.getLogger(__name__)


class TensorStore:
    """Named groups of CPU tensors, in a dict or as one safetensors file per group."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if self.folder is None:
            self._memory[key] = tensors
        else:
            save_file(tensors, str(self.folder / f"{key}.safetensors"))

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return self._memory[key]
        return load_file(str(self.folder / f"{key}.safetensors"))

    def in_memory(self) -> TensorStore:
        """Every group of a folder read into a store in memory (a folder written by several processes)."""
        if self.folder is None:
            return self
        loaded = TensorStore(None)
        for file in sorted(self.folder.glob("*.safetensors")):
            loaded._memory[file.name.removesuffix(".safetensors")] = load_file(str(file))
        return loaded


@dataclass
class TrainingCache:
    latents: TensorStore  # key: sample number -> {"latents": [16, h, w] fp32}
    texts: TensorStore  # key: caption number -> {"prompt": [seq, dim], "pooled": [dim]}
    caption_of_sample: list[int]  # sample number -> caption number
    # Caption number of what a dropped caption becomes: the trigger word alone for a LoRA (as the public
    # trainer does: dropped steps still tie the subject to the word), "" for a model trained from scratch.
    dropout_caption: int
    # sample number -> caption numbers of its caption with the trigger word replaced by each class word
    # (differential output preservation, training.recipe.preservation_loss); None when not used.
    preserved_captions_of_sample: list[list[int]] | None = None

    def in_memory(self) -> TrainingCache:
        return dataclasses.replace(self, latents=self.latents.in_memory(), texts=self.texts.in_memory())


def build_cache(
    models: FluxModels,
    images: list,
    captions: list[str],
    samples: list[Sample],
    max_sequence_length: int,
    folder: Path | None,
    preserved_captions: list[list[str]] | None = None,
    dropout_caption: str = "",
    processes: Processes = SINGLE,
) -> TrainingCache:
    """Encode every sample's image at its bucket size and every distinct caption (plus the one a
    dropped caption becomes and, given a list per image, the captions the preservation loss reads).

    processes: with several, each encodes its share (every N-th encoder batch) into `folder`, which
    they share, and waits for the others: the cache then reads what all of them wrote."""
    if processes.several and folder is None:
        raise ValueError("several training processes share their cache through a folder")
    latents = TensorStore(None if folder is None else folder / "latents")
    texts = TensorStore(None if folder is None else folder / "text")
    # In batches (latents: consecutive samples of one bucket size, ENCODE_PIXELS at most, so FLUX.1's
    # VAE at 1024x1024 goes two at a time): one at a time, the encoders' kernel launches made caching
    # flux-mini's 8,000 images take over a minute on a GPU.
    runs = _runs(samples, lambda s: (s.width, s.height), lambda s: ENCODE_PIXELS // (s.width * s.height))
    with models.visiting("vae"):  # moved in for the latents (training's plans keep it in host memory)
        for numbers in _share(runs, processes):
            pixels = [
                image_to_pixels(fit_to_bucket(images[samples[n].index], samples[n].width, samples[n].height))
                for n in numbers
            ]
            for number, encoded in zip(numbers, encode_latents(models.vae, torch.stack(pixels)), strict=True):
                latents.put(str(number), {"latents": encoded})
    log.info("cached %d latents%s", len(samples), " on disk" if folder else "")

    class_captions = [caption for per_image in preserved_captions or [] for caption in per_image]
    distinct = list(dict.fromkeys([*captions, dropout_caption, *class_captions]))
    number_of = {text: i for i, text in enumerate(distinct)}
    pipe = _text_pipeline(models)
    with torch.no_grad(), models.visiting("clip", "t5"):  # moved in for the captions (training's plans)
        for numbers in _share(_runs(distinct, lambda _: 0, lambda _: ENCODE_BATCH), processes):
            batch = [distinct[n] for n in numbers]
            prompt, pooled, _ = pipe.encode_prompt(
                prompt=batch, prompt_2=batch, device=models.device, max_sequence_length=max_sequence_length
            )
            for i, number in enumerate(numbers):
                texts.put(str(number), {"prompt": prompt[i].float(), "pooled": pooled[i].float()})
    log.info("cached %d text embeddings (T5 length %d)", len(distinct), max_sequence_length)
    processes.barrier()  # every share written before anyone reads
    return TrainingCache(
        latents=latents,
        texts=texts,
        caption_of_sample=[number_of[captions[s.index]] for s in samples],
        dropout_caption=number_of[dropout_caption],
        preserved_captions_of_sample=None
        if preserved_captions is None
        else [[number_of[c] for c in preserved_captions[s.index]] for s in samples],
    )


ENCODE_BATCH = 32  # captions per text-encoder call
ENCODE_PIXELS = 2**21  # pixels per VAE call: 32 flux-mini images of 256x256, 2 of 1024x1024


def _share(runs: list[list[int]], processes: Processes) -> list[list[int]]:
    """This process's runs: every N-th, starting at its rank (all of them for one process)."""
    return runs[processes.rank :: processes.size]


def _runs(items: list, key, most) -> list[list[int]]:
    """Indices of `items` in runs of consecutive equal key(item), each at most most(item) long (and 1)."""
    runs: list[list[int]] = []
    for index, item in enumerate(items):
        if runs and len(runs[-1]) < max(1, most(item)) and key(items[runs[-1][-1]]) == key(item):
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _text_pipeline(models: FluxModels):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    # Only encode_prompt is used: the transformer is not needed for it.
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        text_encoder_2=models.text_encoder_2,
        tokenizer_2=models.tokenizer_2,
        transformer=None,
    )


def move_encoders(models: FluxModels, device: torch.device | str) -> None:
    """Move the VAE and both text encoders (off the accelerator during the loop, back for previews) of
    models built by hand; under a memory plan (load_flux) they wait in host memory and visit by themselves."""
    if models.device.type == "cpu" or models.placement is not None:
        return
    for module in (models.vae, models.text_encoder, models.text_encoder_2):
        module.to(device)
    if torch.device(device).type == "cpu":
        torch.cuda.empty_cache()
    log.info("VAE and text encoders moved to %s", device)
