"""Copies of original weights for LoRA restores, packed into a few exact-size slabs of host memory.

Why slabs: pinning each module's copy on its own goes through torch's pinned-memory allocator, which
rounds every block up to a power of two: a 3072x12288 bf16 weight (72 MiB) takes 128 MiB, and a LoRA
on every block of FLUX.1 pins ~37 GB per variant for 23.7 GB of weights. Here each batch of new copies
(the modules a LoRA change touches for the first time) gets one plain CPU buffer per dtype, of exactly
their size, with every copy a view into it.

Why cudaHostRegister: pinned memory lets the host<->GPU copies of a restore run at DMA speed. The
buffers are pinned by registering them with the CUDA driver (what torch's own checkpoint stager does),
which pins exactly the bytes asked for, instead of allocating them pinned (which would round the slab
up again). Without CUDA, or where pinning fails (a locked-memory limit), the buffers stay pageable.
"""

import logging
import weakref
from collections.abc import Mapping

import torch

from flux.host_memory import register_host_memory, unregister_all, unregister_host_memory

log = logging.getLogger(__name__)


class BackupSlabs:
    """Owns the slabs; `keep` copies a batch of weights into a new one and returns views, one per name."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.slabs: list[torch.Tensor] = []
        self.pinned_bytes = 0
        self._registered: list[int] = []
        # Unregister before the memory is freed (a freed, still-registered range breaks later pins),
        # with the function that registered it.
        weakref.finalize(self, unregister_all, self._registered, unregister_host_memory)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for copies: the slabs' exact sizes."""
        return sum(slab.numel() * slab.element_size() for slab in self.slabs)

    @torch.no_grad()
    def keep(self, weights: Mapping[str, torch.Tensor], pin: bool | None = None) -> dict[str, torch.Tensor]:
        """Copy `weights` (name -> tensor) into new slabs; returns name -> copy (a view into a slab).

        pin: page-lock the slabs; None pins copies of GPU weights (when CUDA is there), not of CPU ones.
        """
        by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
        for name, weight in weights.items():
            by_dtype.setdefault(weight.dtype, []).append((name, weight))
        copies: dict[str, torch.Tensor] = {}
        for dtype, group in by_dtype.items():
            slab = torch.empty(sum(w.numel() for _, w in group), dtype=dtype, device=self.device)
            self._maybe_pin(slab, any(w.is_cuda for _, w in group) if pin is None else pin)
            self.slabs.append(slab)
            offset = 0
            for name, weight in group:
                copy = slab[offset : offset + weight.numel()].view(weight.shape)
                copy.copy_(weight.detach())
                copies[name] = copy
                offset += weight.numel()
        return copies

    def _maybe_pin(self, slab: torch.Tensor, pin: bool) -> None:
        if not pin or self.device.type != "cpu" or not torch.cuda.is_available() or slab.numel() == 0:
            return
        size = slab.numel() * slab.element_size()
        if register_host_memory(slab.data_ptr(), size):
            self._registered.append(slab.data_ptr())
            self.pinned_bytes += size
        else:
            log.warning("could not pin %.2f GB of LoRA backups; restores use pageable memory", size / 1e9)
