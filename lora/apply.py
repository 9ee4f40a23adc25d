"""Fuse one or more LoRAs into a transformer's Linear weights, with an exact way back.

Fused, because the per-step cost must stay the base model's: W = W0 + sum_i scale_i * delta_W_i is
written into the weights, so a denoising step runs the same kernels as without a LoRA.

The way back is a copy, never a subtraction: before a module is first modified, its original weight
is copied (to the CPU by default) and every later change starts by copying it back, bit for bit.
Subtracting the update instead would leave rounding residue in bf16 that grows with every switch.

Memory: one copy of each module any LoRA has ever touched, in the weight's dtype, packed into a few
exact-size host slabs (lora/backups.py: no power-of-two rounding). A LoRA on every block linear of
FLUX.1 touches nearly the whole transformer, 23.7 GB in bf16 of host memory (pinned when the model is
on a GPU, so restores are fast). The copies are kept for the life of the fuser: switching LoRAs then
never reads the GPU back again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from flux.eight_bit import EightBitLinear
from lora.backups import BackupSlabs
from lora.formats import CanonicalLora, LoraUpdate

logger = logging.getLogger(__name__)

# (cache key or id, canonical LoRA, scale) as set_loras receives them.
LoraRequest = tuple[str, CanonicalLora, float]


class LoraFuser:
    """Keeps a transformer's weights equal to base + the requested LoRAs, and only changes them on change."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        backup_device: torch.device | str = "cpu",
        host_originals: Callable[[str], torch.Tensor | None] | None = None,
    ):
        """host_originals: module name -> an exact host copy of its base weight that already exists
        (the memory plan's, for a transformer it swaps), used instead of a backup copy."""
        self._linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        self._host_originals = host_originals
        self.backups = BackupSlabs(backup_device)
        self._originals: dict[str, torch.Tensor] = {}  # views into self.backups' slabs
        self._modified: set[str] = set()
        # What the weights hold now: () is the base model; None means unknown (a failed restore).
        self._active: tuple[tuple[str, float], ...] | None = ()

    @property
    def active(self) -> tuple[tuple[str, float], ...] | None:
        """(id, scale) of the LoRAs fused now, in request order; () for the base model."""
        return self._active

    @property
    def backup_bytes(self) -> int:
        """Bytes held by the copies of original weights this fuser made."""
        return self.backups.nbytes

    def set_loras(self, loras: Sequence[LoraRequest]) -> bool:
        """Make the weights base + sum(scale * update) of `loras`. Returns True if the weights changed.

        LoRAs with scale 0 are skipped, so scale 0 gives the base model exactly. If the requested
        (id, scale) list equals the active one, nothing is computed or copied.
        """
        chosen = [(key, lora, float(scale)) for key, lora, scale in loras if float(scale) != 0.0]
        wanted = tuple((key, scale) for key, _, scale in chosen)
        if wanted == self._active:
            return False
        self._check_fits(chosen)  # everything is checked before any weight changes
        start = time.perf_counter()
        self._active = None
        try:
            self._restore()
            self._fuse(chosen)
        except BaseException:
            logger.error("fusing LoRAs failed; restoring the base weights")
            self._restore()
            self._active = ()
            raise
        self._active = wanted
        logger.info(
            "LoRA weights set to %s in %.2f s (%d modules fused)",
            ", ".join(f"{key} x {scale:g}" for key, scale in wanted) or "none (base model)",
            time.perf_counter() - start,
            len(self._modified),
        )
        return True

    def clear(self) -> None:
        """Back to the base weights, bit for bit."""
        self.set_loras([])

    def forget_fused(self) -> None:
        """The weights were put back to base by someone else (the memory plan swapped the transformer
        out, and its host copy is the base): fuse again on the next request that wants a LoRA."""
        self._modified.clear()
        self._active = ()

    def _check_fits(self, chosen: list[LoraRequest]) -> None:
        for key, lora, _ in chosen:
            for name, update in lora.items():
                module = self._linears.get(name)
                if module is None:
                    raise ValueError(f"LoRA {key}: the transformer has no Linear named {name}")
                shape = (module.out_features, module.in_features)
                if update.shape != shape:
                    raise ValueError(
                        f"LoRA {key}: update of shape {update.shape} does not fit {name} {shape}"
                    )

    @torch.no_grad()
    def _restore(self) -> None:
        for name in sorted(self._modified):
            _write_weight(self._linears[name], self._originals[name])
        self._modified.clear()

    @torch.no_grad()
    def _fuse(self, chosen: list[LoraRequest]) -> None:
        per_module: dict[str, list[tuple[LoraUpdate, float]]] = {}
        for _, lora, scale in chosen:
            for name, update in lora.items():
                per_module.setdefault(name, []).append((update, scale))
        # All first-time copies of this change in one slab per dtype, before any weight is written;
        # none where an exact host copy of the base exists already.
        new = {}
        for name in per_module:
            if name in self._originals:
                continue
            existing = self._existing_original(name)
            if existing is not None:
                self._originals[name] = existing
            else:
                new[name] = self._linears[name].weight
        if new:
            self._originals.update(self.backups.keep(new))
        for name, updates in per_module.items():
            module = self._linears[name]
            self._modified.add(name)
            # Sum in float32 and round to the weight's dtype once: W0 + delta, not W0 + round(delta).
            total = self._base_float32(name, module)
            for update, scale in updates:
                update.add_to(total, scale)
            _write_weight(module, total)

    def _existing_original(self, name: str) -> torch.Tensor | None:
        """An exact host copy of a module's base weight that exists already: an 8-bit module's bf16
        original, or the memory plan's copy of a transformer it swaps."""
        module = self._linears[name]
        if isinstance(module, EightBitLinear):
            return module.original
        return self._host_originals(name) if self._host_originals else None

    def _base_float32(self, name: str, module: torch.nn.Linear) -> torch.Tensor:
        """A float32 copy of the base weight on the module's device, to fuse into. A plain Linear holds
        its base (restored just before); an 8-bit one's stored weight is not it: its bf16 original is."""
        if isinstance(module, EightBitLinear):
            return self._originals[name].to(module.codes.device, torch.float32, copy=True)
        return module.weight.to(torch.float32, copy=True)


def _write_weight(module: torch.nn.Linear, weight: torch.Tensor) -> None:
    """Copy a base or fused weight into a plain Linear; into an 8-bit one, rounded to its original's
    dtype and stored in 8 bit again (the base's own codes when `weight` is the original)."""
    if isinstance(module, EightBitLinear):
        module.store(weight.to(module.codes.device, module.original.dtype))
    else:
        module.weight.copy_(weight)
