"""train.py through the real Cog server with two training processes (FLUX_TRAIN_PROCESSES=2: gloo on the CPU,
the path a machine with two GPUs takes with NCCL): one tar, written once, the outputs of a one-process
training; a failing process fails the training naming its rank; a cancel ends every process; the server
stays READY and the next training succeeds."""

import base64
import io
import json
import re
import tarfile
import time

import pytest
from test_training_cancel import WebhookReceiver, http
from test_training_processes import gone

from tests.training_helpers import make_zip

pytestmark = [pytest.mark.server, pytest.mark.slow]  # ~80 s: `./run.sh test -m slow`


@pytest.fixture(scope="module")
def server(tiny_env, tmp_path_factory):
    from cog_local import cog_server

    folder = tmp_path_factory.mktemp("two-processes")
    temp_root = folder / "tmp"  # TMPDIR of the server: every temporary file of a training lands here
    temp_root.mkdir()
    env = {**tiny_env, "LORA_PREVIEW_STEPS": "1", "FLUX_TRAIN_PROCESSES": "2", "TMPDIR": str(temp_root)}
    with cog_server("train", env=env, log_path=folder / "train-server.log") as url:
        yield url, temp_root, folder / "train-server.log"


def images(tmp_path) -> str:
    raw = make_zip(tmp_path / "photos.zip").read_bytes()
    return f"data:application/zip;base64,{base64.b64encode(raw).decode()}"


def training_pids(logs: str) -> list[int]:
    """The pids of the last training's processes, as the launcher logged them."""
    found = re.findall(r"training on 2 processes \(gloo\), pids \[(\d+), (\d+)\]", logs)
    assert found, logs[-2000:]
    return [int(pid) for pid in found[-1]]


def ready(url: str) -> bool:
    """The server reports READY (it says BUSY for a moment after a job ends)."""
    from cog_local import get_json

    for _ in range(50):
        if get_json(f"{url}/health-check")["status"] == "READY":
            return True
        time.sleep(0.2)
    return False


def test_two_processes_through_cog_return_one_tar_with_every_output(server, tmp_path):
    from cog_local import decode_data_url, run_job

    url, temp_root, _ = server
    inputs = {"input_images": images(tmp_path), "trigger_word": "ZQX", "steps": 4, "resolution": "256"}
    result = run_job(url, "train", {**inputs, "lora_rank": 2, "seed": 4}, timeout=600)
    assert result["status"] == "succeeded", result.get("error")
    with tarfile.open(fileobj=io.BytesIO(decode_data_url(result["output"]["weights"]))) as tar:
        names = tar.getnames()
        config = json.loads(tar.extractfile("config.json").read())
    assert len(names) == len(set(names))  # every member written once, by the main process
    assert {"lora.safetensors", "config.json", "captions.txt", "loss.png"} <= set(names)
    assert {f"previews/preview-{i}.webp" for i in range(3)} <= set(names)
    assert config["steps"] == 4 and config["trigger_word"] == "ZQX"
    trained = config["training"]
    assert (trained["processes"], trained["global_batch"], trained["optimizer_steps"]) == (2, 2, 2)
    logs = result.get("logs") or ""
    assert "2 processes: global batch 2 (1 per process), 2 optimizer steps for steps=4" in logs
    assert all(gone(pid) for pid in training_pids(logs))
    assert not [
        p for p in temp_root.iterdir() if p.name.startswith(("lora-train-", "flux-train-rendezvous-"))
    ]


def test_a_failing_process_fails_the_training_naming_its_rank_and_the_next_succeeds(server, tmp_path):
    from cog_local import run_job

    url, _, server_log = server
    inputs = {"input_images": images(tmp_path), "steps": 4, "resolution": "256", "lora_rank": 2}
    # A layer regex that matches nothing is found only once a process has loaded the transformer.
    failed = run_job(url, "train", {**inputs, "layers_to_optimize_regex": "no_such_layer"}, timeout=600)
    assert failed["status"] == "failed"
    assert re.search(
        r"training process [01] of 2 failed: UserInputError: layers_to_optimize_regex", failed["error"]
    )
    assert all(gone(pid) for pid in training_pids(server_log.read_text()))  # a failed job returns no logs
    assert ready(url)
    assert run_job(url, "train", inputs, timeout=600)["status"] == "succeeded"


@pytest.fixture
def webhooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def test_a_cancel_ends_every_process_and_the_next_training_runs(server, tmp_path, webhooks):
    from cog_local import run_job

    url, temp_root, server_log = server
    long_run = {
        "input_images": images(tmp_path),
        "steps": 400,
        "resolution": "256",
        "lora_rank": 2,
        "seed": 1,
    }
    status = http(
        "PUT",
        f"{url}/trainings/to-cancel",
        {"input": long_run, "webhook": webhooks.url, "webhook_events_filter": ["start", "logs", "completed"]},
        {"Prefer": "respond-async"},
    )
    assert status == 202
    # Cancel once the loop runs: the main process's progress lines reach the training's logs.
    webhooks.wait_for(lambda e: "| loss " in (e.get("logs") or ""), timeout=180)
    pids = training_pids(server_log.read_text())
    assert http("POST", f"{url}/trainings/to-cancel/cancel") == 200
    final = webhooks.wait_for(lambda e: e.get("status") not in (None, "starting", "processing"), 60)
    assert final["status"] == "canceled"
    assert all(gone(pid) for pid in pids)
    assert not [
        p for p in temp_root.iterdir() if p.name.startswith(("lora-train-", "flux-train-rendezvous-"))
    ]
    assert ready(url)
    assert run_job(url, "train", {**long_run, "steps": 4}, timeout=600)["status"] == "succeeded"
