"""Several training processes, one per GPU: how many, who is who, and starting them so that they fail together.

Data parallelism with torch.distributed: every process holds the whole transformer and its own slice of each
batch; DistributedDataParallel (training/loop.py) averages the LoRA's gradients after each backward. The
processes are started by torch.multiprocessing (spawn) from the process that called run_training (the Cog
worker), with NCCL on GPUs and gloo on the CPU. One GPU, or none, keeps the single-process path.

    FLUX_TRAIN_PROCESSES=N   N processes (on the CPU with gloo where there is no GPU: the whole path runs
                             on a machine without GPUs, as the tests and CI do); default: one per visible GPU.

Faults: the first process that raises ends the training within seconds with its message, naming its rank,
and every other process is terminated; an exception in the caller's wait (Cog's cancel) terminates them all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from errors import UserInputError

log = logging.getLogger(__name__)

ENV_PROCESSES = "FLUX_TRAIN_PROCESSES"
# How long the wait for the processes blocks before looking again (and letting a cancel in).
POLL_SECONDS = 0.5
# After the first failure, how long the others get to end before they are killed.
GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Processes:
    """This process's place among the training's processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The one process that writes the tar, previews, the loss plot, W&B and the Hub push."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    def device(self) -> torch.device | None:
        """This process's GPU; None (the default device) for a single process."""
        if not self.several:
            return None
        return torch.device("cuda", self.rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def same_captions(self, examples: list) -> list:
        """The main process's captions on every process's examples (same images, same order)."""
        if not self.several:
            return examples
        sent = [[(e.caption, e.caption_source) for e in examples] if self.main else None]
        dist.broadcast_object_list(sent, src=0, device=self.device())
        return [
            dataclasses.replace(e, caption=caption, caption_source=source)
            for e, (caption, source) in zip(examples, sent[0], strict=True)
        ]

    def average(self, value: float) -> float:
        """The mean of a number over the processes (the logged loss of the global batch)."""
        if not self.several:
            return value
        device = self.device()
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.size


SINGLE = Processes()


def process_count() -> int:
    """How many training processes to run: FLUX_TRAIN_PROCESSES, else one per visible GPU."""
    setting = os.environ.get(ENV_PROCESSES, "").strip()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not setting:
        return max(1, gpus)
    if not setting.isdigit() or int(setting) < 1:
        raise UserInputError(ENV_PROCESSES, setting, "a whole number of processes, 1 or more")
    count = int(setting)
    if gpus and count > gpus:
        raise UserInputError(ENV_PROCESSES, setting, f"at most one process per GPU ({gpus} visible)")
    return count


class TrainingProcessError(RuntimeError):
    """One training process failed; the message is its own, with its rank."""


def run_processes(size: int, target: Callable[..., None], **kwargs) -> None:
    """Run target(processes, **kwargs) in `size` new processes and wait for all; raise if any fails.

    `target` must be importable by name (the processes are spawned, not forked: CUDA does not survive
    a fork, and the Cog worker holds threads).
    """
    rendezvous = Path(tempfile.mkdtemp(prefix="flux-train-rendezvous-"))
    started = time.perf_counter()
    context = mp.start_processes(
        _process_main,
        args=(size, str(rendezvous / "init"), target, kwargs),
        nprocs=size,
        join=False,
        start_method="spawn",
    )
    log.info("training on %d processes (%s), pids %s", size, _backend(), [p.pid for p in context.processes])
    main_log = _LogFollower(rendezvous / "rank-0.log")
    try:
        while not context.join(timeout=POLL_SECONDS):
            main_log.pump()
        main_log.pump()
    except mp.ProcessRaisedException as error:
        _end(context)
        main_log.pump()
        rank, message = _first_failure(rendezvous) or (error.error_index, _last_line(str(error)))
        if rank != 0:  # its traceback, which the main process's log does not have
            _LogFollower(rendezvous / f"rank-{rank}.log").pump()
        raise TrainingProcessError(f"training process {rank} of {size} failed: {message}") from None
    except mp.ProcessExitedException as error:
        _end(context)
        raise TrainingProcessError(
            f"training process {error.error_index} of {size} ended without finishing "
            f"(exit code {error.exit_code}; killed, perhaps out of memory)"
        ) from None
    except BaseException:  # Cog's cancel (a BaseException) or any error in this process
        _end(context)
        raise
    finally:
        for leftover in rendezvous.iterdir():
            leftover.unlink(missing_ok=True)
        rendezvous.rmdir()
    log.info("%d training processes finished in %.0f s", size, time.perf_counter() - started)


def _process_main(rank: int, size: int, init_file: str, target: Callable[..., None], kwargs: dict) -> None:
    """What each spawned process runs: join the group, run the target, leave the group.

    Its prints and logs go to a file beside the rendezvous: the parent copies the main process's into
    its own output, which Cog returns as the training's logs."""
    output = open(Path(init_file).with_name(f"rank-{rank}.log"), "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    sys.stdout = sys.stderr = output
    logging.basicConfig(
        level=logging.INFO, stream=output, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    dist.init_process_group(_backend(), init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        target(Processes(rank, size), **kwargs)
    except BaseException as error:
        # The parent reports the first failure: the others' are its echo (a peer gone from a collective).
        Path(init_file).with_name(f"failed-{rank}").write_text(
            f"{time.time()}\n{type(error).__name__}: {error}"
        )
        # The whole traceback goes to this process's log.
        logging.getLogger(__name__).error("rank %d failed:\n%s", rank, traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _end(context) -> None:
    """Terminate every process still running, then kill what has not ended after the grace period."""
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for process in context.processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


class _LogFollower:
    """Copies the complete lines a process appends to its log file into this process's stdout."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def pump(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        if complete:
            self.offset += len(complete)
            sys.stdout.write(complete.decode("utf-8", errors="replace"))
            sys.stdout.flush()


def _first_failure(rendezvous: Path) -> tuple[int, str] | None:
    """(rank, message) of the process that failed first, from the notes failing processes leave."""
    failures = []
    for note in rendezvous.glob("failed-*"):
        when, _, message = note.read_text().partition("\n")
        failures.append((float(when), int(note.name.removeprefix("failed-")), message))
    if not failures:
        return None
    _, rank, message = min(failures)
    return rank, message


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text
