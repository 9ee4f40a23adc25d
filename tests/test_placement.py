"""flux/placement.py on its own: what moves when, what is pinned, and that nothing is copied back."""

import logging

import torch

import flux.placement as placement_module
from flux.placement import Placement

META = torch.device("meta")


def module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    net[1].weight = net[0].weight  # tied, like T5's embedding: two slots, one tensor
    net.register_buffer("table", torch.arange(4.0))
    return net


def devices(net: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in [*net.parameters(), *net.buffers()]}


def test_visiting_moves_in_and_out_and_keeps_ties():
    placement = Placement(META, transformers_on_gpu=1)
    t5 = module(0)
    host_weight = t5[0].weight
    placement.add("t5", t5, on_device=False)
    with placement.visiting("t5"):
        assert devices(t5) == {META} and t5[1].weight is t5[0].weight
    assert devices(t5) == {torch.device("cpu")} and t5[0].weight is host_weight  # the master, untouched
    assert placement.moves == 1 and placement.bytes_moved == (8 * 8 + 8 + 8 + 4) * 4  # the tie once


def test_bring_in_evicts_the_least_recently_used_and_says_so():
    placement = Placement(META, transformers_on_gpu=1)
    nets = {name: module(i) for i, name in enumerate(("dev", "schnell"))}
    for name, net in nets.items():
        placement.add(name, net, on_device=False, transformer=True)
    evicted: list[str] = []
    placement.on_evict.append(evicted.append)
    placement.bring_in("dev")
    placement.bring_in("dev")  # already there: nothing moves
    placement.bring_in("schnell")
    assert (
        evicted == ["dev"]
        and devices(nets["schnell"]) == {META}
        and devices(nets["dev"]) == {torch.device("cpu")}
    )
    assert placement.moves == 2


def test_what_waits_in_host_memory_is_pinned_once_and_a_refusal_is_logged(monkeypatch, caplog):
    registered: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        placement_module, "register_host_memory", lambda ptr, size: registered.append(size) or True
    )
    monkeypatch.setattr(placement_module, "unregister_host_memory", lambda ptr: None)
    placement = Placement(torch.device("cuda"), transformers_on_gpu=1)
    placement.add("t5", module(0), on_device=False)
    assert sorted(registered) == sorted([8 * 8 * 4, 8 * 4, 8 * 4, 4 * 4])  # the tied weight once
    assert placement.pinned_bytes == sum(registered)
    monkeypatch.setattr(placement_module, "register_host_memory", lambda ptr, size: False)
    with caplog.at_level(logging.WARNING):
        placement.add("other", module(1), on_device=False)
    assert "could not pin" in caplog.text
