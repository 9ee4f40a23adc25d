"""One source of truth for versions: requirements.txt pins, cog.yaml, and what is installed agree."""

import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.markers import Marker

ROOT = Path(__file__).resolve().parent.parent


def read_pins(path: Path) -> dict[str, str]:
    """name -> pinned version, for the pins whose environment marker holds here (pip's own rule)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        requirement = requirement.split(" --")[0]  # a per-line option (torch's index) is not the version
        name, sep, pinned = requirement.partition("==")
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


# Optional at run time (the training falls back to AdamW without it, with a warning), and not
# installed in the shared development venv: absent is reported, a different version still fails.
OPTIONAL = {"bitsandbytes"}


def test_installed_packages_match_the_pins():
    pins = read_pins(ROOT / "requirements.txt") | read_pins(ROOT / "requirements-dev.txt")
    absent = []
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            assert name in OPTIONAL, f"{name}: pinned {pinned}, not installed"
            absent.append(name)
            continue
        installed = installed.split("+")[
            0
        ]  # torch's local tag (+cpu, +cu128) names the build, not the version
        assert installed == pinned, f"{name}: installed {installed}, pinned {pinned}"
    if absent:  # every other pin was checked above
        warnings.warn(
            f"pinned but not installed here (optional at run time): {', '.join(absent)}", stacklevel=1
        )


def test_markers_are_understood(tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text(
        'a==1; platform_system == "Linux" or platform_system != "Linux"\n'
        'b==2; python_version < "3"\n'
        "c==3  # plain\n"
    )
    assert read_pins(pins) == {"a": "1", "c": "3"}
    assert (
        'bitsandbytes==0.50.2; platform_system == "Linux" and platform_machine == "x86_64"'
        in (ROOT / "requirements.txt").read_text()
    )


def test_cog_yaml_uses_the_pins():
    config = cog_yaml()
    assert config["python_requirements"] == "requirements.txt"
    assert config["gpu"] == "true"
    assert config["sdk_version"] == read_pins(ROOT / "requirements-dev.txt")["cog"]
    assert config["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert config["run"] == "predict.py:Runner" and config["train"] == "train.py:train"
    # torch 2.13 ships CUDA 12.8 and 13.0 builds; the image's CUDA must be one of them
    # (tests/test_cog_image.py checks that the image installs the build that matches it).
    assert config["cuda"] in ("12.8", "13.0")
