"""Host memory: give what a request freed back to the system, and page-lock what the GPU copies often.

Trimming: see release_free_host_memory.

Requests of varying sizes and modes (aspect ratios, img2img, inpainting, LoRA switches) allocate and
free large buffers of ever-different sizes on the host. glibc's malloc keeps freed memory in its
arenas for reuse, and with sizes that never repeat the arenas fragment: the server's resident
memory grows request after request (bench/soak.py: +1.2 GB per 1,000 tiny-model requests) although
nothing is leaked. `malloc_trim(0)` returns the free pages of every arena to the system; called
once per request it keeps the footprint flat (measured in bench/RESULTS.md, with its cost).
Where the C library is not glibc the call is absent and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        log.info("no malloc_trim in this C library: freed host memory stays with the allocator")
        return None


def release_free_host_memory() -> bool:
    """Return freed heap pages to the system; True if the C library did (glibc's malloc_trim).
    FLUX_TRIM_HOST_MEMORY=0 turns it off (to compare, or where another allocator is preloaded)."""
    if os.environ.get("FLUX_TRIM_HOST_MEMORY", "1") == "0":
        return False
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def register_host_memory(pointer: int, size: int) -> bool:
    """Page-lock `size` bytes at `pointer` for the GPU's DMA engines (exactly those bytes: the pinned
    allocator would round each block up to a power of two); False if the driver refuses."""
    import torch

    error = int(torch.cuda.cudart().cudaHostRegister(pointer, size, 0))
    return error == 0


def unregister_host_memory(pointer: int) -> None:
    import torch

    torch.cuda.cudart().cudaHostUnregister(pointer)


def unregister_all(pointers: list[int], unregister=unregister_host_memory) -> None:
    """A finalizer's body: unregister every pointer (before the memory behind them is freed)."""
    for pointer in pointers:
        unregister(pointer)


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux): what can be allocated without swapping; None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
