"""FastTransformer: fp8 copies of a FLUX transformer's block Linears, compiled blocks, a per-request switch.

What gets fp8: targets.py (the block Linears except the AdaLayerNorm modulation ones).

Memory: the fp8 copies add half the bf16 size of the converted weights (8.6 GB beside 17.2 GB of bf16
for FLUX.1's targeted block Linears) plus 4 bytes per output row; the bf16 weights stay the master copy.

Switching per request is a flag per module (`use_fp8`) and, for compiled blocks, the module's compiled
call (nn.Module runs `_compiled_call_impl` when it is set, as nn.Module.compile does; clearing it runs the
block eagerly).
Compiled code only ever sees use_fp8=True, so flipping the switch never recompiles; refreshing after a
LoRA change writes the fp8 buffers in place, so that never recompiles either.
"""

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from flux.fast.compiled import block_call, compile_region
from flux.fast.fp8 import Fp8Linear
from flux.fast.targets import fp8_targets, repeated_blocks

log = logging.getLogger(__name__)


class FastTransformer:
    """Installs Fp8Linear in the blocks of `transformer` (in place) and switches it per request."""

    def __init__(self, transformer: torch.nn.Module, backend: str = "scaled_mm"):
        self.transformer = transformer
        self.backend = backend
        self.blocks = repeated_blocks(transformer)
        self.linears: dict[str, Fp8Linear] = {}
        self._compiled: dict[int, object] = {}
        self._install()

    def _install(self) -> None:
        started = time.perf_counter()
        for name, linear in fp8_targets(self.transformer).items():
            parent_path, _, attr = name.rpartition(".")
            fast = Fp8Linear(linear, self.backend)
            setattr(self.transformer.get_submodule(parent_path), attr, fast)
            self.linears[name] = fast
        log.info(
            "fp8 copies of %d block Linears (%.2f GB beside %.2f GB of bf16) in %.1f s",
            len(self.linears),
            self.fp8_bytes / 1e9,
            sum(m.weight.numel() * m.weight.element_size() for m in self.linears.values()) / 1e9,
            time.perf_counter() - started,
        )

    @property
    def fp8_bytes(self) -> int:
        """Bytes of the fp8 copies as allocated (their buffers); targets.planned_fp8_bytes predicts it."""
        return sum(
            b.numel() * b.element_size()
            for m in self.linears.values()
            for b in (m.weight_fp8, m.weight_scale)
        )

    def refresh(self, names: Iterable[str] | None = None) -> int:
        """Re-quantize the fp8 copies of `names` (all when None) from the current bf16 weights."""
        chosen = (
            self.linears.values() if names is None else [self.linears[n] for n in names if n in self.linears]
        )
        count = 0
        for module in chosen:
            module.requantize()
            count += 1
        return count

    def refresh_stale(self) -> int:
        """Re-quantize exactly the modules whose bf16 weight changed in place since they were quantized.

        LoRA fusing and its exact restore both write the bf16 weights in place, which bumps each tensor's
        version counter; comparing counters finds the touched modules without the fuser telling us.
        """
        stale = [name for name, module in self.linears.items() if module.stale]
        if stale:
            started = time.perf_counter()
            self.refresh(stale)
            log.info("re-quantized %d fp8 weights in %.2f s", len(stale), time.perf_counter() - started)
        return len(stale)

    def compile_blocks(self, **compile_options) -> int:
        """Regional compilation: every repeated block runs through one compiled region (compiled.py), so
        all blocks, both variants and every request size share a few graphs.

        Compiling is lazy: the first fast forward pays it, so setup runs a warm-up forward after this.
        The blocks run eagerly until `active(True)` switches their compiled call in.
        `compile_options` go to torch.compile (tests pass a counting backend).
        """
        region = compile_region(**compile_options)
        for block in self.blocks:
            self._compiled[id(block)] = block_call(region, block)
        return len(self.blocks)

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    def set_fast(self, on: bool) -> None:
        for module in self.linears.values():
            module.use_fp8 = on
        for block in self.blocks:
            if id(block) in self._compiled:
                block._compiled_call_impl = self._compiled[id(block)] if on else None

    @contextmanager
    def active(self, on: bool = True) -> Iterator[None]:
        """Run the fast path inside the block (refreshing stale fp8 copies first); eager bf16 after it."""
        if on:
            self.refresh_stale()
        self.set_fast(on)
        try:
            yield
        finally:
            self.set_fast(False)
