"""Setup and per-request time of predict.py through the real Cog server on the tiny model (CPU).

    .venv/bin/python bench/tiny_server.py [--repeat 3]

Prints a table; record it in bench/RESULTS.md with the date and the machine.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from cog_local import cog_server, run_job  # noqa: E402

from toys.tiny import build_tiny_model  # noqa: E402

CASES = {
    "schnell 1024x1024, 4 steps": dict(model="schnell"),
    "dev 1024x1024, 28 steps": dict(model="dev"),
    "schnell 512x512, 4 steps": dict(model="schnell", megapixels="0.25"),
    "dev 512x512, 28 steps, 4 outputs": dict(model="dev", megapixels="0.25", num_outputs=4),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    weights = build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")))
    started = time.perf_counter()
    with cog_server("predict", env={"FLUX_WEIGHTS_DIR": str(weights), "FLUX_ALLOW_DOWNLOAD": "0"}) as url:
        setup_s = time.perf_counter() - started
        rows = [("server start to READY (setup)", setup_s)]
        for name, inputs in CASES.items():
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                result = run_job(
                    url, "predict", {"prompt": "a red circle on a white background", "seed": 1, **inputs}
                )
                assert result["status"] == "succeeded", result.get("error")
                times.append(time.perf_counter() - t0)
            rows.append((f"{name} (median of {args.repeat})", statistics.median(times)))
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
