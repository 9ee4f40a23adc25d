"""Rowwise fp8 (e4m3) for Linear layers: one scale per weight row and one per activation row.

Rowwise scales keep an outlier row (common in FLUX activations) from crushing every other row's
precision, which one scale per tensor would. The product runs on the fp8 tensor cores through
torch._scaled_mm; `emulated_linear` computes the same quantized math in float32, so the CPU can test it.

torch._scaled_mm(a, b, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum) has this
signature from torch 2.5 on (2.11 on the GPU machine, 2.13 here): a [M, K] row-major, b [K, N]
column-major (a transposed row-major [N, K] weight), scale_a [M, 1] and scale_b [1, N] in float32.
"""

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# _scaled_mm needs K and N to be multiples of 16; every FLUX.1 block Linear is (3072, 12288, 15360).
ALIGN = 16
# Whether _scaled_mm adds the bias itself; capability.py turns this off where a torch build refuses a
# bias with rowwise scales, and the bias is then added after the product.
FUSED_BIAS = True


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (e4m3 [R, K], float32 scale [R, 1]) with x ~= q * scale; each row's max maps to 448."""
    wide = x.float()
    # The floor keeps an all-zero row (a zero-initialised LoRA target, padding) from dividing by zero.
    scale = wide.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def scaled_mm_rowwise(
    qa: torch.Tensor,
    scale_a: torch.Tensor,
    qw: torch.Tensor,
    scale_w: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """qa [M, K] e4m3 times qw [N, K] e4m3 transposed, rescaled: scale_a [M, 1], scale_w [1, N]."""
    out = torch._scaled_mm(
        qa,
        qw.t(),  # a view: row-major [N, K] is the column-major [K, N] the kernel wants
        scale_a=scale_a,
        scale_b=scale_w,
        bias=bias if FUSED_BIAS else None,
        out_dtype=out_dtype,
        use_fast_accum=True,  # Hopper's fast fp8 accumulation; the quality guard measures its effect
    )
    return out if bias is None or FUSED_BIAS else out + bias


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def emulated_linear(
    x: torch.Tensor, qw: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The fp8 rowwise product computed in float32: same quantization of x and W, exact accumulation."""
    flat = x.reshape(-1, x.shape[-1])
    qa, scale_a = quantize_rowwise(flat)
    out = dequantize(qa, scale_a) @ dequantize(qw, scale_w.view(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def fp8_linear(
    x: torch.Tensor, qw: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x W^T + b with x quantized per row on the fly and W already quantized per output row."""
    flat = x.reshape(-1, x.shape[-1])
    qa, scale_a = quantize_rowwise(flat)
    out = scaled_mm_rowwise(qa, scale_a, qw, scale_w, bias, x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fits_fp8(linear: torch.nn.Linear) -> bool:
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


class Fp8Linear(torch.nn.Linear):
    """An nn.Linear that also holds an fp8 copy of its weight and can run either.

    It shares the original module's weight and bias Parameters (the bf16 master copy, which LoRA fusing
    edits in place), so names, state_dict and LoRA targeting are unchanged. The fp8 copy lives in
    non-persistent buffers: half the bf16 weight's bytes plus 4 bytes a row.

    `use_fp8` selects the path per request; `backend` is "scaled_mm" (the GPU) or "emulate" (float32
    reference, for tests and for devices without fp8).
    """

    def __init__(self, linear: torch.nn.Linear, backend: str = "scaled_mm"):
        torch.nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        device = linear.weight.device
        self.register_buffer(
            "weight_fp8", torch.zeros(self.out_features, self.in_features, dtype=FP8, device=device), False
        )
        self.register_buffer(
            "weight_scale", torch.ones(1, self.out_features, dtype=torch.float32, device=device), False
        )
        self.backend = backend
        self.use_fp8 = False
        self.quantized_version = -1  # the weight's in-place version counter when the copy was made
        self.requantize()

    @torch.no_grad()
    def requantize(self) -> None:
        """Quantize the current bf16 weight into the existing buffers (in place: compiled code keeps them)."""
        q, scale = quantize_rowwise(self.weight.detach())
        self.weight_fp8.copy_(q)
        self.weight_scale.copy_(scale.view(1, -1))
        self.quantized_version = self.weight._version

    @property
    def stale(self) -> bool:
        """True when the weight changed in place (LoRA fuse or restore) since the last requantize()."""
        return self.weight._version != self.quantized_version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_fp8:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.backend == "emulate":
            return emulated_linear(x, self.weight_fp8, self.weight_scale, self.bias)
        return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.use_fp8}, backend={self.backend}"
