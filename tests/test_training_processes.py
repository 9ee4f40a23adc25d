"""Several training processes (training/processes.py): gloo on the CPU, spawned as on a multi-GPU machine.

Equivalence: two processes with batch 1 each train the same LoRA (within float tolerance) as one process
with batch 2 over the same samples in the same order. Faults and cancels end every process within seconds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import synthetic_cache

from errors import UserInputError
from toys.tiny import SCHEDULERS, build_transformer
from training.buckets import Sample
from training.config import build_training_config
from training.loop import lora_adapter, train_lora
from training.processes import (
    ENV_PROCESSES,
    SINGLE,
    Processes,
    TrainingProcessError,
    process_count,
    run_processes,
)
from training.recipe import block_linear_names

# Four samples of one bucket: global batches of 2 never run short.
SAMPLES = [Sample(i, 64, 64, 64) for i in range(4)]
ONE_PROCESS_STEPS = 3  # optimizer steps of the one-process run (batch 2)


def train(processes: Processes, batch_size: int, steps: int) -> dict[str, torch.Tensor]:
    transformer = build_transformer(guidance_embeds=True, seed=0).requires_grad_(False)
    config = build_training_config(steps=steps, batch_size=batch_size, lora_rank=2, seed=5, optimizer="adamw")
    with lora_adapter(transformer, 2, block_linear_names(transformer), seed=5):
        # With the preservation term: its second forward and backward per step run through DDP too.
        cache = synthetic_cache(SAMPLES, preserved=True)
        result = train_lora(transformer, cache, SAMPLES, config, SCHEDULERS["dev"], processes=processes)
    return {"losses": torch.tensor(result.losses), **result.lora_state}


def train_in_process(processes: Processes, out: str) -> None:
    """Each of two processes: batch 1, steps counted in one-process steps (2 per optimizer step)."""
    state = train(processes, batch_size=1, steps=2 * ONE_PROCESS_STEPS)
    if processes.main:
        save_file({k: v.contiguous() for k, v in state.items()}, out)


def test_two_processes_of_batch_one_train_what_one_process_of_batch_two_does(tmp_path):
    out = tmp_path / "two.safetensors"
    run_processes(2, train_in_process, out=str(out))
    two = load_file(str(out))
    one = train(SINGLE, batch_size=2, steps=ONE_PROCESS_STEPS)
    assert len(two["losses"]) == ONE_PROCESS_STEPS  # 6 one-process steps on 2 processes: 3 optimizer steps
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-4, atol=1e-6)  # the global batch's loss
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name].float(), one[name].float(), rtol=1e-3, atol=1e-3, msg=name)
    trained = [name for name in one if "lora_B" in name]
    assert any(
        one[name].abs().max() > 0 for name in trained
    )  # the LoRA moved: the comparison means something


def write_pid_then(processes: Processes, folder: str, fail_rank: int | None) -> None:
    Path(folder, f"{processes.rank}.pid").write_text(str(os.getpid()))
    if processes.rank == fail_rank:
        time.sleep(1)
        raise RuntimeError("CUDA out of memory (a test's stand-in)")
    processes.barrier()  # the others wait for the failed one, as in an all-reduce
    time.sleep(600)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def pids(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in folder.glob("*.pid")]


def test_a_failing_process_ends_the_training_within_seconds_naming_its_rank(tmp_path):
    started = time.monotonic()
    with pytest.raises(
        TrainingProcessError, match=r"training process 1 of 2 failed: RuntimeError: CUDA out of memory"
    ):
        run_processes(2, write_pid_then, folder=str(tmp_path), fail_rank=1)
    assert time.monotonic() - started < 60  # spawning two Pythons with torch takes most of it
    assert len(pids(tmp_path)) == 2 and all(gone(pid) for pid in pids(tmp_path))


def killed_on_rank_one(processes: Processes, folder: str) -> None:
    Path(folder, f"{processes.rank}.pid").write_text(str(os.getpid()))
    if processes.rank == 1:
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
    processes.barrier()
    time.sleep(600)


@pytest.mark.slow  # ~10 s: `./run.sh test -m slow`
def test_a_killed_process_ends_the_training_naming_it(tmp_path):
    with pytest.raises(TrainingProcessError, match=r"training process 1 of 2 ended without finishing"):
        run_processes(2, killed_on_rank_one, folder=str(tmp_path))
    assert len(pids(tmp_path)) == 2 and all(gone(pid) for pid in pids(tmp_path))


class Cancelled(BaseException):
    """What Cog raises in the worker on a cancel (its CancelationException is a BaseException)."""


@pytest.mark.slow  # ~10 s: `./run.sh test -m slow`
def test_a_cancel_while_waiting_ends_every_process(tmp_path):
    def cancel(*_):
        raise Cancelled()

    previous = signal.signal(signal.SIGALRM, cancel)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        while len(pids(tmp_path)) < 2:  # the processes are up before the cancel comes (re-armed until then)
            try:
                run_processes(2, write_pid_then, folder=str(tmp_path), fail_rank=None)
            except Cancelled:
                if len(pids(tmp_path)) < 2:
                    for pid in pids(tmp_path):
                        assert gone(pid)
                    for leftover in tmp_path.glob("*.pid"):
                        leftover.unlink()
                    signal.setitimer(signal.ITIMER_REAL, 10)
                    continue
                break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(pids(tmp_path)) == 2 and all(gone(pid) for pid in pids(tmp_path))


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_process_count_names_the_setting(value, monkeypatch):
    monkeypatch.setenv(ENV_PROCESSES, value)
    with pytest.raises(UserInputError, match=ENV_PROCESSES):
        process_count()


def test_the_default_is_one_process_per_gpu_and_one_without(monkeypatch):
    monkeypatch.delenv(ENV_PROCESSES, raising=False)
    assert process_count() == max(1, torch.cuda.device_count())
    monkeypatch.setenv(ENV_PROCESSES, "2")
    assert process_count() == 2  # on the CPU: two gloo processes
