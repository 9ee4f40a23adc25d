"""The memory plan for every row of the hardware table, from FLUX.1's real sizes (built on meta)."""

import pytest

from errors import UserInputError
from flux.memory_plan import GPUS, GiB, NotEnoughMemory, choose_plan, flux_sizes, forced_plan

BOTH = ("dev", "schnell")
BY_NAME = {gpu.name: gpu for gpu in GPUS}
# GPU -> (plan with both variants, plan with dev alone, training plan)
TABLE = {
    "H200 141 GB": ("resident", "resident", "resident"),
    "H100 80 GB": ("resident", "resident", "resident"),
    "A100 80 GB": ("resident", "resident", "resident"),
    "L40S 48 GB": ("swap", "resident", "resident"),
    "A40 48 GB": ("swap", "resident", "resident"),
    "RTX A6000 48 GB": ("swap", "resident", "resident"),
    "A100 40 GB": ("swap", "resident", "resident"),
    "RTX 4090 24 GB": ("8bit", "8bit", "8bit"),
    "L4 24 GB": ("8bit", "8bit", "8bit"),
    "A10 24 GB": ("8bit", "8bit", "8bit"),
}


def test_sizes_are_flux_ones():
    sizes = flux_sizes()
    assert 22.0 < sizes.transformer / GiB < 22.4  # 11.9e9 parameters in bf16
    assert 11.0 < sizes.transformer_8bit / GiB < 11.4  # the block Linears at one byte
    assert 8.8 < sizes.t5 / GiB < 8.95  # T5-XXL's encoder, 4.76e9 parameters
    assert sizes.clip < 0.3 * GiB and sizes.vae < 0.2 * GiB


@pytest.mark.parametrize("gpu_name", sorted(TABLE))
def test_each_gpu_gets_its_plan_and_the_plan_fits(gpu_name):
    gpu = BY_NAME[gpu_name]
    both, alone, training = TABLE[gpu_name]
    cases = [(BOTH, False, both), (("dev",), False, alone), (("dev",), True, training)]
    for variants, train, expected in cases:
        plan = choose_plan(gpu.free_bytes, variants, training=train, has_fp8=gpu.fp8)
        assert plan.name == expected, (variants, train)
        assert plan.peak_bytes <= gpu.free_bytes
        assert plan.storage == ("bf16" if expected != "8bit" else "fp8" if gpu.fp8 else "int8")
        assert plan.t5_on_gpu == (expected != "8bit" and not train)
        assert plan.vae_and_clip_on_gpu == (not train)  # training parks them once the cache is built
        assert plan.transformers_on_gpu == (len(variants) if expected == "resident" and not train else 1)


def test_80_gb_and_up_keep_todays_placement():
    for name in ("H100 80 GB", "A100 80 GB", "H200 141 GB"):
        plan = choose_plan(BY_NAME[name].free_bytes, BOTH, has_fp8=True)
        assert (plan.transformers_on_gpu, plan.storage, plan.t5_on_gpu, plan.swaps) == (
            2,
            "bf16",
            True,
            False,
        )


def test_a_t4_is_refused_naming_the_memory_found_and_the_smallest_gpu_that_works():
    t4 = BY_NAME["T4 16 GB"]
    for training in (False, True):
        with pytest.raises(NotEnoughMemory) as caught:
            choose_plan(t4.free_bytes, ("dev",), training=training)
        message = str(caught.value)
        assert f"{t4.free_bytes / GiB:.1f} GiB of its memory is free" in message
        assert "the smallest GPU that works is A10 24 GB" in message
        assert "needs about 21.4 GiB" in message  # 8bit, while T5 encodes beside the 8-bit transformer


def test_the_one_line_says_where_everything_is():
    line = choose_plan(BY_NAME["RTX 4090 24 GB"].free_bytes, BOTH, has_fp8=True).describe()
    assert line.startswith("memory plan 8bit: 1 transformer on the GPU, the other in host memory")
    assert "block Linears in fp8 (bf16 originals in host memory)" in line
    assert "T5 in host memory, moved in for the prompt" in line and "23.5 GiB free" in line


def test_flux_memory_plan_forces_a_plan_and_refuses_a_typo(monkeypatch):
    monkeypatch.setenv("FLUX_MEMORY_PLAN", "8bit")
    forced = forced_plan()
    plan = choose_plan(BY_NAME["H200 141 GB"].free_bytes, BOTH, has_fp8=True, forced=forced)
    assert plan.name == "8bit" and plan.storage == "fp8"
    monkeypatch.setenv("FLUX_MEMORY_PLAN", "offload")
    with pytest.raises(
        UserInputError, match="FLUX_MEMORY_PLAN.*offload.*auto or one of: resident, swap, 8bit"
    ):
        forced_plan()


