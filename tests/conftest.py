"""Shared fixtures: the tiny model (built once per session) and the real Cog server on it."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A folder with tiny FLUX.1-schnell/ and FLUX.1-dev/, built by the same command users run."""
    from flux.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="session")
def tiny_env(tiny_weights) -> dict:
    return {"FLUX_WEIGHTS_DIR": str(tiny_weights), "FLUX_ALLOW_DOWNLOAD": "0"}


@pytest.fixture(scope="session")
def tiny_models(tiny_env):
    """Both variants of the tiny model loaded in this process (library tests)."""
    from flux.loading import load_flux

    previous = {key: os.environ.get(key) for key in tiny_env}
    os.environ.update(tiny_env)
    try:
        yield load_flux(("dev", "schnell"))
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def predict_server(tiny_env, tmp_path_factory):
    """The real Cog HTTP server running predict.py on the tiny model; yields a client."""
    from cog_local import cog_server

    log_path = tmp_path_factory.mktemp("server") / "predict-server.log"
    with cog_server("predict", env=tiny_env, log_path=log_path) as url:
        yield CogClient(url, log_path)


class CogClient:
    def __init__(self, url: str, log_path: Path):
        self.url = url
        self.log_path = log_path

    def predict(self, **inputs) -> dict:
        from cog_local import run_job

        return run_job(self.url, "predict", inputs, timeout=600)

    def health(self) -> dict:
        from cog_local import get_json

        return get_json(f"{self.url}/health-check")
