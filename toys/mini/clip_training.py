"""flux-mini's CLIP, trained for a few seconds so its pooled vector names what the caption asks for.

FLUX.1 adds CLIP's pooled vector to the timestep embedding, which modulates every block: the
cheapest path from the prompt to the image's colours. A random CLIP's pooled vector carried little
(a linear probe read the subject's colour in 49 % of captions, issue 13). Here linear heads on the
pooled output learn the subject's colour, its shape and the background colour from the training
captions (held-out pairs never appear); the heads are thrown away, the encoder is kept and frozen.

With `placement` (MiniSpec.clip_placement) two more heads learn the position and size words, or that
the caption has none: trained without them, the pooled vector carried position in 18 % of captions
(chance 11 %) and size in 41 % (33 %), and flux-mini drew every subject centred, of one size
(bench/RESULTS.md, 2026-12-04): image tokens give the words themselves little attention.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from toys.shapes import COLORS, POSITIONS, SHAPES, SIZES, Attributes

log = logging.getLogger(__name__)


def placement_labels(caption: str, attrs: Attributes) -> tuple[int, int]:
    """(position, size) class of a caption; the last class of each: the caption does not say."""
    position = POSITIONS.index(attrs.position) if caption.endswith(", " + attrs.position) else len(POSITIONS)
    size = list(SIZES).index(attrs.size) if f"{attrs.size} {attrs.color}" in caption else len(SIZES)
    return position, size


def train_clip(
    clip,
    tokenizer,
    captions: list[str],
    attributes: list[Attributes],
    steps: int,
    seed: int,
    placement: bool = False,
):
    """Train `clip` (a CLIPTextModel) in place on (caption, attributes) pairs; returns the last accuracy
    (the mean over the heads)."""
    if steps <= 0:
        return None
    colors, shapes = list(COLORS), list(SHAPES)
    rows = [(colors.index(a.color), shapes.index(a.shape), colors.index(a.background[0])) for a in attributes]
    classes = [len(colors), len(shapes), len(colors)]
    if placement:
        rows = [(*row, *placement_labels(c, a)) for row, c, a in zip(rows, captions, attributes, strict=True)]
        classes += [len(POSITIONS) + 1, len(SIZES) + 1]
    labels = torch.tensor(rows)
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    ids = ids.input_ids
    torch.manual_seed(seed)
    width = clip.config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(width, n) for n in classes])
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
                "clip step %d/%d | loss %.3f | accuracy colour/shape/background%s %.3f",
                step,
                steps,
                loss.item(),
                "/position/size" if placement else "",
                accuracy,
            )
    clip.eval().requires_grad_(False)
    return accuracy
