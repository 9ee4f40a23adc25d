"""8-bit storage of a transformer's block Linears, with the exact bf16 originals kept in host memory.

Weight-only: each output row of a weight is stored as 8-bit codes times one float32 scale (fp8 e4m3
where the GPU has fp8 units, else int8), and the forward dequantizes the weight to the compute dtype
before the usual matmul, so activations keep their precision. That halves the transformer on the GPU
(23.8 -> 12.0 GB for FLUX.1), which is what lets it run on a 24 GB card.

The bf16 original of each weight stays in host memory (it is the loaded tensor, not a copy): a LoRA is
fused into the original in float32, rounded to bf16 once, and stored in 8 bit again; "no LoRA" stores
the original again, which quantizes to the very same codes, so the base output comes back bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from flux.fast.fp8 import FP8, FP8_MAX, emulated_linear, fp8_linear
from flux.fast.targets import block_linears

INT8_MAX = 127.0
STORAGE_DTYPES = {"fp8": FP8, "int8": torch.int8}


def storage_targets(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Full name -> every nn.Linear inside the repeated blocks (99.4 % of FLUX.1's weights)."""
    return block_linears(transformer)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (codes [out, in] in the storage dtype, float32 scale [out, 1])."""
    wide = weight.float()
    top = FP8_MAX if storage == "fp8" else INT8_MAX
    # The floor keeps an all-zero row (padding, a zero-initialised layer) from dividing by zero.
    scale = wide.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
    scaled = (wide / scale).clamp(-top, top)
    codes = scaled.to(FP8) if storage == "fp8" else scaled.round().to(torch.int8)
    return codes, scale


class EightBitLinear(torch.nn.Linear):
    """An nn.Linear whose weight lives on the device in 8 bit, its bf16 original in host memory.

    Still an nn.Linear (isinstance), so LoRA targeting, peft's training wrappers and name lookups see
    the same module tree; `weight` is a read-only dequantized view for code that reads it, and
    `store(bf16)` is the only way to change what is stored.
    """

    def __init__(self, linear: torch.nn.Linear, storage: str, home: torch.device, work: torch.device):
        """home: where the codes live; work: where they are computed (the GPU, when there is one)."""
        torch.nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.storage = storage
        self.original = linear.weight.detach()  # host memory, exact bf16: never a buffer, never moved
        self.bias = linear.bias
        # go_fast on fp8 storage: the product runs on the fp8 tensor cores with the stored codes (each
        # activation row quantized on the fly, as go_fast's fp8 copies do), no copy and no dequantize.
        self.use_fp8 = False
        self.backend = "scaled_mm"  # or "emulate": the same math in float32 (tests, CPU benches)
        shape = tuple(linear.weight.shape)
        self.register_buffer("codes", torch.empty(shape, dtype=STORAGE_DTYPES[storage], device=home))
        self.register_buffer("scale", torch.empty(shape[0], 1, dtype=torch.float32, device=home))
        self.store(self.original.to(work))

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        """Quantize `weight` where it is (any float dtype) and write the codes in place."""
        codes, scale = quantize_weight(weight, self.storage)
        self.codes.copy_(codes)
        self.scale.copy_(scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.codes.to(torch.float32) * self.scale).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight, dequantized to the original's dtype (a new tensor: writing it changes nothing)."""
        return self.dequantized(self.original.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fp8:
            product = emulated_linear if self.backend == "emulate" else fp8_linear
            return product(x, self.codes, self.scale.view(1, -1), self.bias)
        return torch.nn.functional.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage}"


class Fp8Storage:
    """go_fast for a transformer stored in fp8 (the 8bit plan on an fp8 GPU): FastPath's per-request
    switch, turning the stored codes' fp8 product on and off. Nothing to refresh: LoRA fusing writes
    the codes themselves."""

    def __init__(self, transformer: torch.nn.Module, backend: str = "scaled_mm"):
        self.linears = [
            m for m in transformer.modules() if isinstance(m, EightBitLinear) and m.storage == "fp8"
        ]
        for module in self.linears:
            module.backend = backend

    @contextmanager
    def active(self, on: bool = True) -> Iterator[None]:
        for module in self.linears:
            module.use_fp8 = on
        try:
            yield
        finally:
            for module in self.linears:
                module.use_fp8 = False

    def refresh_stale(self) -> int:
        return 0


def store_in_eight_bit(
    transformer: torch.nn.Module, storage: str, home: torch.device, work: torch.device
) -> int:
    """Replace every storage target by an EightBitLinear whose codes live on `home`, computed on `work`
    (the transformer's other parameters stay where they are); returns the number of 8-bit weights."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"8-bit storage {storage!r}: allowed {', '.join(STORAGE_DTYPES)}")
    stored = 0
    for name, linear in storage_targets(transformer).items():
        parent, _, attr = name.rpartition(".")
        eight = EightBitLinear(linear, storage, home, work)
        setattr(transformer.get_submodule(parent), attr, eight)
        stored += eight.codes.numel()
    return stored