def test_host_memory_each_plan_keeps():
    sizes = flux_sizes()
    by_plan = {name: choose_plan(None, BOTH, forced=name) for name in ("resident", "swap", "8bit")}
    assert by_plan["resident"].host_bytes == 0  # everything on the GPU; backups only for LoRAs
    assert by_plan["resident"].lora_backup_bytes == 2 * sizes.transformer
    assert by_plan["swap"].host_bytes == 2 * sizes.transformer and by_plan["swap"].lora_backup_bytes == 0
    # the bf16 originals of both, the waiting variant's 8-bit codes, T5
    assert by_plan["8bit"].host_bytes == 2 * sizes.transformer + sizes.transformer_8bit + sizes.t5
    assert "host memory about 64 GiB" in by_plan["8bit"].describe()


def test_a_host_shorter_than_the_plan_is_warned_about(monkeypatch, caplog):
    import logging

    import flux.gpu_memory

    monkeypatch.setattr(flux.gpu_memory, "available_host_bytes", lambda: 16 * GiB)
    with caplog.at_level(logging.WARNING):
        flux.gpu_memory.warn_if_host_memory_short(choose_plan(None, BOTH, forced="8bit"))
    assert "keeps about 64 GiB in host memory and 16 GiB is available" in caplog.text


def fake_gpu(monkeypatch, gpu, fraction: float = 1.0):
    """torch.cuda answering as `gpu` would (the setup path reads only these)."""
    import torch

    total = gpu.total_mib * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu.free_bytes, total))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: (8, 9) if gpu.fp8 else (8, 6)
    )


def test_setup_reads_the_gpu_and_refuses_a_t4_before_loading_anything(monkeypatch):
    import torch

    from flux.gpu_memory import plan_for

    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, BY_NAME["RTX 4090 24 GB"])
    plan = plan_for(cuda, BOTH, training=False)
    assert (plan.name, plan.storage, plan.free_bytes) == ("8bit", "fp8", BY_NAME["RTX 4090 24 GB"].free_bytes)
    fake_gpu(monkeypatch, BY_NAME["A10 24 GB"])
    assert plan_for(cuda, ("dev",), training=True).storage == "int8"
    # An H200 capped to 40 GB (how the GPU run emulates smaller cards) plans for 40 GB.
    h200 = BY_NAME["H200 141 GB"]
    fake_gpu(monkeypatch, h200, fraction=40960 / h200.total_mib)
    assert plan_for(cuda, BOTH, training=False).name == "swap"
    monkeypatch.setenv("FLUX_FAST", "off")
    assert plan_for(cuda, BOTH, training=False).go_fast == "off"
    fake_gpu(monkeypatch, BY_NAME["T4 16 GB"])
    with pytest.raises(
        NotEnoughMemory, match="14.5 GiB of its memory is free.*smallest GPU that works is A10"
    ):
        plan_for(cuda, ("dev",), training=False)


@pytest.mark.parametrize(
    ("gpu_name", "variants", "expected"),
    [
        ("H200 141 GB", BOTH, "fp8 copies + compiled blocks for 2 of 2 variants"),
        ("H100 80 GB", BOTH, "fp8 copies + compiled blocks for 1 of 2 variants"),  # today's, as README said
        ("A100 80 GB", BOTH, "the standard path (no fp8 units)"),
        ("L40S 48 GB", ("dev",), "the standard path (no room for fp8 copies)"),
        ("L40S 48 GB", BOTH, "the standard path (no room for fp8 copies beside the bf16 transformer)"),
        ("RTX 4090 24 GB", BOTH, "fp8 products on the stored fp8 weights (no copies, not compiled)"),
        ("A10 24 GB", BOTH, "the standard path (no fp8 units)"),
    ],
)
def test_the_plan_says_what_go_fast_does(gpu_name, variants, expected):
    gpu = BY_NAME[gpu_name]
    plan = choose_plan(gpu.free_bytes, variants, has_fp8=gpu.fp8)
    assert plan.go_fast == expected and plan.describe().endswith(f"go_fast: {expected}")
    assert choose_plan(gpu.free_bytes, variants, has_fp8=gpu.fp8, go_fast=False).go_fast == "off"
    assert choose_plan(gpu.free_bytes, ("dev",), training=True, has_fp8=gpu.fp8).go_fast == "off"
