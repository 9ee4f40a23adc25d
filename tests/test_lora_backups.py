"""LoRA backups (lora/backups.py): exact-size slabs, views for each module, pinned by exact size, and a
restore that gives back the original weights bit for bit."""

import pytest
import torch

import lora.backups as backups
from lora.apply import LoraFuser
from lora.backups import BackupSlabs
from lora.formats import convert_state_dict
from tests import lora_fixtures as fx


def block_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n}


def test_a_lora_on_every_block_linear_allocates_exactly_the_weights_bytes_and_restores_exactly():
    model = fx.tiny_transformer(dtype=torch.bfloat16)
    linears = block_linears(model)
    shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
    # Block shapes like FLUX.1's are not powers of two (96x32, 32x160 here): a per-module pinned
    # allocation would round each of them up.
    assert any(m.weight.numel() & (m.weight.numel() - 1) for m in linears.values())
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    fuser = LoraFuser(model)
    lora = convert_state_dict(*fx.to_peft(fx.known_update(shapes, seed=1)), shapes)

    fuser.set_loras([("a", lora, 1.0)])
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears.values())
    assert fuser.backups.nbytes == weight_bytes == fuser.backup_bytes
    assert len(fuser.backups.slabs) == 1  # one dtype, one batch of first-time copies
    slab = fuser.backups.slabs[0]
    assert all(
        copy.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
        for copy in fuser._originals.values()
    )
    assert any(not torch.equal(p, base[n]) for n, p in model.state_dict().items())

    fuser.set_loras([("b", convert_state_dict(*fx.to_peft(fx.known_update(shapes, seed=2)), shapes), 0.7)])
    assert fuser.backups.nbytes == weight_bytes  # the same modules again: nothing new allocated
    fuser.clear()
    assert all(torch.equal(p, base[n]) for n, p in model.state_dict().items())


def test_modules_touched_later_get_their_own_exact_slab():
    model = fx.tiny_transformer()
    shapes = fx.linear_names(model)
    first, later = ["proj_out", "x_embedder"], ["context_embedder", "proj_out"]
    fuser = LoraFuser(model)
    fuser.set_loras(
        [("a", convert_state_dict(*fx.to_peft(fx.known_update(shapes, first, seed=3)), shapes), 1.0)]
    )
    fuser.set_loras(
        [("b", convert_state_dict(*fx.to_peft(fx.known_update(shapes, later, seed=4)), shapes), 1.0)]
    )
    sizes = [slab.numel() * slab.element_size() for slab in fuser.backups.slabs]
    nbytes = {n: shapes[n][0] * shapes[n][1] * 4 for n in shapes}
    assert sizes == [nbytes["proj_out"] + nbytes["x_embedder"], nbytes["context_embedder"]]


def test_slabs_are_pinned_by_exact_size_only_when_cuda_is_there(monkeypatch):
    registered = []
    monkeypatch.setattr(backups, "register_host_memory", lambda ptr, size: registered.append(size) or True)
    monkeypatch.setattr(backups, "unregister_host_memory", lambda ptr: None)
    weights = {
        "a": torch.randn(96, 32, dtype=torch.bfloat16),
        "b": torch.randn(32, 160, dtype=torch.bfloat16),
        "c": torch.randn(3, 48),  # float32: its own slab, so no view straddles dtypes
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BackupSlabs().keep(weights, pin=True) and registered == []  # no CUDA: plain memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    slabs = BackupSlabs()
    copies = slabs.keep(weights, pin=True)
    assert sorted(registered) == sorted([(96 * 32 + 32 * 160) * 2, 3 * 48 * 4])
    assert slabs.pinned_bytes == slabs.nbytes == sum(w.numel() * w.element_size() for w in weights.values())
    assert all(torch.equal(copies[n], w) and copies[n].dtype == w.dtype for n, w in weights.items())
    registered.clear()
    BackupSlabs().keep(weights)  # CPU weights: nothing to speed up, not pinned
    assert registered == []


def test_a_refused_pin_leaves_pageable_copies(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backups, "register_host_memory", lambda ptr, size: False)
    slabs = BackupSlabs()
    weight = torch.randn(8, 16)
    assert torch.equal(slabs.keep({"w": weight}, pin=True)["w"], weight)
    assert slabs.pinned_bytes == 0 and "could not pin" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_weights_are_backed_up_pinned_and_restored_exactly():
    linear = torch.nn.Linear(96, 48, device="cuda", dtype=torch.bfloat16)
    copy = BackupSlabs().keep({"w": linear.weight})["w"]
    assert copy.is_pinned() and copy.device.type == "cpu"
    assert torch.equal(copy.cuda(), linear.weight)
