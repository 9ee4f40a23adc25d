"""8-bit storage (the 8bit memory plan, flux/eight_bit.py): what it changes, on the CPU.

    .venv/bin/python bench/eight_bit_quality.py [--prompts 40] [--variants dev,schnell] [--json out.json]

1. flux-mini through the container's request path (load_flux with the plan, generate), the held-out
   colour/shape prompts of the quality bench (seeds fixed), 256x256, default steps: PSNR of the image
   with 8-bit stored block Linears (fp8 e4m3 and int8, rowwise scales) against the image with their
   bf16 originals, and the held-out accuracy kept (shapes scorer). The compute runs in float32 on the
   CPU for both, so the difference is the storage's alone (on a GPU both compute in bf16).
2. One full-width FLUX.1 double block and one single block (3072 wide, random weights), 256 image +
   64 text tokens: relative output error of 8-bit storage against bf16 weights, beside the error bf16
   weights themselves make against float32 (the scale of an error FLUX.1 already lives with).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux.eight_bit import storage_targets, store_in_eight_bit  # noqa: E402
from flux.full_size import TRANSFORMER  # noqa: E402
from toys.mini import quality  # noqa: E402
from toys.shape_scorer import score_image  # noqa: E402

STORAGES = ("fp8", "int8")
CPU = torch.device("cpu")


def to_bf16_originals(transformer: torch.nn.Module) -> None:
    """Round the stored Linears to bf16 (kept in float32): the originals a GPU would hold."""
    with torch.no_grad():
        for linear in storage_targets(transformer).values():
            linear.weight.copy_(linear.weight.to(torch.bfloat16).float())


def mini_images(variant: str, storage: str | None, prompts) -> list[np.ndarray]:
    from flux.loading import load_flux
    from flux.memory_plan import choose_plan

    models = load_flux((variant,), plan=choose_plan(None, (variant,), forced="resident"))
    transformer = models.transformers[variant]
    to_bf16_originals(transformer)
    if storage is not None:
        store_in_eight_bit(transformer, storage, home=CPU, work=CPU)
    images = []
    for i, (prompt, _, _) in enumerate(prompts):
        images.append(np.asarray(quality.draw(models, prompt, seed=1000 + i, model=variant)))
    return images


def mini_section(variants: list[str], count: int, weights: Path) -> dict:
    prompts = quality.prompts_of(quality.held_out_examples(count, weights))
    results = {}
    for variant in variants:
        base = mini_images(variant, None, prompts)
        runs = {"bf16": _scores(base, base, prompts)}
        for storage in STORAGES:
            runs[storage] = _scores(mini_images(variant, storage, prompts), base, prompts)
        for run in runs.values():
            run["accuracy_kept"] = (run["color"] + run["shape"]) / max(
                runs["bf16"]["color"] + runs["bf16"]["shape"], 1e-9
            )
        results[variant] = runs
        print(f"\nflux-mini {variant} ({len(prompts)} held-out prompts, 256x256, default steps)")
        print("storage  PSNR mean/min vs bf16   colour  shape  kept")
        for name, run in runs.items():
            print(
                f"{name:8s} {run['psnr_mean']:6.1f}/{run['psnr_min']:5.1f}"
                f"            {run['color']:6.3f} {run['shape']:6.3f}  {100 * run['accuracy_kept']:5.1f}%",
                flush=True,
            )
    return results


def _scores(images, base, prompts) -> dict:
    scores = [score_image(Image.fromarray(image)) for image in images]
    psnrs = [quality.psnr(a, b) for a, b in zip(images, base, strict=True) if not np.array_equal(a, b)]
    return dict(
        psnr_mean=float(np.mean(psnrs)) if psnrs else float("inf"),
        psnr_min=float(np.min(psnrs)) if psnrs else float("inf"),
        identical=len(images) - len(psnrs),
        color=float(np.mean([s.color == c for s, (_, c, _) in zip(scores, prompts, strict=True)])),
        shape=float(np.mean([s.shape == h for s, (_, _, h) in zip(scores, prompts, strict=True)])),
    )


def block_section(image_tokens: int = 256, text_tokens: int = 64) -> dict:
    """Relative error ||y - y_ref|| / ||y_ref|| of one full-width block of each kind."""
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    dim = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    heads, head_dim = TRANSFORMER["num_attention_heads"], TRANSFORMER["attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, image_tokens, dim, generator=g)
    context = torch.randn(1, text_tokens, dim, generator=g)
    temb = torch.randn(1, dim, generator=g)
    ids = torch.cat([torch.zeros(text_tokens, 3), torch.rand(image_tokens, 3, generator=g) * 16])
    rotary = FluxPosEmbed(theta=10000, axes_dim=list(TRANSFORMER["axes_dims_rope"]))(ids)
    results = {}
    for kind, block_class in (("double", FluxTransformerBlock), ("single", FluxSingleTransformerBlock)):
        torch.manual_seed(1)
        fp32 = block_class(dim, heads, head_dim).eval().requires_grad_(False)
        state = fp32.state_dict()
        outputs = {"fp32": _block_output(fp32, hidden, context, temb, rotary)}
        for storage in ("bf16", *STORAGES):
            holder = _Holder(block_class(dim, heads, head_dim).eval().requires_grad_(False))
            holder.block.load_state_dict(state)
            to_bf16_originals(holder)
            if storage != "bf16":
                store_in_eight_bit(holder, storage, home=CPU, work=CPU)
            outputs[storage] = _block_output(holder.block, hidden, context, temb, rotary)
        errors = {"bf16_vs_fp32": _relative(outputs["bf16"], outputs["fp32"])}
        errors.update({f"{s}_vs_bf16": _relative(outputs[s], outputs["bf16"]) for s in STORAGES})
        results[kind] = errors
        print(
            f"full-width {kind} block ({image_tokens}+{text_tokens} tokens): relative error "
            + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()),
            flush=True,
        )
    return results


class _Holder(torch.nn.Module):
    """Lets storage_targets see a lone block as a transformer's repeated block."""

    _repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block


@torch.no_grad()
def _block_output(block, hidden, context, temb, rotary) -> torch.Tensor:
    return block(hidden, context, temb, image_rotary_emb=rotary)[1]  # both kinds: (text, image)


def _relative(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


def main() -> None:
    parser = quality.bench_arguments(__doc__)
    parser.add_argument("--skip-mini", action="store_true")
    args = parser.parse_args()
    quality.use_bench_arguments(args)
    results = {"block": block_section()}
    if not args.skip_mini:
        results["flux_mini"] = mini_section(args.variants.split(","), args.prompts, args.weights)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
