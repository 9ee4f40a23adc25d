"""One source of truth for versions: requirements.txt pins, cog.yaml, and what is installed agree."""

import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        name, sep, pinned = line.partition("==")
        assert sep, f"{path.name}: '{line}' is not pinned with =="
        pins[name.strip()] = pinned.strip()
    return pins


def cog_yaml() -> dict[str, str]:
    # A flat reader is enough for the keys checked here (no yaml dependency for one file).
    values = {}
    for line in (ROOT / "cog.yaml").read_text().splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and value.strip() and not key.startswith("#"):
            values[key.strip()] = value.split("#")[0].strip().strip('"')
    return values


def test_installed_packages_match_the_pins():
    pins = read_pins(ROOT / "requirements.txt") | read_pins(ROOT / "requirements-dev.txt")
    for name, pinned in pins.items():
        installed = version(name).split("+")[
            0
        ]  # torch's local tag (+cpu, +cu128) names the build, not the version
        assert installed == pinned, f"{name}: installed {installed}, pinned {pinned}"


def test_cog_yaml_uses_the_pins():
    config = cog_yaml()
    assert config["python_requirements"] == "requirements.txt"
    assert config["gpu"] == "true"
    assert config["sdk_version"] == read_pins(ROOT / "requirements-dev.txt")["cog"]
    assert config["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert config["run"] == "predict.py:Runner" and config["train"] == "train.py:train"
    # torch 2.13 ships CUDA 12.8 and 13.0 builds; the image's CUDA must be one of them.
    assert config["cuda"] in ("12.8", "13.0")
