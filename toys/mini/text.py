"""Word-level tokenizers over the shapes world's vocabulary, and small frozen CLIP and T5 encoders.

T5 stays random (never trained; CLIP is trained briefly by toys.mini.clip_training), with one
deliberate design choice: T5's relative position
bias is set so each of its 4 heads looks at one neighbour (two words back, one back, itself, one
ahead). A random T5 mixes words almost evenly, so "a red circle on a blue background" and "a blue
circle on a red background" would look alike to the transformer; with the neighbour heads the
"circle" token carries "red" and the "background" token carries "blue", and the transformer can
learn which colour belongs to what. Pad tokens embed to zero, so T5's outputs for the words barely
depend on how many pads follow (512 for dev, 256 for schnell).
"""

from __future__ import annotations

import torch

from toys.shapes import COLORS, CONCEPT_SHAPE, POSITIONS, SHAPES, SIZES

EXTRA_WORDS = ("a", "an", "on", "and", "background", "TOK", "of", "the", "with", "in", "image", "photo")
CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]
# T5 relative-position buckets (bidirectional, 32 buckets): 2 = two back, 1 = one back, 0 = itself,
# 17 = one ahead. One per head.
NEIGHBOUR_BUCKETS = (2, 1, 0, 17)
NEIGHBOUR_BIAS = 20.0


def vocabulary() -> list[str]:
    words = [*COLORS, *SHAPES, CONCEPT_SHAPE, *SIZES, *EXTRA_WORDS, ","]
    words += [w for p in POSITIONS for w in p.split()]
    return list(dict.fromkeys(w.lower() for w in words))


def _word_tokenizer(special: list[str], template: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(special + vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    special_ids = [(t, vocab[t]) for t in special if t in template]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=special_ids)
    return tokenizer


def build_tokenizers():
    from toys.tiny import flux_tokenizers

    return flux_tokenizers(
        _word_tokenizer(CLIP_SPECIAL, "<|startoftext|> $A <|endoftext|>"),
        _word_tokenizer(T5_SPECIAL, "$A </s>"),
    )


def build_text_encoders(clip_tok, t5_tok, clip_dim: int, t5_dim: int, seed: int, clip_layers: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=clip_dim,
            intermediate_size=2 * clip_dim,
            num_attention_heads=2,
            num_hidden_layers=clip_layers,
            projection_dim=clip_dim,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,  # 1: pooled output is taken at the first </s>
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=t5_dim,
            d_kv=t5_dim // 4,
            d_ff=2 * t5_dim,
            num_layers=1,
            num_heads=len(NEIGHBOUR_BUCKETS),
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    with torch.no_grad():
        t5.shared.weight[t5_tok.pad_token_id] = 0.0
        bias = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # [buckets, heads]
        bias.fill_(-NEIGHBOUR_BIAS)
        for head, bucket in enumerate(NEIGHBOUR_BUCKETS):
            bias[bucket, head] = NEIGHBOUR_BIAS
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)
