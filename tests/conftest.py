"""Shared fixtures: the tiny model (built once per session) and the real Cog server on it."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Tiny FLUX.1-schnell/, FLUX.1-dev/ and helper models, built by the same commands users run."""
    from toys.tiny import build_tiny_model
    from toys.tiny_helpers import build_tiny_helpers

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-weights"))
    build_tiny_helpers(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_env(tiny_weights) -> dict:
    return {
        "FLUX_WEIGHTS_DIR": str(tiny_weights),
        "FLUX_HELPER_WEIGHTS_DIR": str(tiny_weights),
        "FLUX_ALLOW_DOWNLOAD": "0",  # no test may reach the network
        "FLUX_AUTOCAPTION_MAX_TOKENS": "4",  # the tiny captioner's words are noise; keep it quick
    }


@pytest.fixture(scope="session", autouse=True)
def offline_tiny_environment(tiny_env):
    """Every test runs against the tiny models and can never download (tests may narrow this further)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in tiny_env.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def tiny_models(offline_tiny_environment):
    """Both variants of the tiny model loaded in this process (library tests)."""
    from flux.loading import load_flux

    return load_flux(("dev", "schnell"))


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
