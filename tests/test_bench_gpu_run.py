"""The prepared GPU run (bench/gpu_speed.py), end to end on the CPU at toy size.

What the lent GPU will run, minus the GPU: every section (inference, fast path, quality guard,
LoRA, training) must leave its results in the JSON, the baseline's numbers must be merged in, the
table printed last, and the budget obeyed. A stand-in baseline script writes the keys the real
../shared/bench/diffusers_baseline.py writes (its own run takes over a minute on these CPUs).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_speed.py"
FAKE_BASELINE = """
import argparse, json, os
ap = argparse.ArgumentParser()
ap.add_argument("--out"); ap.add_argument("--budget"); ap.add_argument("--tiny", action="store_true")
ap.add_argument("--skip-train", action="store_true"); ap.add_argument("--skip-compile", action="store_true")
args = ap.parse_args()
assert not args.skip_train, "the GPU run compares training steps: the baseline must time them"
res = {"schnell_4step_1024_s": {"median": 0.5}, "dev_28step_1024_s": {"median": 3.0}}
for side in (512, 1024):
    for gc in (0, 1):
        res[f"train_step_{side}_gc{gc}"] = 0.4
        res[f"train_step_{side}_gc{gc}_peak_GB"] = 30.0
json.dump(res, open(os.path.join(args.out, "baseline.json"), "w"))
"""
SECTIONS = [
    "schnell_std_s",
    "schnell_fast_s",
    "dev_fast_s",
    "dev_std_s",
    "quality_max_rel_error",
    "step_eager_s",
    "step_fast_s",
    "lora_switch_total_s",
    "dev_lora_fast_s",
]
TRAINING = [f"train_{side}_gc{gc}" for side in (512, 1024) for gc in (0, 1)]


def run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "gpu_speed.json").read_text()), done.stdout


@pytest.mark.slow  # the whole --tiny run, two training processes included (~70 s): `./run.sh test -m slow`
def test_every_section_reports_and_the_table_comes_last(tmp_path):
    baseline = tmp_path / "baseline_stand_in.py"
    baseline.write_text(FAKE_BASELINE)
    results, stdout = run(tmp_path, "--budget", "240", "--baseline", str(baseline))
    assert results["skipped"] == [] and "errors" not in results, (results["skipped"], results.get("errors"))
    assert results["baseline"]["train_step_1024_gc0"] == 0.4
    for key in SECTIONS:
        assert results.get(key) is not None, key
    for key in TRAINING:
        case = results[key]
        assert case["step_s"] > 0 and len(case["loss"]) == case["steps"], key
        assert case["checkpointing_used"] is key.endswith("gc1")
        assert case["optimizer_used"] == "adamw"  # adamw8bit needs CUDA: the logged fallback
    for rows in results["step_cache"].values():  # every level, dev and schnell, against uncached
        assert (
            set(rows) == {"off", "light", "medium", "strong"} and rows["medium"]["psnr_vs_uncached_db"] > 20
        )
    multi = results["train_multi_gpu"]  # --tiny: two gloo processes stand in for two GPUs
    assert multi["processes"] == 2 and multi["optimizer_steps"] > 0 and multi["step_s"] > 0
    plans = [results[key] for key in results if key.startswith("plan ")]  # each card's memory plan
    assert len(plans) == 3
    for row in plans:
        assert (row["plan"], row["train_plan"]) == (row["expected_plan"], row["expected_training_plan"])
        assert row["lora_changes_image"] and row["base_bit_for_bit_after_lora"] and row["train_step_s"] > 0
    assert results["recompiles"] == 0
    assert not results["cudnn_sdp_enabled"]  # the attention backends production runs
    table = stdout[stdout.index("what ") :]
    assert (
        "train 1024, gc off, adamw" in table and "0.4" in table.split("train 512, gc off")[1].splitlines()[0]
    )


def test_the_budget_skips_what_does_not_fit(tmp_path):
    results, stdout = run(tmp_path, "--budget", "1", "--no-baseline", "--train-only")
    assert results["skipped"] == TRAINING
    assert "what " in stdout  # the table still printed
