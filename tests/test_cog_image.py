"""The image `cog build` / `cog push` make is the one the tests ran, checked offline by cog's own rules.

Rules read in replicate/cog (main, 2026-08-21): pkg/requirements/requirements.go
SplitPinnedPythonRequirement (a `--extra-index-url=` on a pinned line moves to the top of the image's
requirements), pkg/config/compatibility.go cudaVersionFromIndexURL (`.../cu128` is CUDA 12.8),
pkg/dockerfile/standard_generator.go (cog and coglet lines in requirements are dropped; coglet is the
newest unless COGLET_WHEEL pins it) and pkg/weightslegacy/weights.go FindWeights (what
`--separate-weights` puts in the weights layer).
"""

import fnmatch
import os
import re
import subprocess
from importlib.metadata import requires, version
from pathlib import Path

from packaging.requirements import Requirement
from test_versions import ROOT, cog_yaml, read_pins

# --- cog's rules, ported ---

PINNED_LINE = re.compile(
    r"(?:([a-zA-Z0-9\-_]+)==([^ ]+)|--find-links=(\S+)|-f\s+(\S+)|--extra-index-url=(\S+))"
)
CUDA_IN_INDEX = re.compile(r"cu(\d{2,})")
WEIGHT_SIZE = 10 * 1024 * 1024
IGNORED_PREFIXES = (".cog", ".git", "__pycache__")
IGNORED_SUFFIXES = (
    ".py", ".ipynb", ".whl",
    ".jpg", ".jpeg", ".png", ".webp", ".svg", ".gif", ".avif", ".heic",
    ".mp4", ".mov", ".avi", ".wmv", ".mkv", ".webm",
    ".mp3", ".wav", ".ogg", ".flac", ".aac", ".m4a",
    ".log",
)  # fmt: skip


def torch_index_cuda(line: str) -> str | None:
    """The CUDA of the torch build a pinned requirement line installs in the image (None: PyPI's default)."""
    for match in PINNED_LINE.finditer(line):
        if match.group(5):
            found = CUDA_IN_INDEX.search(match.group(5))
            if found:
                digits = found.group(1)
                return f"{digits[:-1]}.{digits[-1]}"
    return None


def find_weights(root: Path) -> list[str]:
    """cog's FindWeights: folders (and root files) of files >= 10 MB that hold no code, walked
    without following links and without reading .dockerignore."""
    files, code = [], []
    for folder, _dirs, names in os.walk(root):  # os.walk, like filepath.Walk, does not enter links
        for name in names:
            path = os.path.relpath(os.path.join(folder, name), root)
            if ".git" in Path(path).parent.parts:
                continue
            if path.endswith((".py", ".ipynb")):
                code.append(path)
                continue
            full = os.path.join(folder, name)
            if os.path.islink(full) or os.path.getsize(full) < WEIGHT_SIZE:
                continue
            if path.startswith(IGNORED_PREFIXES) or path.endswith(IGNORED_SUFFIXES):
                continue
            files.append(path)
    files.sort(key=lambda p: (len(p.split("/")), p.split("/")))
    dirs: list[str] = []
    root_files: list[str] = []
    for path in files:
        folder = os.path.dirname(path)
        if not folder:
            root_files.append(path)
        elif not any(folder == d or folder.startswith(d + "/") for d in dirs):
            dirs.append(folder)
    return [d for d in dirs if not any(c.startswith(d) for c in code)] + root_files


def dockerignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


# --- CUDA: the image's base and its torch build agree ---


def test_the_image_installs_the_torch_build_of_its_cuda():
    torch_line = next(
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")
    )
    cuda = cog_yaml()["cuda"]
    # Without an index on the line cog keeps it as it is for torch 2.13 (not in its table), and pip
    # takes PyPI's default wheel: the CUDA 13.0 build, whatever cog.yaml says.
    assert torch_index_cuda(torch_line) == cuda, (torch_line, cuda)
    assert torch_index_cuda("torch==2.13.0") is None
    readme = (ROOT / "README.md").read_text()
    assert f"CUDA {cuda}" in readme and "NVIDIA driver 570 or newer" in readme
    # uv takes each package from the first index that has it; the torch index has other versions
    # of numpy, pillow, ... than the pins.
    assert "UV_INDEX_STRATEGY=unsafe-best-match" in (ROOT / "cog.yaml").read_text()


def test_locally_pip_takes_the_plain_pin():
    from pip._internal.network.session import PipSession
    from pip._internal.req.req_file import parse_requirements

    parsed = {
        Requirement(r.requirement).name: str(Requirement(r.requirement).specifier)
        for r in parse_requirements(str(ROOT / "requirements.txt"), session=PipSession())
    }
    assert parsed["torch"] == "==" + read_pins(ROOT / "requirements.txt")["torch"]


# --- coglet: the tested one, in the image too ---


def test_coglet_is_pinned_to_the_tested_version_everywhere():
    pinned = read_pins(ROOT / "requirements-dev.txt")["coglet"]
    assert version("coglet") == pinned
    cog_needs = [Requirement(r) for r in requires("cog") or [] if r.startswith("coglet")]
    assert cog_needs and all(pinned in r.specifier for r in cog_needs)
    # cog drops coglet lines from requirements.txt and installs the newest unless COGLET_WHEEL says.
    run_sh = (ROOT / "run.sh").read_text()
    assert 'COGLET_WHEEL="pypi:$COGLET_PIN" exec cog "$command" --separate-weights' in run_sh
    shown = subprocess.run(
        ["bash", "-c", "source <(sed -n '/^COGLET_PIN=/p' run.sh) && echo $COGLET_PIN"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == pinned
    assert "coglet" not in (ROOT / "requirements.txt").read_text()


# --- the weights layer: only model weights, all inside the build context ---


def test_the_weight_finder_port_on_a_model_checkout(tmp_path):
    checkout = tmp_path / "checkout"

    def sparse(path: Path, size: int = WEIGHT_SIZE + 1) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)

    for part in ("transformer/diffusion_pytorch_model-00001-of-00003.safetensors", "vae/model.safetensors"):
        sparse(checkout / "weights/models/FLUX.1-dev" / part)
    sparse(checkout / "weights/models/FLUX.1-dev/model_index.json", 400)
    (checkout / "weights/__init__.py").write_text("")
    sparse(checkout / "outputs/out-0.webp")
    sparse(tmp_path / "venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so")
    (checkout / ".venv").symlink_to(tmp_path / "venv")  # as run.sh makes it
    expected = ["weights/models/FLUX.1-dev/transformer", "weights/models/FLUX.1-dev/vae"]
    assert find_weights(checkout) == expected
    # A .venv folder in the checkout is found (cog then fails: .venv is not in the build context).
    (checkout / ".venv").unlink()
    (tmp_path / "venv").rename(checkout / ".venv")
    assert find_weights(checkout) == [*expected, ".venv/lib/python3.11/site-packages/torch/lib"]
    assert dockerignored(".venv/lib/python3.11/site-packages/torch/lib")


def test_this_checkout_offers_cog_only_model_weights():
    """After ./run.sh test: the environment is a link (run.sh), so only weights/ can be found, and
    every folder found is in the build context (cog fails on one that is not)."""
    assert (ROOT / ".venv").is_symlink() or not (ROOT / ".venv").exists()
    for found in find_weights(ROOT):
        assert found.startswith("weights/") and not dockerignored(found), found
