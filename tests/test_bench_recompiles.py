"""The prepared GPU run counts Dynamo's recompiles (issue 32 found the counter always at 0: torch's logging
setup stops the records at `torch._dynamo`, above the handler it hung on `torch`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, torch
sys.path.insert(0, "bench")
import gpu_speed
gpu_speed.log_recompiles()
double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
for n in (2, 3, 4):  # a new static shape each call: two recompiles after the first compile
    double(torch.ones(n))
print(gpu_speed.RECOMPILES.count)
"""


def test_recompiles_are_counted():
    # A process of its own: set_logs changes torch's logging for the whole interpreter.
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip().splitlines()[-1]) == 2, run.stdout[-500:]
