"""What `cog build` needs besides readable inputs, checked offline: cog.yaml's keys, the entry points,
the Python and CUDA versions, and a build context that leaves the local environment out.

The key lists are cog's config schema (replicate/cog pkg/config/data/config_schema_v1.0.json); the CUDA
base images are those of its pkg/config/cuda_compatibility.json (read 2026-12-02).
"""

import ast
import fnmatch
from pathlib import Path

from test_versions import ROOT, cog_yaml

TOP_LEVEL_KEYS = {
    "build",
    "image",
    "model",
    "run",
    "predict",
    "train",
    "concurrency",
    "environment",
    "weights",
}
BUILD_KEYS = {
    "cuda",
    "cudnn",
    "gpu",
    "python_version",
    "python_packages",
    "pre_install",
    "python_requirements",
    "system_packages",
    "sdk_version",
    "run",
}
COG_PYTHONS = {"3.10", "3.11", "3.12", "3.13"}  # what cog's base images and coglet wheels cover
COG_CUDA_BASES = {"12.6", "12.8", "12.9", "13.0"}  # recent CUDA base images cog builds on


def yaml_keys() -> tuple[set[str], set[str]]:
    top, build, section = set(), set(), None
    for line in (ROOT / "cog.yaml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key = line.split(":")[0]
        if not line.startswith(" "):
            top.add(key.strip())
            section = key.strip()
        elif section == "build" and line.startswith("  ") and not line.startswith("   "):
            build.add(key.strip())
    return top, build


def test_cog_yaml_has_only_keys_cog_knows():
    top, build = yaml_keys()
    assert top <= TOP_LEVEL_KEYS, top - TOP_LEVEL_KEYS
    assert build <= BUILD_KEYS, build - BUILD_KEYS


def test_entry_points_name_what_the_files_define():
    config = cog_yaml()
    for key, kind in (("run", ast.ClassDef), ("train", ast.FunctionDef)):
        filename, name = config[key].split(":")
        tree = ast.parse((ROOT / filename).read_text())
        assert any(isinstance(node, kind) and node.name == name for node in tree.body), config[key]


def test_python_and_cuda_versions_cog_can_build():
    config = cog_yaml()
    assert config["python_version"] in COG_PYTHONS
    assert config["cuda"] in COG_CUDA_BASES


def test_the_build_context_leaves_the_local_environment_out():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "weights/tiny/FLUX.1-dev/model_index.json",
        "outputs/out-0.webp",
    ):
        assert ignored(path), path
    for path in ("predict.py", "train.py", "flux/generate.py", "weights/models/FLUX.1-dev/model_index.json"):
        assert not ignored(path), path
    assert Path(ROOT / "requirements.txt").is_file()
