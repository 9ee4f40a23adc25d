"""flux-mini trains on 33 T5 rows with a pad bias and computes what serving at 512 computes (issue 13)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from toys.mini.short_text import full_length_attention, pad_bias, short_rows
from toys.mini.spec import MiniSpec
from toys.mini.text import build_text_encoders, build_tokenizers
from toys.mini.transformer_training import build_transformer


@pytest.fixture(scope="module")
def encoders():
    clip_tok, t5_tok = build_tokenizers()
    clip, t5 = build_text_encoders(clip_tok, t5_tok, 32, 64, seed=0)
    return t5_tok, t5


def t5_rows(encoders, captions: list[str], length: int) -> torch.Tensor:
    tokenizer, t5 = encoders
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return t5(ids.input_ids)[0]


@pytest.mark.parametrize("length", [512, 256])  # dev, schnell
def test_short_prompt_with_pad_bias_matches_the_full_forward(encoders, length):
    captions = ["a small red circle on a blue background, top left", "", "a green star on a white background"]
    full = t5_rows(encoders, captions, length)
    short = short_rows(full.transpose(0, 1), 32).transpose(0, 1)
    spec = dataclasses.replace(MiniSpec(), double_blocks=1, single_blocks=1)
    transformer = build_transformer(spec, guidance_embeds=True, seed=0).eval()
    with torch.no_grad():
        # Not the zero init: random gates and output, so every block really reads the text.
        for param in transformer.parameters():
            param.add_(
                0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel()))
            )
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 16, 64, generator=g)
    common = dict(
        hidden_states=image,
        timestep=torch.tensor([0.9, 0.5, 0.99]),
        guidance=torch.ones(3),
        pooled_projections=torch.randn(3, spec.clip_dim, generator=g),
        img_ids=torch.zeros(16, 3),
        return_dict=False,
    )
    with torch.no_grad():
        reference = transformer(encoder_hidden_states=full, txt_ids=torch.zeros(length, 3), **common)[0]
        plain = transformer(encoder_hidden_states=short, txt_ids=torch.zeros(33, 3), **common)[0]
        with full_length_attention(transformer, length):
            biased = transformer(encoder_hidden_states=short, txt_ids=torch.zeros(33, 3), **common)[0]
    assert (plain - reference).abs().max() > 1e-3  # without the bias the short prompt differs
    assert (biased - reference).abs().max() < 1e-5


def test_pad_bias_counts_the_copies(encoders):
    full = t5_rows(encoders, ["a red circle"], 512)  # 3 words + </s>: pads repeat from row 6
    bias = pad_bias(short_rows(full[0], 32)[None], 512)[0]
    assert torch.all(bias[:6] == 0) and bias[32] == 0
    assert torch.allclose(bias[6:32], torch.full((26,), torch.log(torch.tensor(505 / 26))))
