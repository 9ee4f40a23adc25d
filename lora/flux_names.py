"""Where each LoRA module name of the FLUX.1 ecosystem lands in diffusers' FluxTransformer2DModel.

Black Forest Labs' original code (and so kohya sd-scripts, ComfyUI and XLabs) names the linears of
FLUX.1 differently from diffusers, and fuses some of them: a double block's `img_attn.qkv` is the
diffusers `attn.to_q`, `attn.to_k` and `attn.to_v` stacked by rows; a single block's `linear1` is
`to_q`, `to_k`, `to_v` and `proj_mlp` stacked. The tables here are built from the block counts of
the actual transformer, and the row split of a fused update is taken from the actual module shapes
(formats.py), so one table serves the full-size model and the tiny test model alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """The diffusers Linear(s) one LoRA module of a file updates.

    `modules` lists them in the order their rows appear in the file's (fused) update.
    `swap_halves`: BFL's final adaLN modulation emits (shift, scale), diffusers' norm_out (scale, shift),
    so the two row halves of that update trade places.
    """

    modules: tuple[str, ...]
    swap_halves: bool = False


# BFL name inside a double block -> diffusers names inside `transformer_blocks.{i}`.
_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}

# BFL name inside a single block -> diffusers names inside `single_transformer_blocks.{i}`.
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}

# Linears outside the blocks.
_GLOBAL = {
    "img_in": Target(("x_embedder",)),
    "txt_in": Target(("context_embedder",)),
    "time_in.in_layer": Target(("time_text_embed.timestep_embedder.linear_1",)),
    "time_in.out_layer": Target(("time_text_embed.timestep_embedder.linear_2",)),
    "vector_in.in_layer": Target(("time_text_embed.text_embedder.linear_1",)),
    "vector_in.out_layer": Target(("time_text_embed.text_embedder.linear_2",)),
    "guidance_in.in_layer": Target(("time_text_embed.guidance_embedder.linear_1",)),
    "guidance_in.out_layer": Target(("time_text_embed.guidance_embedder.linear_2",)),
    "final_layer.linear": Target(("proj_out",)),
    "final_layer.adaLN_modulation.1": Target(("norm_out.linear",), swap_halves=True),
}

# XLabs' LoRA processors: qkv_lora1/proj_lora1 act on the image stream, *2 on the text stream. In a
# single block `qkv_lora` adds to the q, k, v rows of linear1 only (not the MLP rows), and `proj_lora`
# takes linear2's full input (attention output and MLP activation), so it is an update of linear2.
_XLABS_DOUBLE = {
    "qkv_lora1": _DOUBLE["img_attn.qkv"],
    "proj_lora1": _DOUBLE["img_attn.proj"],
    "qkv_lora2": _DOUBLE["txt_attn.qkv"],
    "proj_lora2": _DOUBLE["txt_attn.proj"],
}
_XLABS_SINGLE = {
    "qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "proj_lora": ("proj_out",),
}


def block_counts(module_names: set[str] | list[str]) -> tuple[int, int]:
    """(double blocks, single blocks) of a transformer, read from its module names."""
    double = {int(m.group(1)) for n in module_names if (m := re.match(r"transformer_blocks\.(\d+)\.", n))}
    single = {
        int(m.group(1)) for n in module_names if (m := re.match(r"single_transformer_blocks\.(\d+)\.", n))
    }
    return (max(double) + 1 if double else 0, max(single) + 1 if single else 0)


def bfl_table(num_double: int, num_single: int) -> dict[str, Target]:
    """BFL module name (dotted, as in `diffusion_model.double_blocks.0.img_attn.qkv`) -> Target."""
    table = dict(_GLOBAL)
    for i in range(num_double):
        for name, parts in _DOUBLE.items():
            table[f"double_blocks.{i}.{name}"] = Target(tuple(f"transformer_blocks.{i}.{p}" for p in parts))
    for i in range(num_single):
        for name, parts in _SINGLE.items():
            table[f"single_blocks.{i}.{name}"] = Target(
                tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
            )
    return table


def xlabs_table(num_double: int, num_single: int) -> dict[str, Target]:
    """XLabs module name (`double_blocks.0.processor.qkv_lora1`) -> Target."""
    table: dict[str, Target] = {}
    for i in range(num_double):
        for name, parts in _XLABS_DOUBLE.items():
            table[f"double_blocks.{i}.processor.{name}"] = Target(
                tuple(f"transformer_blocks.{i}.{p}" for p in parts)
            )
    for i in range(num_single):
        for name, parts in _XLABS_SINGLE.items():
            table[f"single_blocks.{i}.processor.{name}"] = Target(
                tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
            )
    return table


def underscored(table: dict[str, Target]) -> dict[str, Target]:
    """The same table keyed the kohya way: every dot replaced by an underscore.

    A name whose underscored form is ambiguous is left out rather than guessed (none is, for FLUX.1).
    """
    out: dict[str, Target] = {}
    seen: set[str] = set()
    for name, target in table.items():
        key = name.replace(".", "_")
        if key in seen:
            out.pop(key, None)
            continue
        seen.add(key)
        out[key] = target
    return out
