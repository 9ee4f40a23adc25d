"""Run the real Cog HTTP server locally and send it one request, like `cog predict` / `cog train`.

    python scripts/cog_local.py predict -i prompt="a red circle" -i num_outputs=2 [-o outputs]
    python scripts/cog_local.py train -i input_images=@photos.zip -i steps=50

`-i key=value` is converted to the input's declared type, read from predict.py / train.py as the cog CLI
reads the schema (str stays text: `-i megapixels=0.25` is the string "0.25"); `-i key=@path` sends a local
file (as a data: URL, which Cog turns back into a file).
Outputs that are files are written under -o (default ./outputs). Docker and the cog CLI are not needed.
"""

import argparse
import base64
import difflib
import json
import mimetypes
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from cog_schema import static_inputs, write_bundled_schema

ROOT = Path(__file__).resolve().parent.parent
STUBS = {
    "predict": ("COG_PREDICT_TYPE_STUB", "predict.py:Runner"),
    "train": ("COG_TRAIN_TYPE_STUB", "train.py:train"),
}


def declared_types(mode: str) -> dict[str, str]:
    """{input name: cog primitive (str, int, float, bool, Path, Secret)}, read as `cog build` reads them."""
    return {item.name: item.primitive for item in static_inputs(mode)}


def convert(value: str, primitive: str | None):
    """A command-line value as the type the input declares (str stays text: megapixels=0.25 is "0.25")."""
    if primitive in ("str", "Secret"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # sent as text: the schema or the predictor's own validation names the field


def parse_inputs(pairs: list[str], mode: str = "predict") -> dict:
    """-i key=value pairs as a request's input; like the cog CLI, a name the model does not declare is
    refused (the server would drop it with only a warning in its log)."""
    types = declared_types(mode)
    inputs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected key=value")
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise SystemExit(f"-i {key}: the model has no input {key!r}; {hint}inputs: {', '.join(types)}")
        if value.startswith("@"):
            inputs[key] = file_to_data_url(Path(value[1:]))
        else:
            inputs[key] = convert(value, types[key])
    return inputs


def file_to_data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def cog_server(
    mode: str = "predict", env: dict | None = None, setup_timeout: float = 600, log_path: Path | None = None
):
    """Start `python -m cog.server.http` on a free loopback port; yield its base URL once READY.

    The server gets the schema `cog build` would bundle (.cog/openapi_schema.json), so it validates and
    drops unknown inputs as the built image does."""
    write_bundled_schema(ROOT)
    port = free_port()
    stub_var, stub = STUBS[mode]
    server_env = {**os.environ, "PORT": str(port), stub_var: stub, **(env or {})}
    # The worker is started as plain `python`: this interpreter's folder must come first on PATH.
    server_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{server_env.get('PATH', '')}"
    args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
    if mode == "train":
        args.append("--x-mode=train")
    log_file = open(log_path or os.devnull, "wb")
    process = subprocess.Popen(args, cwd=ROOT, env=server_env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, setup_timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log_file.close()


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Cog server exited with code {process.returncode}")
        try:
            health = get_json(f"{url}/health-check")
            if health.get("status") == "READY":
                return health
            if health.get("status") in ("SETUP_FAILED", "DEFUNCT"):
                raise RuntimeError(f"setup failed:\n{health.get('setup', {}).get('logs', '')}")
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Cog server at {url} was not READY after {timeout:.0f} s")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict, timeout: float = 3600) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def run_job(url: str, mode: str, inputs: dict, timeout: float = 3600, busy_wait: float = 60) -> dict:
    """POST one job and wait for its result. The server answers 409 while its one slot is still
    busy (coglet 0.23 also for a moment after the previous response): retried like a queue would.
    A 422 (the input does not fit the schema) comes back as a failed job naming the fields."""
    endpoint = "trainings" if mode == "train" else "predictions"
    deadline = time.monotonic() + busy_wait
    while True:
        try:
            return post_json(f"{url}/{endpoint}", {"input": inputs}, timeout)
        except urllib.error.HTTPError as error:
            if error.code == 422:
                return {"status": "failed", "error": schema_error_text(error.read()), "http_status": 422}
            if error.code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def schema_error_text(body: bytes) -> str:
    """coglet's pydantic-style 422 detail as one line: `field: message; ...`."""
    try:
        detail = json.loads(body).get("detail", [])
        return "; ".join(f"{item['loc'][-1]}: {item['msg']}" for item in detail) or body.decode()
    except (ValueError, KeyError, TypeError, AttributeError):
        return body.decode(errors="replace")


def decode_data_url(value: str) -> bytes:
    header, _, payload = value.partition(",")
    return base64.b64decode(payload) if header.endswith(";base64") else payload.encode()


def write_outputs(output, out_dir: Path, default_stem: str = "output") -> list[Path]:
    """Write every data: URL in the output (a file, a list, or a dict of them) under out_dir."""
    written = []

    def visit(value, stem):
        if isinstance(value, str) and value.startswith("data:"):
            mime = value[5:].split(";")[0].split(",")[0]
            ext = mimetypes.guess_extension(mime) or ""
            path = out_dir / f"{stem}{ext}"
            path.write_bytes(decode_data_url(value))
            written.append(path)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, f"out-{index}" if stem == default_stem else f"{stem}-{index}")
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, key)

    out_dir.mkdir(parents=True, exist_ok=True)
    visit(output, default_stem)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=list(STUBS))
    parser.add_argument("-i", "--input", action="append", default=[], help="key=value or key=@file")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("outputs"))
    args = parser.parse_args()
    inputs = parse_inputs(args.input, args.mode)
    print(f"starting the Cog server ({args.mode}) ...", file=sys.stderr)
    with cog_server(args.mode) as url:
        print(f"Cog server ready at {url}; running ...", file=sys.stderr)
        result = run_job(url, args.mode, inputs)
    sys.stderr.write(result.get("logs") or "")
    if result.get("status") != "succeeded":
        print(f"failed: {result.get('error')}", file=sys.stderr)
        return 1
    for path in write_outputs(result.get("output"), args.output_dir):
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
