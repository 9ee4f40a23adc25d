"""A server that runs for weeks, compressed: N mixed requests through the real Cog server (tiny model, CPU).

    .venv/bin/python bench/soak.py [--requests 1000] [--every 50] [--env NAME=VALUE ...]

The mix: text-to-image at varying sizes and aspect ratios, img2img, inpainting, LoRA churn (none, A,
B, A+B, at varying scales; the files from a loopback host) and 10 % bad inputs. Every `--every`
requests it samples the resident memory of the server and its worker (summed over the process
tree) and the size of the server's temp folder. At the end the base model must be restored
exactly: a plain request repeats the first one's bytes. `--env` adds variables to the server's
environment (to compare allocator settings); the image's own are cog.yaml's `environment`.
Prints the samples and a summary; record them in bench/RESULTS.md with the date and the machine.
"""

import argparse
import base64
import io
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import torch  # noqa: E402
from cog_local import cog_server, run_job  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save  # noqa: E402

from toys.tiny import build_tiny_model, build_transformer  # noqa: E402
from toys.tiny_helpers import build_tiny_helpers  # noqa: E402

SIZES = [(256, 256), (512, 512), (384, 640), (640, 384), (256, 768), (1024, 512), (336, 1008)]


def lora_file(seed: int, rank: int) -> bytes:
    """A PEFT-layout LoRA on every block linear of the tiny transformer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in build_transformer(guidance_embeds=False).named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name:
            out_f, in_f = module.weight.shape
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * 0.1
    return save(state)


def serve(files: dict[str, bytes]) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_mix(count: int, host: str, seed: int = 0) -> list[tuple[str, dict]]:
    """(kind, inputs) for each request; the first is the plain reference request."""
    rng = random.Random(seed)
    base = {"prompt": "a red circle on a white background", "num_inference_steps": 2, "output_format": "png"}
    plain = {**base, "model": "schnell", "aspect_ratio": "custom", "width": 256, "height": 256, "seed": 7}
    loras = [{}, {"lora_weights": f"{host}/a.safetensors"}, {"lora_weights": f"{host}/b.safetensors"},
             {"lora_weights": f"{host}/a.safetensors", "extra_lora": f"{host}/b.safetensors"}]  # fmt: skip
    bad = [{"guidance": 2, "guidance_scale": 4}, {"lora_weights": f"{host}/missing.safetensors"},
           {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, {"lora_weights": "data:x;base64,gASV"}]  # fmt: skip
    mix = [("plain", plain)]
    for index in range(1, count):
        width, height = rng.choice(SIZES)
        inputs = {**base, "model": rng.choice(["schnell", "dev"]), "seed": index}
        inputs |= {**rng.choice(loras), "lora_scale": rng.choice([0.5, 1.0, 1.5])}
        roll = rng.random()
        if roll < 0.1:
            kind, inputs = "bad", {**inputs, "aspect_ratio": "1:1", "megapixels": "0.25", **rng.choice(bad)}
        elif roll < 0.3:
            source = Image.new("RGB", (width, height), (rng.randrange(256), 40, 200))
            kind, inputs = "img2img", {**inputs, "image": data_url(source), "prompt_strength": 0.7}
            if roll < 0.2:
                mask = Image.new("L", (width, height), 0)
                mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
                kind, inputs = "inpaint", {**inputs, "mask": data_url(mask)}
        else:
            kind, inputs = "txt2img", {**inputs, "aspect_ratio": "custom", "width": width, "height": height}
        mix.append((kind, inputs))
    return mix


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (from /proc). Parents are read from
    every process's stat: the Cog server starts its worker from another thread than its main one, so
    /proc/<pid>/task/<pid>/children alone misses it."""
    children, rss = defaultdict(list), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            status = (proc / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(proc.name))
        rss[int(proc.name)] = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0
        )
    total, stack = 0, [pid]
    while stack:  # a process tree has no cycles: each pid is reached once
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children[current])
    return total / 1024


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    weights = build_tiny_model(work / "weights")
    build_tiny_helpers(weights)
    temp = work / "tmp"
    temp.mkdir()
    httpd, host = serve({"/a.safetensors": lora_file(1, 4), "/b.safetensors": lora_file(2, 8)})
    env = {
        "FLUX_WEIGHTS_DIR": str(weights),
        "FLUX_HELPER_WEIGHTS_DIR": str(weights),
        "FLUX_ALLOW_DOWNLOAD": "0",
        "FLUX_LORA_CACHE_DIR": str(work / "loras"),
        "TMPDIR": str(temp),
        **dict(item.split("=", 1) for item in args.env),
    }
    mix = request_mix(args.requests, host)
    failures, samples, reference = [], [], None
    with cog_server("predict", env=env, log_path=work / "server.log") as url:
        server_pid = _server_pid(url)
        samples.append((0, tree_rss_mb(server_pid), folder_mb(temp), 0.0))
        started = time.perf_counter()
        for index, (kind, inputs) in enumerate(mix, start=1):
            result = run_job(url, "predict", inputs, timeout=600)
            if (result["status"] == "succeeded") == (kind == "bad"):
                failures.append((index, kind, result.get("error")))
            if index == 1:
                reference = result["output"][0]
            if index % args.every == 0 or index == len(mix):
                per_request = (time.perf_counter() - started) / index
                samples.append((index, tree_rss_mb(server_pid), folder_mb(temp), per_request))
                print(f"request {index}: RSS {samples[-1][1]:.0f} MB, temp {samples[-1][2]:.1f} MB, "
                      f"{per_request:.3f} s/request", flush=True)  # fmt: skip
        restored = run_job(url, "predict", mix[0][1])["output"][0] == reference
    httpd.shutdown()
    at_100 = next((rss for index, rss, _, _ in samples if index >= 100), samples[-1][1])
    print("\n| request | server RSS (MB) | temp folder (MB) | s/request so far |\n|---|---|---|---|")
    for index, rss, temp_mb, per_request in samples:
        print(f"| {index} | {rss:.0f} | {temp_mb:.1f} | {per_request:.3f} |")
    growth = 100 * (samples[-1][1] / at_100 - 1)
    print(f"\nRSS at the last request vs request 100: {growth:+.1f} %; unexpected results: {len(failures)}; "
          f"base restored bit for bit: {restored}; extra env: {args.env or 'none'}")  # fmt: skip
    for failure in failures[:10]:
        print("unexpected:", failure)


def _server_pid(url: str) -> int:
    """The pid of the process listening on the server's port (the Cog server; its worker is a child)."""
    port = int(url.rsplit(":", 1)[1])
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = str(fd.readlink())
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    raise RuntimeError(f"no process listens on port {port}")


if __name__ == "__main__":
    main()
