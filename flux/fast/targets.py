"""Which Linears of a FLUX transformer get fp8 copies, and what those copies cost.

One list for both the code that makes the copies (transformer.py) and the memory plan that decides at
setup whether they fit (path.py): a plan counting every Linear (11.9 GB for FLUX.1) instead of these
(8.6 GB per variant) refused copies that would fit.

What gets fp8: every nn.Linear inside the repeated blocks (19 double, 38 single in FLUX.1) except the
AdaLayerNorm modulation Linears (`norm*.linear`): those run on one row per image (negligible time) and
their output scales every activation, so quantizing them costs quality for no speed. Shapes that are not
multiples of 16 stay bf16 (torch._scaled_mm needs them aligned).
"""

import torch

from flux.fast.fp8 import fits_fp8

# diffusers' FluxTransformer2DModel names these in `_repeated_blocks`; used when a model lacks it.
DEFAULT_BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
SKIPPED_PARTS = ("norm1.linear", "norm1_context.linear", "norm.linear")
SCALE_BYTES = 4  # one float32 scale per output row


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    classes = tuple(getattr(transformer, "_repeated_blocks", None) or DEFAULT_BLOCK_CLASSES)
    return [m for m in transformer.modules() if type(m).__name__ in classes]


def block_linears(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Full name -> every nn.Linear (subclasses included) inside the repeated blocks, in module order."""
    block_ids = {id(b) for b in repeated_blocks(transformer)}
    linears: dict[str, torch.nn.Linear] = {}
    for block_name, block in transformer.named_modules():
        if id(block) not in block_ids:
            continue
        for child_path, linear in block.named_modules():
            if isinstance(linear, torch.nn.Linear):
                linears[f"{block_name}.{child_path}"] = linear
    return linears


def fp8_targets(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Full name -> plain nn.Linear that gets an fp8 copy, in module order (before FastTransformer
    installs Fp8Linear: the installed ones are no longer plain Linears and are not listed again)."""
    return {
        name: linear
        for name, linear in block_linears(transformer).items()
        if type(linear) is torch.nn.Linear and not name.endswith(SKIPPED_PARTS) and fits_fp8(linear)
    }


def fp8_copy_bytes_of(linear: torch.nn.Linear) -> int:
    """One byte per weight (e4m3) plus the row scales."""
    return linear.weight.numel() + SCALE_BYTES * linear.out_features


def planned_fp8_bytes(transformer: torch.nn.Module) -> int:
    """Bytes the fp8 copies of `transformer` will take: exactly what FastTransformer allocates."""
    return sum(fp8_copy_bytes_of(linear) for linear in fp8_targets(transformer).values())
