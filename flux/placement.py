"""Moving components between host memory and the GPU as the memory plan says, in one place.

A component that waits in host memory keeps its tensors there as the master copy. Moving it in puts a
device copy in each of its Parameter and buffer slots (modules hold them, so the pipelines and LoRA
fusers that hold the modules see the move); moving it out puts the host masters back and drops the
device copies: nothing is copied back, because what waits in host memory never changes (frozen
encoders; a transformer's base weights, whose LoRA fuser is told to forget what it fused: `on_evict`).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from flux.host_memory import register_host_memory, unregister_all, unregister_host_memory

log = logging.getLogger(__name__)

# (dict that owns the tensor, key): a module's _parameters or _buffers slot.
Slot = tuple[dict, str]


class Placement:
    """Which components are on the device now; `visiting` and `bring_in` move them per stage."""

    def __init__(self, device: torch.device, transformers_on_gpu: int):
        self.device = device
        self.transformers_on_gpu = transformers_on_gpu
        self.modules: dict[str, torch.nn.Module] = {}
        # Host copies of the components moved in, by slot (id of the owning dict, key).
        self._masters: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
        self._resident: set[str] = set()  # on the device for good (the plan keeps them there)
        self._transformer_order: list[str] = []  # transformers on the device, least recently used first
        self.on_evict: list[Callable[[str], None]] = []
        self.moves = 0
        self.bytes_moved = 0
        # Page-locked host tensors, kept alive here: unregistered (the finalizer) before they are freed.
        self._pinned: list[torch.Tensor] = []
        self._pinned_pointers: list[int] = []
        self.pinned_bytes = 0
        weakref.finalize(self, unregister_all, self._pinned_pointers, unregister_host_memory)

    def add(
        self, name: str, module: torch.nn.Module, on_device: bool, transformer: bool = False
    ) -> torch.nn.Module:
        """Register a component in host memory; on_device: move it to the device now (a resident one
        stays there for good, a transformer until a swap)."""
        if on_device:
            module.to(self.device)
        self.modules[name] = module
        if not on_device:  # it will be copied in (and a transformer's fused LoRA restored) again and again
            self.pin([owner[key] for owner, key in _slots(module)])
        if on_device and not transformer:
            self._resident.add(name)
        if on_device and transformer:
            self._transformer_order.append(name)
        return module

    def pin(self, tensors: list[torch.Tensor]) -> None:
        """Page-lock host tensors the GPU copies from often, so the copies run at DMA speed; where the
        driver refuses (a locked-memory limit) they stay pageable, and one line says so."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return
        refused = 0
        known = set(self._pinned_pointers)
        for tensor in tensors:
            pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
            if tensor.device.type != "cpu" or size == 0 or pointer in known:
                continue
            if register_host_memory(pointer, size):
                self._pinned.append(tensor)
                self._pinned_pointers.append(pointer)
                known.add(pointer)
                self.pinned_bytes += size
            else:
                refused += size
        if refused:
            log.warning(
                "could not pin %.2f GB of host memory; its copies to the GPU run slower", refused / 1e9
            )

    def on_device(self, name: str) -> bool:
        return name in self._resident or name in self._masters or name in self._transformer_order

    @contextmanager
    def visiting(self, *names: str) -> Iterator[None]:
        """The components on the device inside (those waiting in host memory moved in, and out after)."""
        moved = []
        try:
            for name in names:
                if not self.on_device(name):
                    self._move_in(name)
                    moved.append(name)
            yield
        finally:
            for name in reversed(moved):
                self._move_out(name)

    def bring_in(self, name: str) -> None:
        """Put a transformer on the device to stay, evicting the least recently used one if the plan
        holds fewer than are loaded."""
        if name in self._transformer_order:
            self._transformer_order.remove(name)
            self._transformer_order.append(name)
            return
        while len(self._transformer_order) >= self.transformers_on_gpu:
            evicted = self._transformer_order.pop(0)
            self._move_out(evicted)
            for callback in self.on_evict:
                callback(evicted)
        self._move_in(name)
        self._transformer_order.append(name)

    def host_weight(self, component: str, module_name: str) -> torch.Tensor | None:
        """The exact host copy of a Linear's weight while its component is on the device (None when
        it is resident for good and so has none): the base a LoRA fuser restores from, no backup needed."""
        masters = self._masters.get(component)
        if masters is None:
            return None
        module = self.modules[component].get_submodule(module_name)
        host = masters.get((id(module._parameters), "weight"))
        return None if host is None else host.detach()

    @torch.no_grad()
    def _move_in(self, name: str) -> None:
        started = time.perf_counter()
        masters, copies = {}, {}  # copies: one device copy per host tensor, however many slots share it
        for owner, key in _slots(self.modules[name]):
            host = owner[key]
            masters[(id(owner), key)] = host
            if id(host) not in copies:
                # A copy even when the "device" is the host (CPU tests): fusing must never write a master.
                data = host.detach().to(self.device, non_blocking=True, copy=True)
                is_param = isinstance(host, torch.nn.Parameter)
                copies[id(host)] = torch.nn.Parameter(data, host.requires_grad) if is_param else data
            owner[key] = copies[id(host)]
        self._masters[name] = masters
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the host masters must not change under a copy
        moved = sum(t.numel() * t.element_size() for t in copies.values())
        self.moves += 1
        self.bytes_moved += moved
        log.info("%s moved to the GPU: %.2f GB in %.2f s", name, moved / 1e9, time.perf_counter() - started)

    @torch.no_grad()
    def _move_out(self, name: str) -> None:
        masters = self._masters.pop(name)
        for owner, key in _slots(self.modules[name]):
            owner[key] = masters[(id(owner), key)]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back for the next stage's component
        log.info("%s back in host memory", name)


def _slots(module: torch.nn.Module) -> Iterator[Slot]:
    """Every Parameter and buffer slot of `module`, in a fixed order (a tensor two modules share,
    like T5's tied embedding, has two slots)."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for key, tensor in table.items():
                if tensor is not None:
                    yield table, key
