"""flux-mini built on a lent GPU in one timed device call (issue 13): candidate specs side by side,
each build sized to end inside the call.

    python3 bench/flux_mini_gpu.py --out $OUT --budget 540
        [--candidate NAME=FIELD=VALUE,FIELD=VALUE ...]   (default: base= and deep=double_blocks=3,...)
    .venv/bin/python bench/flux_mini_gpu.py --out /tmp/rehearsal --budget 150 --rehearse   # CPU, tiny

1. Smoke: every candidate's build with each stage at a few steps, all at once, with its real transformer
   and batch: a device error shows within a minute, and the step time measured under the same
   contention as the real builds sizes them.
2. The builds, all at once: `python -m toys.mini.build DIR --set ... --set phase.steps=N --workers W`,
   N chosen so that the transformer ends by the budget after --overhead seconds of earlier stages.
3. Into --out: each finished build as a tar in parts under 15 MiB (a device call returns files of at
   most 16 MiB), the first candidate's learning-curve checkpoints, a quick held-out score of each
   build on the GPU while time is left, every log, summary.json; a table last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CANDIDATES = ("base=", "deep=double_blocks=3,single_blocks=6")
SMOKE_STEPS = 150  # the loop logs every 50 steps: s/step is read between the 50th and the 150th
PART_BYTES = 15 * 2**20
STEP_ROUNDING = 250
REHEARSAL = "batch=4,phase.images=48,phase.warmup_steps=5,vae_images=16,clip_steps=5"


def quick_spec(settings: list[str], steps: int):
    """The candidate's spec with every stage at a few steps (its transformer and batch unchanged)."""
    import dataclasses

    from toys.mini.spec import MiniSpec, with_overrides

    spec = with_overrides(MiniSpec(), settings)
    phase = dataclasses.replace(
        spec.phases[-1], steps=steps, images=2 * spec.batch, small_images=0, warmup_steps=10
    )
    return dataclasses.replace(
        spec,
        vae_images=16,
        vae_phases=((256, 10, 4, 48), (128, 4, 2, 0), (256, 2, 1, 0)),
        vae_gate_color=0.0,
        vae_gate_shape=0.0,
        clip_steps=5,
        phases=(phase,),
    )


def run_child(folder: Path, settings: list[str], steps: int, checkpoint_every: int) -> None:
    """A quick build in this process; prints the steady s/step of its transformer stage as JSON."""
    from toys.mini.build import build_flux_mini

    marks: dict[int, float] = {}

    class StepClock(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.match(r"step (\d+)/", record.getMessage())
            if found:
                marks[int(found.group(1))] = time.perf_counter()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("training.loop").addHandler(StepClock())
    build_flux_mini(folder, quick_spec(settings, steps), checkpoint_every=checkpoint_every, workers=2)
    first, last = min(marks), max(marks)
    print(json.dumps({"s_per_step": (marks[last] - marks[first]) / max(1, last - first)}), flush=True)


def score_child(folder: Path, prompts: int) -> None:
    """Held-out colour/shape accuracy of a build through the container's request path (dev, 28 steps)."""
    os.environ["FLUX_WEIGHTS_DIR"] = str(folder.resolve())
    from flux.loading import load_flux
    from toys.mini import quality

    models = load_flux(("dev",))
    accuracy, _ = quality.accuracy(models, quality.prompts_of(quality.held_out_examples(prompts)), seed=1000)
    print(json.dumps(accuracy.__dict__), flush=True)


class Candidate:
    def __init__(self, text: str, work: Path, out: Path):
        self.name, _, settings = text.partition("=")
        self.settings = [s for s in settings.split(",") if s]
        self.folder = work / self.name
        self.log = out / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.result: dict = {"name": self.name, "settings": self.settings}

    def start(self, command: list[str], log: Path) -> None:
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("a"), text=True, env=_env()
        )


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def wait_all(candidates: list[Candidate], deadline: float) -> None:
    """Wait for every process until the deadline; one still running then is stopped."""
    for candidate in candidates:
        process = candidate.process
        try:
            process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            candidate.result["stopped_at_deadline"] = True


