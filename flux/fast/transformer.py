"""FastTransformer: fp8 copies of a FLUX transformer's block Linears, compiled blocks, a per-request switch.

What gets fp8: every nn.Linear inside the repeated blocks (19 double, 38 single in FLUX.1) except the
AdaLayerNorm modulation Linears (`norm*.linear`): those run on one row per image (negligible time) and
their output scales every activation, so quantizing them costs quality for no speed.

Memory: the fp8 copies add half the bf16 size of the converted weights (~11.8 GB beside 23.6 GB for FLUX.1's ~11.8 B
block-Linear parameters) plus 4 bytes per output row; the bf16 weights stay as the master copy.

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
from flux.fast.fp8 import Fp8Linear, fits_fp8

log = logging.getLogger(__name__)

# diffusers' FluxTransformer2DModel names these in `_repeated_blocks`; used when a model lacks it.
DEFAULT_BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
SKIPPED_PARTS = ("norm1.linear", "norm1_context.linear", "norm.linear")


class FastTransformer:
    """Installs Fp8Linear in the blocks of `transformer` (in place) and switches it per request."""

    def __init__(self, transformer: torch.nn.Module, backend: str = "scaled_mm"):
        self.transformer = transformer
        self.backend = backend
        classes = tuple(getattr(transformer, "_repeated_blocks", None) or DEFAULT_BLOCK_CLASSES)
        self.blocks = [m for m in transformer.modules() if type(m).__name__ in classes]
        self.linears: dict[str, Fp8Linear] = {}
        self._compiled: dict[int, object] = {}
        self._install()

    def _install(self) -> None:
        started = time.perf_counter()
        block_ids = {id(b) for b in self.blocks}
        for block_name, block in self.transformer.named_modules():
            if id(block) not in block_ids:
                continue
            for child_path, linear in list(block.named_modules()):
                if type(linear) is not torch.nn.Linear or child_path.endswith(SKIPPED_PARTS):
                    continue
                if not fits_fp8(linear):
                    log.info("keeping %s.%s in bf16: shape not a multiple of 16", block_name, child_path)
                    continue
                parent_path, _, attr = child_path.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                fast = Fp8Linear(linear, self.backend)
                setattr(parent, attr, fast)
                self.linears[f"{block_name}.{child_path}"] = fast
        log.info(
            "fp8 copies of %d block Linears (%.2f GB beside %.2f GB of bf16) in %.1f s",
            len(self.linears),
            self.fp8_bytes / 1e9,
            sum(m.weight.numel() * m.weight.element_size() for m in self.linears.values()) / 1e9,
            time.perf_counter() - started,
        )

    @property
    def fp8_bytes(self) -> int:
        return sum(m.weight_fp8.numel() + m.weight_scale.numel() * 4 for m in self.linears.values())

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
