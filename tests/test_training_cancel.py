"""Cancelling a training: the work folder goes, memory is let go, the next training runs.

Cog cancels by raising `CancelationException` (a BaseException, not an Exception) inside the worker's
thread. The library test raises that exception from inside the training loop and checks what is left;
the server test cancels a real training through `POST /trainings/<id>/cancel` on the Cog server.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from coglet import CancelationException

import training.loop
from tests.training_helpers import make_zip
from training.config import build_training_config
from training.job import run_training
from training.previews import PreviewSettings

NO_PREVIEWS = PreviewSettings(count=0)
# Every image captioned, so no captioner is involved whatever the autocaption default is.
CAPTIONED = [("red", (64, 64), "a red square"), ("blue", (96, 64), "a blue block")]


# ---------- library: the exception Cog raises, thrown from inside the loop ----------


def test_cancel_in_the_loop_cleans_up_and_releases_memory(tiny_models, tmp_path, monkeypatch):
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))  # where run_training makes its work folder
    transformer = tiny_models.transformers["dev"]
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    data = make_zip(tmp_path / "photos.zip", CAPTIONED)

    seen: dict = {}
    real_build_optimizer = training.loop.build_optimizer
    real_loss = training.loop.flow_matching_loss

    def recording_optimizer(name, params, lr, device):
        optimizer, used = real_build_optimizer(name, params, lr, device)
        seen["optimizer"] = weakref.ref(optimizer)
        seen["param"] = weakref.ref(params[0])
        return optimizer, used

    def cancelling_loss(*args, **kwargs):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 4:
            seen["work_files"] = sorted(p.name for p in temp_root.rglob("*"))
            raise CancelationException()
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training.loop, "build_optimizer", recording_optimizer)
    monkeypatch.setattr(training.loop, "flow_matching_loss", cancelling_loss)
    config = build_training_config(steps=50, lora_rank=4, resolution="256", seed=2, optimizer="adamw")
    with pytest.raises(CancelationException) as info:
        run_training(config, data, tmp_path / "out", models=tiny_models, previews=NO_PREVIEWS)

    # It was cancelled mid-loop, with extracted images on disk ...
    assert seen["calls"] == 4
    assert any(name.startswith("lora-train-") for name in seen["work_files"])
    assert "img0.png" in seen["work_files"]
    # ... and now the work folder is gone and nothing was written to the output folder.
    assert list(temp_root.iterdir()) == []
    assert not (tmp_path / "out" / "weights.tar").exists()
    # The optimizer state and LoRA parameters are unreachable while the exception is still being
    # handled (as in Cog's worker): the traceback's frames must not keep them, or a GPU keeps them.
    assert info.value is not None
    assert seen["optimizer"]() is None
    assert seen["param"]() is None
    # The base model is as it was: no adapter, no gradients, same weights, in eval mode.
    assert not any("lora" in name for name, _ in transformer.named_modules())
    assert not any(p.requires_grad for p in transformer.parameters())
    assert not transformer.training
    after = transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())

    # The next training in the same process runs to the end.
    monkeypatch.setattr(training.loop, "flow_matching_loss", real_loss)
    config = build_training_config(steps=3, lora_rank=2, resolution="256", seed=2, optimizer="adamw")
    tar = run_training(config, data, tmp_path / "out2", models=tiny_models, previews=NO_PREVIEWS)
    assert tar.is_file() and tar.stat().st_size > 0
    assert list(temp_root.iterdir()) == []


# ---------- the real Cog server: POST /trainings/<id>/cancel ----------


class WebhookReceiver:
    """Collects the JSON bodies Cog POSTs to a webhook, on a loopback port."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/hook"

    def wait_for(self, condition, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for event in self.events:
                    if condition(event):
                        return event
            time.sleep(0.1)
        raise TimeoutError(
            f"no matching webhook in {timeout:.0f} s; got {[e.get('status') for e in self.events]}"
        )

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def webhooks() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> int:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status


@pytest.mark.server
def test_cancel_through_cog_cleans_up_and_the_next_training_runs(tiny_env, tmp_path, webhooks):
    from cog_local import cog_server, get_json, run_job

    temp_root = tmp_path / "tmp"  # TMPDIR of the server: every temporary file of a training lands here
    temp_root.mkdir()
    raw = make_zip(tmp_path / "photos.zip", CAPTIONED).read_bytes()
    images = f"data:application/zip;base64,{base64.b64encode(raw).decode()}"
    env = {**tiny_env, "TMPDIR": str(temp_root), "LORA_PREVIEW_STEPS": "1"}
    with cog_server("train", env=env, log_path=tmp_path / "train-server.log") as url:
        present_at_start = set(temp_root.iterdir())  # e.g. torch's compile cache folder

        # A long training, started the way Replicate starts one: asynchronous, results by webhook.
        long_run = {"input_images": images, "steps": 200, "resolution": "256", "lora_rank": 2, "seed": 1}
        status = http(
            "PUT",
            f"{url}/trainings/to-cancel",
            {
                "input": long_run,
                "webhook": webhooks.url,
                "webhook_events_filter": ["start", "logs", "completed"],
            },
            {"Prefer": "respond-async"},
        )
        assert status == 202
        # Cancel only once the loop runs (a progress line in the logs), with its work folder on disk.
        webhooks.wait_for(lambda e: "| loss " in (e.get("logs") or ""), timeout=180)
        work = [p for p in temp_root.iterdir() if p.name.startswith("lora-train-")]
        assert len(work) == 1 and any(work[0].rglob("*.png"))
        assert http("POST", f"{url}/trainings/to-cancel/cancel") == 200
        final = webhooks.wait_for(lambda e: e.get("status") not in (None, "starting", "processing"), 60)
        assert final["status"] == "canceled" and final["id"] == "to-cancel"
        assert "step 200/200" not in (final.get("logs") or "")

        # The work folder (extracted images, latent cache, staging) is gone; only train.py's empty
        # output folder may remain (its tar is written after training, so there is none).
        left = set(temp_root.iterdir()) - present_at_start
        assert not [p for p in left if p.name != "flux-lora-training-output"], left
        assert not [f for p in left for f in p.rglob("*")], left
        assert get_json(f"{url}/health-check")["status"] == "READY"

        # The server takes the next training and finishes it.
        short_run = {**long_run, "steps": 3}
        result = run_job(url, "train", short_run, timeout=300)
        assert result["status"] == "succeeded", result.get("error")
        assert result["output"]["weights"].startswith("data:")
        assert not [p for p in temp_root.iterdir() if p.name.startswith("lora-train-")]