def tar_parts(files: list[Path], base: Path, out: Path, name: str) -> list[str]:
    """files (under base) as name.tar, split into parts of PART_BYTES in out (cat name.tar.* > name.tar)."""
    whole = base.parent / f"{name}.tar"
    with tarfile.open(whole, "w") as tar:
        for path in files:
            tar.add(path, arcname=str(Path(name) / path.relative_to(base)))
    data, parts = whole.read_bytes(), []
    for index in range(0, len(data), PART_BYTES):
        part = out / f"{name}.tar.{index // PART_BYTES}"
        part.write_bytes(data[index : index + PART_BYTES])
        parts.append(part.name)
    whole.unlink()
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    parser.add_argument("--overhead", type=float, default=200, help="seconds a build spends before its transformer")
    parser.add_argument("--tail", type=float, default=60, help="seconds kept after the builds (tar, scores)")
    parser.add_argument("--safety", type=float, default=1.2, help="step time multiplier when sizing the builds")
    parser.add_argument("--workers", type=int, default=7, help="image-drawing processes per build")
    parser.add_argument("--score-prompts", type=int, default=24)
    parser.add_argument("--candidate", action="append", help="NAME=FIELD=VALUE,... (MiniSpec --set settings)")
    parser.add_argument("--rehearse", action="store_true", help="tiny builds on any device, to test this script")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=SMOKE_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-every", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--score", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        settings = [s for s in args.settings.split(",") if s]
        return run_child(args.child, settings, args.steps, args.checkpoint_every)
    if args.score:
        return score_child(args.score, args.score_prompts)

    started = time.time()
    end = started + args.budget
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="flux-mini-gpu-"))
    candidates = [Candidate(text, work, out) for text in (args.candidate or DEFAULT_CANDIDATES)]
    extra = REHEARSAL.split(",") if args.rehearse else []
    summary: dict = {"budget_s": args.budget, "rehearse": args.rehearse, "candidates": []}

    def save_summary() -> None:
        summary["elapsed_s"] = round(time.time() - started, 1)
        summary["candidates"] = [c.result for c in candidates]
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    # 1. Smoke, all at once.
    for c in candidates:
        steps = 60 if args.rehearse else SMOKE_STEPS  # a rehearsal's CPU steps are slow: 50 to 60
        c.start(_child(c.folder.with_name(c.name + "-smoke"), c.settings + extra, steps), c.log)
    wait_all(candidates, started + 0.4 * args.budget)
    for c in candidates:
        line = c.process.stdout.read().strip().splitlines()
        if c.process.returncode != 0 or not line:
            c.result["smoke"] = f"failed (exit {c.process.returncode}); see {c.log.name}"
        else:
            c.result["smoke_s_per_step"] = round(json.loads(line[-1])["s_per_step"], 4)
    save_summary()
    ready = [c for c in candidates if "smoke_s_per_step" in c.result]
    if not ready:
        print(json.dumps(summary, indent=1))
        raise SystemExit("every smoke build failed: see the logs")

    # 2. The builds, each sized to end by the budget.
    train_end = end - args.tail
    for c in ready:
        seconds = train_end - time.time() - args.overhead
        steps = int(seconds / (c.result["smoke_s_per_step"] * args.safety)) // STEP_ROUNDING * STEP_ROUNDING
        steps = max(STEP_ROUNDING, steps) if not args.rehearse else 40
        c.result["steps"] = steps
        settings = [*c.settings, *extra, f"phase.steps={steps}"]
        every = max(1, steps // 4) if c is ready[0] else 0  # the learning curve: the first one's EMA by quarters
        if args.rehearse:
            command = _child(c.folder, settings, steps, every)
        else:
            command = [sys.executable, "-m", "toys.mini.build", str(c.folder), "--workers", str(args.workers)]
            command += [x for s in settings for x in ("--set", s)] + ["--checkpoint-every", str(every)]
        c.result["command"] = " ".join(command[1:])
        c.start(command, c.log)
    save_summary()
    wait_all(ready, train_end)

    # 3. Results.
    for c in ready:
        c.result["exit"] = c.process.returncode
        info = c.folder / "build_info.json"
        if c.process.returncode == 0 and info.is_file():
            record = json.loads(info.read_text())
            c.result.update(
                seconds=record["seconds"],
                parameters=record["transformer_parameters"],
                final_loss=record["transformer_phases"][-1]["final_loss"],
                vae_round_trip=record["vae_round_trip"],
                tar=tar_parts(
                    sorted(p for p in c.folder.rglob("*") if p.is_file() and "checkpoints" not in p.parts),
                    c.folder,
                    out,
                    c.name,
                ),
            )
    first = ready[0]
    checkpoints = sorted((first.folder / "checkpoints").glob("*.safetensors"))
    if "tar" in first.result:
        checkpoints = checkpoints[:-1]  # the last is the build's own transformer
    if checkpoints:
        first.result["checkpoints"] = tar_parts(checkpoints, first.folder, out, f"{first.name}-checkpoints")
    save_summary()
    for c in ready:
        if "tar" in c.result and end - time.time() > 30:
            try:
                scored = subprocess.run(
                    [sys.executable, __file__, "--score", str(c.folder), "--score-prompts", str(args.score_prompts)],
                    cwd=ROOT, capture_output=True, text=True, timeout=max(5, end - time.time() - 10), env=_env(),
                )
                c.result["quick_score"] = json.loads(scored.stdout.strip().splitlines()[-1])
            except Exception as error:  # a score is a bonus: the builds are what this run is for
                c.result["quick_score"] = f"failed: {error!r}"[:300]
            save_summary()
    print(json.dumps(summary, indent=1))
    print(f"{'candidate':<10} {'s/step':>7} {'steps':>6} {'exit':>4} {'loss':>7} {'colour':>6} {'shape':>6}")
    for c in candidates:
        r, q = c.result, c.result.get("quick_score")
        q = q if isinstance(q, dict) else {}
        print(
            f"{c.name:<10} {r.get('smoke_s_per_step', '-')!s:>7} {r.get('steps', '-')!s:>6} {r.get('exit', '-')!s:>4} "
            f"{r.get('final_loss', '-')!s:>7} {q.get('color', '-')!s:>6} {q.get('shape', '-')!s:>6}"
        )


def _child(folder: Path, settings: list[str], steps: int, checkpoint_every: int = 0) -> list[str]:
    options = ["--settings", ",".join(settings), "--steps", str(steps), "--checkpoint-every", str(checkpoint_every)]
    return [sys.executable, __file__, "--child", str(folder), *options]


if __name__ == "__main__":
    main()
