"""FLUX.1's full-size architecture: the published configs of its transformer, CLIP-L, T5-XXL and VAE.

Two users: the memory plan counts the real components' bytes from them (built on the meta device:
shapes without memory), and GPU benchmarks build random-weight models of the real size from them.
"""

from __future__ import annotations

import functools

TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=[16, 56, 56],
)
CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
    hidden_act="quick_gelu",
)
T5 = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
FULL = dict(transformer=TRANSFORMER, clip=CLIP, t5=T5, vae=VAE)


def build_on_meta(name: str, guidance_embeds: bool = True):
    """One full-size component with meta tensors (no memory): for counting bytes and parameters."""
    import torch

    with torch.device("meta"):
        return _build(name, guidance_embeds)


def _build(name: str, guidance_embeds: bool):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if name == "transformer":
        return FluxTransformer2DModel(guidance_embeds=guidance_embeds, **TRANSFORMER)
    if name == "clip":
        return CLIPTextModel(CLIPTextConfig(**CLIP))
    if name == "t5":
        return T5EncoderModel(T5Config(**T5))
    if name == "vae":
        return AutoencoderKL(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **VAE)
    raise ValueError(f"no full-size FLUX.1 component named {name!r}")


@functools.cache
def full_size_module(name: str):
    """build_on_meta, once per process (the 12B transformer takes a second to build even on meta)."""
    return build_on_meta(name)
