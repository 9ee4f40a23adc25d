"""flux-mini's CLIP, trained for a few seconds so its pooled vector names what the caption asks for.

FLUX.1 adds CLIP's pooled vector to the timestep embedding, which modulates every block: the
cheapest path from the prompt to the image's colours. A random CLIP's pooled vector carried little
(a linear probe read the subject's colour in 49 % of captions, issue 13). Here linear heads on the
pooled output learn the subject's colour, its shape and the background colour from the training
captions (held-out pairs never appear); the heads are thrown away, the encoder is kept and frozen.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from toys.shapes import COLORS, SHAPES, Attributes

log = logging.getLogger(__name__)


def train_clip(clip, tokenizer, captions: list[str], attributes: list[Attributes], steps: int, seed: int):
    """Train `clip` (a CLIPTextModel) in place on (caption, attributes) pairs; returns the last accuracy."""
    if steps <= 0:
        return None
    colors, shapes = list(COLORS), list(SHAPES)
    labels = torch.tensor(
        [(colors.index(a.color), shapes.index(a.shape), colors.index(a.background[0])) for a in attributes]
    )
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    ids = ids.input_ids
    torch.manual_seed(seed)
    width = clip.config.hidden_size
    heads = torch.nn.ModuleList(
        [
            torch.nn.Linear(width, len(colors)),
            torch.nn.Linear(width, len(shapes)),
            torch.nn.Linear(width, len(colors)),
        ]
    )
    clip.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([*clip.parameters(), *heads.parameters()], lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    accuracy = 0.0
    for step in range(1, steps + 1):
        batch = torch.from_numpy(rng.integers(0, len(captions), size=64))
        pooled = clip(ids[batch]).pooler_output
        logits = [head(pooled) for head in heads]
        loss = sum(torch.nn.functional.cross_entropy(x, labels[batch, i]) for i, x in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = float(
            np.mean([(x.argmax(-1) == labels[batch, i]).float().mean().item() for i, x in enumerate(logits)])
        )
        if step % 50 == 0 or step == steps:
            log.info(
                "clip step %d/%d | loss %.3f | accuracy colour/shape/background %.3f",
                step,
                steps,
                loss.item(),
                accuracy,
            )
    clip.eval().requires_grad_(False)
    return accuracy
