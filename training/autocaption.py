"""Autocaption: captions for training images that came without a .txt, written by Florence-2.

Florence-2's <MORE_DETAILED_CAPTION> task describes an image in a paragraph of plain sentences, the prompt
style FLUX.1 was trained on. The user's prefix and suffix are added here in code, not asked of the model (users
of the public trainer report that a captioner told to include them drops them); the trigger-word rule of
training/dataset.py then applies as for any caption. Images with a .txt keep it.

The captioner is loaded for the captioning only: autocaption_dataset unloads it (off the accelerator, memory
returned) before training starts.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from pathlib import Path

import torch
from PIL import Image

from training.dataset import TrainingExample, caption_with_trigger
from weights.helper_models import CAPTIONER, resolve_helper_weights

log = logging.getLogger(__name__)
ENV_MAX_NEW_TOKENS = "FLUX_AUTOCAPTION_MAX_TOKENS"

TASK = "<MORE_DETAILED_CAPTION>"
MAX_NEW_TOKENS = 256  # Florence-2's paragraph captions run 60-150 tokens; this bounds a runaway generation
NUM_BEAMS = 3  # the setting Florence-2's authors caption with
PROGRESS_LINES = 20  # at most about this many progress lines, whatever the dataset size
AUTOCAPTION = "autocaption"  # TrainingExample.caption_source of a caption written here


class Captioner:
    def __init__(
        self,
        model,
        processor,
        device: torch.device | str,
        max_new_tokens: int = MAX_NEW_TOKENS,
        num_beams: int = NUM_BEAMS,
    ):
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    @classmethod
    def load(cls, device: torch.device | str = "cpu", folder: Path | None = None, **options) -> Captioner:
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        path = resolve_helper_weights(CAPTIONER, folder)
        device = torch.device(device)
        # bf16 on an accelerator halves the 1.5 GB; the CPU keeps fp32, where bf16 matmuls are slow.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True)
        processor = Florence2Processor.from_pretrained(path)
        log.info("captioner loaded from %s on %s", path, device)
        return cls(model.to(device), processor, device, **options)

    @torch.inference_mode()
    def caption(self, image: Image.Image) -> str:
        """A detailed natural-language description of the image, whitespace collapsed."""
        if self.model is None:
            raise RuntimeError("the captioner was unloaded; load it again to caption")
        inputs = self.processor(text=TASK, images=image.convert("RGB"), return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        generated = self.model.generate(
            input_ids=inputs["input_ids"].to(self.device),
            pixel_values=inputs["pixel_values"].to(self.device, dtype),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,  # the same images give the same captions
        )
        text = self.processor.batch_decode(generated, skip_special_tokens=True)[0]
        parsed = self.processor.post_process_generation(text, task=TASK, image_size=image.size)[TASK]
        return " ".join(str(parsed).split())

    def unload(self) -> None:
        """Free the model: off the accelerator, references dropped, the CUDA cache returned."""
        if self.model is None:
            return
        on_cuda = self.device.type == "cuda"
        self.model.to("cpu")
        self.model = None
        gc.collect()
        if on_cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("captioner unloaded")


def needs_caption(example: TrainingExample) -> bool:
    # "trigger": the dataset found no .txt and put the trigger word alone as a placeholder.
    return example.caption_source == "trigger"


def compose_caption(caption: str, trigger_word: str, prefix: str | None, suffix: str | None) -> str:
    """prefix + model caption + suffix, then the trigger-word rule (prepended unless already present)."""
    parts = [part.strip() for part in (prefix, caption, suffix) if part and part.strip()]
    return caption_with_trigger(" ".join(parts), trigger_word)


def autocaption_examples(
    examples: list[TrainingExample],
    captioner: Captioner,
    trigger_word: str,
    prefix: str | None = None,
    suffix: str | None = None,
) -> list[TrainingExample]:
    """The examples with every caption-less image captioned; the others returned unchanged, order kept."""
    todo = sum(1 for example in examples if needs_caption(example))
    every = max(1, -(-todo // PROGRESS_LINES))
    result = []
    done = 0
    started = time.perf_counter()
    for example in examples:
        if not needs_caption(example):
            result.append(example)
            continue
        described = captioner.caption(example.image)
        if not described:
            log.warning(
                "%s: the captioner returned nothing; the caption is the prefix/suffix/trigger word alone",
                example.source,
            )
        caption = compose_caption(described, trigger_word, prefix, suffix)
        result.append(dataclasses.replace(example, caption=caption, caption_source=AUTOCAPTION))
        done += 1
        if done % every == 0 or done == todo:
            per_image = (time.perf_counter() - started) / done
            log.info("captioned %d/%d (%.1f s/image)", done, todo, per_image)
        log.debug("%s: %s", example.source, caption)
    return result


def autocaption_dataset(
    examples: list[TrainingExample],
    trigger_word: str,
    prefix: str | None = None,
    suffix: str | None = None,
    device: torch.device | str = "cpu",
    folder: Path | None = None,
) -> list[TrainingExample]:
    """Load the captioner, caption what needs it, unload it (even on failure). Nothing to caption: no load."""
    if not any(needs_caption(example) for example in examples):
        log.info("autocaption: every image has a .txt caption; the captioner is not loaded")
        return list(examples)
    # Long detailed captions are what FLUX prompts like; the knob exists for CPU runs of the tiny captioner.
    max_new_tokens = int(os.environ.get(ENV_MAX_NEW_TOKENS, MAX_NEW_TOKENS))
    captioner = Captioner.load(device, folder, max_new_tokens=max_new_tokens)
    try:
        return autocaption_examples(examples, captioner, trigger_word, prefix, suffix)
    finally:
        captioner.unload()
