"""Boot without compiling (flux/fast/compile_cache.py): a second setup loads the first one's artifacts and
Inductor compiles nothing.

Each setup is its own process, as each boot of a server is, with its own empty Inductor cache folder (a
fresh machine: only the saved file carries over). go_fast is set up for real on the CPU with Inductor
(fp8 support answered yes; the CPU's _scaled_mm runs the fp8 products), on the tiny transformer, one
warm-up shape. Slow (two Inductor setups, ~1.5 min): `./run.sh test -m slow`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import json, logging, sys
import torch
from torch._dynamo.utils import counters
import flux.fast.path as fast_path
from flux.fast.capability import FastSupport
from toys.tiny import build_transformer

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
fast_path.detect_fast_support = lambda device: FastSupport(True, "test")
torch.cuda.mem_get_info = lambda device=None: (2**40, 2**40)
transformer = build_transformer(guidance_embeds=False).to(torch.bfloat16).eval()
shapes = tuple(tuple(s) for s in json.loads(sys.argv[1]))
path = fast_path.setup_fast({"schnell": transformer}, torch.device("cpu"), {"schnell": 16}, mode="auto",
                            warmup_shapes=shapes)
print(json.dumps(dict(counters["inductor"]) | {"compiled": path.transformers["schnell"].compiled}))
"""


def boot(tmp_path: Path, name: str, cache: Path, shapes: list) -> tuple[dict, str]:
    env = {
        **os.environ,
        "FLUX_COMPILE_CACHE": str(cache),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),  # a fresh machine's empty cache
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", SETUP, json.dumps(shapes)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_a_second_setup_loads_the_saved_artifacts_and_compiles_nothing(tmp_path):
    cache = tmp_path / "compile-cache"
    first, first_log = boot(tmp_path, "first", cache, [[256, 256, 1]])
    assert first["compiled"] and first.get("fxgraph_cache_miss", 0) >= 2  # double and single blocks
    (saved,) = cache.glob("torch-*-cpu.bin")
    assert "compile cache: " in first_log and "saved to" in first_log

    second, second_log = boot(tmp_path, "second", cache, [[256, 256, 1]])
    assert second.get("fxgraph_cache_miss", 0) == 0, second_log[-2000:]
    assert second["fxgraph_cache_hit"] == first["fxgraph_cache_miss"]
    assert "artifacts loaded from" in second_log
    assert "saved to" not in second_log  # nothing new: the file stays as it was

    # A setup that compiles more (batch 2: two more graphs) keeps what it loaded and adds the new ones.
    third, _ = boot(tmp_path, "third", cache, [[256, 256, 1], [256, 256, 2]])
    assert third["fxgraph_cache_miss"] == 2
    fourth, _ = boot(tmp_path, "fourth", cache, [[256, 256, 1], [256, 256, 2]])
    assert fourth.get("fxgraph_cache_miss", 0) == 0 and fourth["fxgraph_cache_hit"] == 4


def test_off_neither_loads_nor_saves(tmp_path, monkeypatch):
    import torch

    from flux.fast.compile_cache import compile_cache_file

    monkeypatch.setenv("FLUX_COMPILE_CACHE", "off")
    assert compile_cache_file(torch.device("cpu")) is None
    monkeypatch.setenv("FLUX_COMPILE_CACHE", str(tmp_path))
    assert compile_cache_file(torch.device("cpu")) == tmp_path / f"torch-{torch.__version__}-cpu.bin"
