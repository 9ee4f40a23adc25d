"""A server that runs for weeks, through the real Cog server on the tiny model: outputs do not pile up
in the temp folder, a trickling LoRA host cannot hold the server, and what a killed server left
behind is removed at setup."""

import time

import pytest
from cog_local import cog_server
from http_fixture import FixtureServer, safetensors_bytes
from test_leftovers import OWN_A_FOLDER, kill, start

pytestmark = pytest.mark.server

QUICK = {
    "prompt": "a red circle",
    "model": "schnell",
    "num_inference_steps": 1,
    "aspect_ratio": "custom",
    "width": 256,
    "height": 256,
    "output_format": "png",
}
DEADLINE_S = 3


@pytest.fixture(scope="module")
def hygiene(tiny_env, tmp_path_factory):
    """A server with its own temp folder, holding what a killed server left: an output folder and
    a partial LoRA download (their owners were SIGKILLed)."""
    from conftest import CogClient

    folder = tmp_path_factory.mktemp("hygiene")
    temp = folder / "tmp"
    temp.mkdir()
    dead, dead_output = start(OWN_A_FOLDER, "flux-out-", str(temp))
    kill(dead)
    cache = folder / "cache"
    partial = cache / ".tmp-0123456789abcdef0123456789abcdef-x1y2"
    partial.mkdir(parents=True)
    (partial / "download").write_bytes(b"x" * 4096)
    files = FixtureServer().start()
    env = {
        **tiny_env,
        "TMPDIR": str(temp),
        "FLUX_LORA_CACHE_DIR": str(cache),
        "FLUX_LORA_DOWNLOAD_DEADLINE_S": str(DEADLINE_S),
        "FLUX_LORA_DOWNLOAD_MIN_MIB_S": "0.000001",  # the deadline is what this server tests
    }
    with cog_server("predict", env=env, log_path=folder / "server.log") as url:
        yield {
            "client": CogClient(url, folder / "server.log"),
            "temp": temp,
            "leftovers": [dead_output, partial],
            "files": files,
        }
    files.stop()


def test_setup_removes_what_a_killed_server_left(hygiene):
    assert not any(path.exists() for path in hygiene["leftovers"])


def test_outputs_do_not_pile_up(hygiene):
    client, temp = hygiene["client"], hygiene["temp"]
    for index in range(50):
        result = client.predict(**QUICK, seed=index, num_outputs=1 + index % 2)
        assert result["status"] == "succeeded", result.get("error")
    outputs = sorted(temp.glob("flux-out-*"))
    assert len(outputs) == 1  # the server's one output folder
    assert sorted(p.name for p in outputs[0].iterdir()) == [".owner", "out-0.png", "out-1.png"]
    left = [p for p in temp.rglob("*") if p.is_file() and outputs[0] not in p.parents]
    assert sum(p.stat().st_size for p in left) < 1_000_000, left


def test_a_trickling_lora_host_fails_at_the_deadline_and_the_server_goes_on(hygiene):
    client, files = hygiene["client"], hygiene["files"]
    files.add("/drip.safetensors", safetensors_bytes(seed=3), drip_s=0.5)
    started = time.monotonic()
    result = client.predict(**QUICK, lora_weights=files.url("/drip.safetensors"))
    took = time.monotonic() - started
    assert result["status"] == "failed"
    assert "lora_weights: got" in result["error"] and "/drip.safetensors" in result["error"]
    assert f"deadline of {DEADLINE_S} s" in result["error"]
    assert took < DEADLINE_S + 10
    started = time.monotonic()
    assert client.predict(**QUICK)["status"] == "succeeded"
    assert time.monotonic() - started < 10
