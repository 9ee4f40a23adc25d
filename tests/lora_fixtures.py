"""One known LoRA update, written out in every file layout the loader accepts.

Each writer takes the same known update ({diffusers module: (down, up, alpha)}) and returns a state
dict (+ metadata) whose effective update is exactly that one, so every layout must load to the same
deltas and the same model output. The BFL/XLabs name tables here are written out independently of
lora/flux_names.py, so a wrong entry there cannot cancel out in the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

TINY_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
    guidance_embeds=True,
)


def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_CONFIG).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def fixed_inputs(seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random but fixed transformer inputs: a 4x4 latent grid (16 tokens) and 5 text tokens."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
    return dict(
        hidden_states=torch.randn(1, 16, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.7]).to(dtype),
        img_ids=torch.cat([torch.zeros(16, 1), img_ids.float()], dim=1).to(dtype),
        txt_ids=torch.zeros(5, 3).to(dtype),
        guidance=torch.tensor([3.5]).to(dtype),
    )


@torch.no_grad()
def run(transformer: FluxTransformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]


@dataclass(frozen=True)
class Known:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.down.shape[0]) * (self.up.double() @ self.down.double())


KnownUpdate = dict[str, Known]


def linear_names(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: tuple(m.weight.shape) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
    }


def known_update(
    shapes: dict[str, tuple[int, int]],
    modules: list[str] | None = None,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    std: float = 0.15,
) -> KnownUpdate:
    """A random update of `modules` (default: every linear) with the given rank and alpha."""
    g = torch.Generator().manual_seed(seed)
    out: KnownUpdate = {}
    for name in modules if modules is not None else sorted(shapes):
        rows, cols = shapes[name]
        out[name] = Known(
            down=torch.randn(rank, cols, generator=g) * std,
            up=torch.randn(rows, rank, generator=g) * std,
            alpha=alpha,
        )
    return out


# ---- name tables (independent of lora/flux_names.py) -------------------------------------------------

_GLOBALS = [
    ("img_in", ["x_embedder"]),
    ("txt_in", ["context_embedder"]),
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
    ("final_layer.linear", ["proj_out"]),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"]),  # rows (shift, scale) vs (scale, shift)
]


def bfl_groups(num_double: int, num_single: int) -> list[tuple[str, list[str]]]:
    groups = list(_GLOBALS)
    for i in range(num_double):
        d = f"transformer_blocks.{i}."
        groups += [
            (f"double_blocks.{i}.img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"]),
            (f"double_blocks.{i}.img_attn.proj", [d + "attn.to_out.0"]),
            (f"double_blocks.{i}.img_mlp.0", [d + "ff.net.0.proj"]),
            (f"double_blocks.{i}.img_mlp.2", [d + "ff.net.2"]),
            (f"double_blocks.{i}.img_mod.lin", [d + "norm1.linear"]),
            (
                f"double_blocks.{i}.txt_attn.qkv",
                [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
            ),
            (f"double_blocks.{i}.txt_attn.proj", [d + "attn.to_add_out"]),
            (f"double_blocks.{i}.txt_mlp.0", [d + "ff_context.net.0.proj"]),
            (f"double_blocks.{i}.txt_mlp.2", [d + "ff_context.net.2"]),
            (f"double_blocks.{i}.txt_mod.lin", [d + "norm1_context.linear"]),
        ]
    for i in range(num_single):
        s = f"single_transformer_blocks.{i}."
        groups += [
            (
                f"single_blocks.{i}.linear1",
                [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"],
            ),
            (f"single_blocks.{i}.linear2", [s + "proj_out"]),
            (f"single_blocks.{i}.modulation.lin", [s + "norm.linear"]),
        ]
    return groups


def xlabs_groups(num_double: int, num_single: int) -> list[tuple[str, list[str]]]:
    groups = []
    for i in range(num_double):
        d = f"transformer_blocks.{i}."
        groups += [
            (f"double_blocks.{i}.processor.qkv_lora1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"]),
            (f"double_blocks.{i}.processor.proj_lora1", [d + "attn.to_out.0"]),
            (
                f"double_blocks.{i}.processor.qkv_lora2",
                [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
            ),
            (f"double_blocks.{i}.processor.proj_lora2", [d + "attn.to_add_out"]),
        ]
    for i in range(num_single):
        s = f"single_transformer_blocks.{i}."
        groups += [
            (f"single_blocks.{i}.processor.qkv_lora", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"]),
            (f"single_blocks.{i}.processor.proj_lora", [s + "proj_out"]),
        ]
    return groups


def xlabs_modules(num_double: int, num_single: int) -> list[str]:
    """The modules an XLabs file can update."""
    return [m for _, mods in xlabs_groups(num_double, num_single) for m in mods]


def _fuse(parts: list[Known], swap_halves: bool = False) -> Known:
    """One update whose rows are the parts' updates stacked: block-diagonal up, stacked down.

    All parts share rank r and alpha a; the fused rank is k*r, so alpha k*a keeps the scale a/r.
    """
    rank = parts[0].down.shape[0]
    down = torch.cat([p.down for p in parts])
    up = torch.zeros(sum(p.up.shape[0] for p in parts), rank * len(parts))
    row = 0
    for j, p in enumerate(parts):
        up[row : row + p.up.shape[0], j * rank : (j + 1) * rank] = p.up
        row += p.up.shape[0]
    if swap_halves:
        half = up.shape[0] // 2
        up = torch.cat([up[half:], up[:half]])
    return Known(down=down, up=up, alpha=parts[0].alpha * len(parts))


def _grouped(update: KnownUpdate, groups: list[tuple[str, list[str]]]) -> dict[str, Known]:
    """Fuse the known update onto the groups whose modules it covers (all or none of each group)."""
    out = {}
    covered = set()
    for name, mods in groups:
        present = [m for m in mods if m in update]
        if not present:
            continue
        assert len(present) == len(mods), f"fixture covers part of {name}"
        out[name] = _fuse([update[m] for m in mods], swap_halves=name.endswith("adaLN_modulation.1"))
        covered.update(mods)
    missing = set(update) - covered
    assert not missing, f"fixture modules not expressible in this layout: {sorted(missing)[:3]}"
    return out


def _counts(update: KnownUpdate) -> tuple[int, int]:
    double = {int(n.split(".")[1]) for n in update if n.startswith("transformer_blocks.")}
    single = {int(n.split(".")[1]) for n in update if n.startswith("single_transformer_blocks.")}
    return (max(double, default=-1) + 1, max(single, default=-1) + 1)


# ---- writers: KnownUpdate -> (state dict, metadata) ----------------------------------------------------

StateDict = dict[str, torch.Tensor]


def to_peft(
    update: KnownUpdate,
    prefix: str = "transformer.",
    alpha: str = "keys",
    names: tuple[str, str] = ("lora_A", "lora_B"),
) -> tuple[StateDict, dict[str, str]]:
    """diffusers/PEFT/ai-toolkit keys. alpha: "keys" (.alpha tensors), "metadata" (diffusers'
    lora_adapter_metadata), or "baked" (no alpha anywhere: the scale is multiplied into up)."""
    sd: StateDict = {}
    for name, k in update.items():
        up = k.up * (k.alpha / k.down.shape[0]) if alpha == "baked" else k.up
        sd[f"{prefix}{name}.{names[0]}.weight"] = k.down.clone()
        sd[f"{prefix}{name}.{names[1]}.weight"] = up.clone()
        if alpha == "keys":
            sd[f"{prefix}{name}.alpha"] = torch.tensor(k.alpha)
    metadata = {"format": "pt"}
    if alpha == "metadata":
        alphas = {k.alpha for k in update.values()}
        ranks = {k.down.shape[0] for k in update.values()}
        assert len(alphas) == 1 and len(ranks) == 1
        config = {
            "transformer.r": ranks.pop(),
            "transformer.lora_alpha": alphas.pop(),
            "transformer.alpha_pattern": {},
        }
        metadata["lora_adapter_metadata"] = json.dumps(config)
    return sd, metadata


def to_kohya(update: KnownUpdate) -> tuple[StateDict, dict[str, str]]:
    """kohya sd-scripts: lora_unet_<BFL name, dots as underscores>, fused qkv/linear1, .alpha per module."""
    sd: StateDict = {}
    for name, k in _grouped(update, bfl_groups(*_counts(update))).items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = k.down
        sd[key + ".lora_up.weight"] = k.up
        sd[key + ".alpha"] = torch.tensor(float(k.alpha))
    return sd, {"ss_network_module": "networks.lora_flux"}


def to_kohya_diffusers_names(update: KnownUpdate) -> tuple[StateDict, dict[str, str]]:
    """kohya-style keys over diffusers names: lora_transformer_<diffusers name, dots as underscores>."""
    sd: StateDict = {}
    for name, k in update.items():
        key = "lora_transformer_" + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = k.down.clone()
        sd[key + ".lora_up.weight"] = k.up.clone()
        sd[key + ".alpha"] = torch.tensor(k.alpha)
    return sd, {}


def to_bfl(
    update: KnownUpdate, prefix: str = "diffusion_model.", names=("lora_A", "lora_B"), alpha: bool = True
):
    """BFL/ComfyUI naming: diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (fused)."""
    sd: StateDict = {}
    for name, k in _grouped(update, bfl_groups(*_counts(update))).items():
        up = k.up if alpha else k.up * (k.alpha / k.down.shape[0])
        sd[f"{prefix}{name}.{names[0]}.weight"] = k.down
        sd[f"{prefix}{name}.{names[1]}.weight"] = up
        if alpha:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(float(k.alpha))
    return sd, {}


def to_xlabs(update: KnownUpdate) -> tuple[StateDict, dict[str, str]]:
    """XLabs: double_blocks.0.processor.qkv_lora1.down.weight; no alpha (scale baked into up)."""
    sd: StateDict = {}
    for name, k in _grouped(update, xlabs_groups(*_counts(update))).items():
        sd[f"{name}.down.weight"] = k.down
        sd[f"{name}.up.weight"] = k.up * (k.alpha / k.down.shape[0])
    return sd, {}


def save(path: Path, sd: StateDict, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or None)
    return path
