"""Boot without compiling: torch.compile's cache artifacts, saved after the first warm-up, loaded by later setups.

What the artifacts hold (torch.compiler.save_cache_artifacts): Inductor's generated and compiled kernels
(autotuning results included) and AOTAutograd's graphs. A later setup that loads them still lets Dynamo
trace the blocks (seconds), but every Inductor compile is a cache hit: the tens of seconds per graph that
a cold go_fast setup spends are skipped. A file that no longer matches (other code, other shapes) costs
nothing but misses: those graphs compile as without it.

One file per torch version and GPU kind (kernels are compiled for one architecture), in the folder
FLUX_COMPILE_CACHE names (default: compile-cache/ beside predict.py, so a file made before `cog push`
travels in the image; see README). FLUX_COMPILE_CACHE=off neither loads nor saves.
"""

import logging
import os
import re
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_COMPILE_CACHE = "FLUX_COMPILE_CACHE"
DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "compile-cache"
OFF = "off"


def compile_cache_file(device: torch.device) -> Path | None:
    """Where this torch on this kind of device keeps its artifacts; None when switched off."""
    setting = os.environ.get(ENV_COMPILE_CACHE, "").strip()
    if setting.lower() == OFF:
        return None
    folder = Path(setting) if setting else DEFAULT_FOLDER
    return folder / f"torch-{torch.__version__}-{_device_kind(device)}.bin"


def _device_kind(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def load_compile_cache(file: Path | None) -> bool:
    """Load the artifacts of `file` into this process's compile caches; True if there were any."""
    if file is None or not file.is_file():
        return False
    started = time.perf_counter()
    try:
        info = torch.compiler.load_cache_artifacts(file.read_bytes())
    except Exception as error:  # a damaged or foreign file must not stop setup: compile as without it
        log.warning("compile cache %s not loaded (%s): compiling from scratch", file, error)
        return False
    count = _artifact_count(info) if info is not None else 0
    log.info(
        "compile cache: %d artifacts loaded from %s in %.1f s", count, file, time.perf_counter() - started
    )
    return count > 0


def inductor_misses() -> int:
    """Inductor graphs compiled (not found in a cache) by this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"]


def save_compile_cache(file: Path | None) -> bool:
    """Write what this process compiled so far to `file` (atomically); True if written."""
    if file is None:
        return False
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    data, info = saved
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f".{file.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(file)
    except OSError as error:  # a read-only image: the next setup compiles again, nothing else changes
        log.warning("compile cache not saved to %s: %s", file, error)
        return False
    count = _artifact_count(info)
    log.info("compile cache: %d artifacts (%.1f MB) saved to %s", count, len(data) / 1e6, file)
    return True


def _artifact_count(info) -> int:
    """How many artifacts a torch.compiler CacheInfo lists (kernels, graphs, autotuning results)."""
    return sum(len(keys) for keys in info.artifacts.values())
