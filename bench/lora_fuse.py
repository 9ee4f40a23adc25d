"""Time reading and fusing a rank-16 LoRA, switching LoRAs, and a transformer step with and without one.

    python bench/lora_fuse.py                    # tiny model, CPU
    python bench/lora_fuse.py --size blocks      # FLUX.1 width, 1 double + 1 single block, bf16 (CPU ok)
    python bench/lora_fuse.py --size full --device cuda   # the full 12B architecture, bf16, random weights

The LoRA is a rank-16 PEFT file (`transformer.` keys, bf16) on every linear of every block, as the
trainer writes it: ~170 MB at full size. Random weights: compute does not depend on the values.
Download-free: the file is written to a temporary folder first, then timed from read to fused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora.apply import LoraFuser  # noqa: E402
from lora.formats import read_lora_file  # noqa: E402

TINY = dict(
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
SIZES = {
    "tiny": TINY,
    "blocks": dict(num_layers=1, num_single_layers=1, guidance_embeds=True),
    "full": dict(guidance_embeds=True),  # dev
}


def build(size: str, device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    # Built directly on the device in the target dtype: fp32 on the CPU first would take minutes.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return FluxTransformer2DModel(**SIZES[size]).eval()
    finally:
        torch.set_default_dtype(previous)


def write_lora(model: torch.nn.Module, path: Path, rank: int, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(
            ("transformer_blocks.", "single_transformer_blocks.")
        ):
            sd[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, m.in_features, generator=g) * 0.01
            ).bfloat16()
            sd[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(m.out_features, rank, generator=g) * 0.01
            ).bfloat16()
    save_file(sd, str(path))
    return path.stat().st_size


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="forward passes timed with and without the LoRA")
    args = parser.parse_args()
    dtype = torch.float32 if args.size == "tiny" else torch.bfloat16
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model = build(args.size, args.device, dtype)
    cfg = model.config
    side = 64 if args.size == "full" else 16  # latent tokens per side: 64 = a 1024x1024 image
    g = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=g).to(args.device, dtype)

    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(
        -1, 2
    )
    inputs = dict(
        hidden_states=make(1, side * side, cfg.in_channels),
        encoder_hidden_states=make(1, 512 if args.size != "tiny" else 8, cfg.joint_attention_dim),
        pooled_projections=make(1, cfg.pooled_projection_dim),
        timestep=torch.tensor([0.5], device=args.device, dtype=dtype),
        img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], 1).to(args.device, dtype),
        txt_ids=torch.zeros(512 if args.size != "tiny" else 8, 3, device=args.device, dtype=dtype),
        guidance=torch.tensor([3.5], device=args.device, dtype=dtype),
    )

    def step_times() -> float:
        with torch.no_grad():
            model(**inputs, return_dict=False)  # warm-up
            return statistics.median(
                timed(lambda: model(**inputs, return_dict=False), sync) for _ in range(args.steps)
            )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path_a, path_b = Path(tmp) / "a.safetensors", Path(tmp) / "b.safetensors"
        size_mb = write_lora(model, path_a, args.rank, 1) / 1e6
        write_lora(model, path_b, args.rank, 2)
        base_step = step_times()
        fuser = LoraFuser(model)
        holder = {}
        rows.append(
            (
                "read A (safetensors -> canonical)",
                timed(lambda: holder.update(a=read_lora_file(path_a, model)), sync),
            )
        )
        holder["b"] = read_lora_file(path_b, model)
        rows.append(
            (
                "fuse A, first time (incl. backup copy)",
                timed(lambda: fuser.set_loras([("a", holder["a"], 1.0)]), sync),
            )
        )
        lora_step = step_times()
        rows.append(
            ("same request again (no-op)", timed(lambda: fuser.set_loras([("a", holder["a"], 1.0)]), sync))
        )
        rows.append(
            (
                "switch A -> B (restore + fuse)",
                timed(lambda: fuser.set_loras([("b", holder["b"], 1.0)]), sync),
            )
        )
        rows.append(
            (
                "A + B together",
                timed(lambda: fuser.set_loras([("a", holder["a"], 1.0), ("b", holder["b"], 0.5)]), sync),
            )
        )
        rows.append(("clear (restore base)", timed(fuser.clear, sync)))
    print(
        f"size={args.size} device={args.device} dtype={dtype} rank={args.rank} file={size_mb:.1f} MB "
        f"modules={len(holder['a'])} backup={fuser.backup_bytes / 1e9:.2f} GB"
    )
    for what, seconds in rows:
        print(f"| {what} | {seconds * 1000:.1f} ms |")
    print(f"| transformer step without LoRA (median of {args.steps}) | {base_step * 1000:.1f} ms |")
    print(
        f"| transformer step with LoRA fused | {lora_step * 1000:.1f} ms (ratio {lora_step / base_step:.3f}) |"
    )


if __name__ == "__main__":
    main()
