"""Which attention kernels torch may choose, set once for the whole process.

Backward through the full-size FLUX.1 transformer faults on the H200 with cuDNN attention
(CUBLAS_STATUS_EXECUTION_FAILED / illegal memory access; ../shared/GPU.md), while a one-block model
and isolated attention pass. The fix must be global: a context manager around the forward alone
misses gradient-checkpoint recompute, which runs outside it and then picks another kernel. Serving,
training and the benchmark all call this, so the benchmark times the kernels production runs.
Flash and memory-efficient attention stay allowed; inference speed was measured with cuDNN off too.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_logged = False


def configure_attention_backends() -> None:
    """Turn cuDNN scaled-dot-product attention off (idempotent; a no-op in effect without CUDA)."""
    global _logged
    # Set on every call (cheap): something else in the process may have turned it back on.
    torch.backends.cuda.enable_cudnn_sdp(False)
    if not _logged:
        _logged = True
        log.info("attention: cuDNN scaled-dot-product attention off (it faults in FLUX.1 backward)")
