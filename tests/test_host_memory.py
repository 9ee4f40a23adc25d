"""Freed host memory goes back to the system after each request (flux.host_memory; the soak bench,
bench/soak.py, measures what it does to a server's footprint)."""

import platform
from pathlib import Path

import pytest

from flux.host_memory import release_free_host_memory


def resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_system(monkeypatch):
    # 96 MB in 48 kB pieces (below malloc's mmap threshold: from the heap), then all freed but the
    # last, which pins the heap's top: glibc keeps the freed pages until trimmed.
    blocks = [bytearray(48 * 1024) for _ in range(2000)]
    keep = blocks[-1]
    del blocks
    monkeypatch.setenv("FLUX_TRIM_HOST_MEMORY", "0")
    assert release_free_host_memory() is False  # switched off: nothing happens
    before = resident_mb()
    monkeypatch.delenv("FLUX_TRIM_HOST_MEMORY")
    assert release_free_host_memory() is True
    assert resident_mb() < before - 50
    del keep
