"""Whether this process can run the fp8 fast path, and if not, one sentence saying why."""

from dataclasses import dataclass

import torch

# fp8 tensor cores arrived with Ada (sm_89) and Hopper (sm_90); older GPUs have no e4m3 matmul.
MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class FastSupport:
    available: bool
    reason: str  # why not (or what was found, when available), for the one log line


def detect_fast_support(device: torch.device) -> FastSupport:
    """Check the device, its compute capability and torch._scaled_mm; probe one tiny fp8 product."""
    if device.type != "cuda":
        return FastSupport(False, f"device is {device.type}, not a CUDA GPU with fp8 tensor cores")
    if not torch.cuda.is_available():
        return FastSupport(False, "CUDA is not available in this process")
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return FastSupport(
            False,
            f"{name} is sm_{capability[0]}{capability[1]}; fp8 matmuls need sm_89 or newer (Ada, Hopper)",
        )
    if not hasattr(torch, "_scaled_mm"):
        return FastSupport(False, f"torch {torch.__version__} has no torch._scaled_mm")
    try:
        _probe(device)
    except (RuntimeError, TypeError) as error:  # a build without fp8 kernels says so only when called
        return FastSupport(False, f"torch._scaled_mm failed on {name}: {error}")
    return FastSupport(True, f"{name} (sm_{capability[0]}{capability[1]}) runs fp8 rowwise matmuls")


def _probe(device: torch.device) -> None:
    from flux.fast import fp8

    a = torch.randn(16, 32, device=device, dtype=torch.bfloat16)
    b = torch.randn(16, 32, device=device, dtype=torch.bfloat16)
    bias = torch.randn(16, device=device, dtype=torch.bfloat16)
    qa, sa = fp8.quantize_rowwise(a)
    qb, sb = fp8.quantize_rowwise(b)
    fp8.scaled_mm_rowwise(qa, sa, qb, sb.view(1, -1), None, torch.bfloat16)
    torch.cuda.synchronize(device)
    try:
        fp8.scaled_mm_rowwise(qa, sa, qb, sb.view(1, -1), bias, torch.bfloat16)
        torch.cuda.synchronize(device)
    except RuntimeError:
        fp8.FUSED_BIAS = False  # this build takes no bias with rowwise scales: add it after the product
