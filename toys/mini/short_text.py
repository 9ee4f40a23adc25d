"""Train on 33 T5 rows and compute what serving at 512 computes.

dev serves every prompt padded to 512 T5 tokens (schnell to 256), and a transformer step at 512 text
rows costs ~3x one at 32. The pad rows are identical, except the first two after the words (T5's
neighbour heads see the words from there, toys.mini.text) and the last one (it has no right-hand
neighbour). FluxTransformer2DModel gives every text row the same position (txt_ids are zeros), so
identical rows stay identical through every block, and as keys they only add the same term to the
softmax many times. So a training step keeps the first `tokens` rows plus the last one, and gives
each kept copy of the repeated pad an attention bias log(copies served / copies kept): exactly the
softmax weight the 512-row sequence gives them (tests/test_flux_mini_short_text.py checks the
transformer's output against the 512-row forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from training.cache import TensorStore, TrainingCache

# Rows this close to the repeated pad row are copies of it (they are computed by the same ops from
# the same inputs; the tolerance only absorbs kernel rounding).
SAME_ROW = 1e-5


def shortened(cache: TrainingCache, tokens: int) -> TrainingCache:
    """The same cache with every T5 sequence cut to its first `tokens` rows plus its last row."""
    texts = TensorStore(None)
    for number in range(max(*cache.caption_of_sample, cache.dropout_caption) + 1):
        entry = cache.texts.get(str(number))
        prompt = entry["prompt"]
        texts.put(str(number), {"prompt": short_rows(prompt, tokens), "pooled": entry["pooled"]})
    return dataclasses.replace(cache, texts=texts)


def short_rows(prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    """[L, D] -> [tokens + 1, D]: the first `tokens` rows and the last."""
    return torch.cat([prompt[:tokens], prompt[-1:]])


def pad_bias(short: torch.Tensor, full_length: int) -> torch.Tensor:
    """[B, tokens + 1, D] short prompts -> [B, tokens + 1] additive attention bias on the text keys.

    The repeated pad is row tokens - 1 (the last of the first rows); its copies are the trailing run of
    rows equal to it. In the full sequence it repeats from the run's start to full_length - 2."""
    batch, rows, _ = short.shape
    tokens = rows - 1
    pad = short[:, tokens - 1 : tokens]
    same = (short[:, :tokens] - pad).abs().amax(-1) <= SAME_ROW  # [B, tokens]; the pad row itself too
    # Vectorised (no per-row reads): on a GPU each read is a device round trip; the per-row loop this
    # replaces cost a batch-128 step on the H200 0.15 s against 0.06 s now (bench/RESULTS.md, 2026-12-04).
    kept = same.flip(-1).long().cumprod(-1).sum(-1)  # length of the trailing run of copies
    start = tokens - kept
    served = (full_length - 1) - start
    if bool((served < kept).any()):
        raise ValueError(f"full_length {full_length} is shorter than the {rows} rows kept")
    # In float64 then rounded once, as math.log gave it before: a build stays bit-for-bit the same.
    value = torch.log(served.double() / kept.double()).to(short.dtype)
    in_run = torch.arange(rows, device=short.device)[None, :] >= start[:, None]
    in_run[:, tokens] = False  # the last row is served once and kept once
    return torch.where(in_run, value[:, None], torch.zeros((), dtype=short.dtype, device=short.device))


def attention_mask(short: torch.Tensor, image_tokens: int, full_length: int) -> torch.Tensor:
    """[B, 1, 1, text + image] float mask for joint attention: the text keys come first."""
    text = pad_bias(short, full_length)
    image = torch.zeros(text.shape[0], image_tokens, dtype=text.dtype, device=text.device)
    return torch.cat([text, image], dim=1)[:, None, None, :]


@contextmanager
def full_length_attention(transformer: torch.nn.Module, full_length: int) -> Iterator[None]:
    """While active, every forward of `transformer` on a short prompt attends as the full_length one
    would: a forward pre-hook adds joint_attention_kwargs={"attention_mask": ...}."""

    def hook(module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        image_tokens = kwargs["hidden_states"].shape[1]
        mask = attention_mask(text.detach(), image_tokens, full_length)
        extra = dict(kwargs.get("joint_attention_kwargs") or {})
        extra["attention_mask"] = mask.to(text.dtype)
        return args, {**kwargs, "joint_attention_kwargs": extra}

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
