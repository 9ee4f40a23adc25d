"""Where the helper models' weights come from: the safety checker and the training-image captioner.

The base-model rule (weights/base_models.py), generalised to any Hub repo:
1. an explicit folder passed by the caller (used as it is: no fallback, so a typo is an error);
2. FLUX_HELPER_WEIGHTS_DIR/<folder>, an operator's (or a test's) folder of helper models;
3. the project folder weights/models/<folder>, shared with the base weights;
4. a download of only the listed files (safetensors, configs, tokenizer; never pickle) into that project folder,
   unless FLUX_ALLOW_DOWNLOAD=0.
Nothing found and no download possible: HelperWeightsNotFoundError names the model, where it looked, what a
complete folder holds and the command that fetches it.

    python -m weights.helper_models [safety_checker] [captioner]   # fetch them ahead of time (a Cog build step)
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from weights import base_models
from weights.base_models import WeightsNotFoundError, download_command, downloads_allowed, fetch_snapshot

log = logging.getLogger(__name__)

ENV_HELPER_WEIGHTS_DIR = "FLUX_HELPER_WEIGHTS_DIR"


@dataclass(frozen=True)
class HelperModel:
    key: str  # short name used in logs and on the command line
    purpose: str  # what it is for, in error messages
    hf_repo: str
    folder: str  # sub-folder name under FLUX_HELPER_WEIGHTS_DIR and weights/models/
    allow_patterns: tuple[str, ...]  # what a download fetches
    # A complete folder has, for each group, at least one file matching one of its globs. Groups of
    # alternatives because transformers has saved processor settings under two names over the years.
    required: tuple[tuple[str, ...], ...]


# ViT-base (86M parameters, 343 MB in fp32) fine-tuned to two labels, normal / nsfw; Apache-2.0; ships
# model.safetensors next to a pytorch_model.bin that is never fetched.
SAFETY_CHECKER = HelperModel(
    key="safety_checker",
    purpose="the NSFW safety checker (disable_safety_checker=true skips it)",
    hf_repo="Falconsai/nsfw_image_detection",
    folder="nsfw_image_detection",
    allow_patterns=("config.json", "preprocessor_config.json", "model.safetensors"),
    required=(("config.json",), ("preprocessor_config.json",), ("model.safetensors",)),
)

# Florence-2-large (0.77B parameters, about 1.5 GB in fp32) in the native transformers port (no remote code);
# MIT licence; its <MORE_DETAILED_CAPTION> task writes paragraph captions of the kind FLUX prompts use.
CAPTIONER = HelperModel(
    key="captioner",
    purpose="the autocaption model (autocaption=false skips it)",
    hf_repo="florence-community/Florence-2-large",
    folder="Florence-2-large",
    allow_patterns=("*.json", "*.safetensors", "*.txt"),
    required=(
        ("config.json",),
        ("*.safetensors",),
        ("tokenizer.json", "vocab.json"),
        ("processor_config.json", "preprocessor_config.json"),
    ),
)

HELPER_MODELS = {model.key: model for model in (SAFETY_CHECKER, CAPTIONER)}


class HelperWeightsNotFoundError(WeightsNotFoundError):
    """A helper model's weights are neither on disk nor downloadable."""


def is_complete(model: HelperModel, folder: Path) -> bool:
    return folder.is_dir() and all(
        any(any(folder.glob(pattern)) for pattern in group) for group in model.required
    )


def candidate_folders(model: HelperModel) -> list[Path]:
    found = []
    explicit = os.environ.get(ENV_HELPER_WEIGHTS_DIR)
    if explicit:
        found.append(Path(explicit).expanduser() / model.folder)
    found.append(project_folder(model))
    return found


def project_folder(model: HelperModel) -> Path:
    # Read at call time so that moving the project folder (tests, operators) moves base and helper weights alike.
    return base_models.PROJECT_MODELS_DIR / model.folder


def resolve_helper_weights(model: HelperModel, folder: Path | None = None) -> Path:
    """A local folder with the model's weights; `folder` (when given) is used as it is, else the search order."""
    if folder is not None:
        folder = Path(folder).expanduser()
        if is_complete(model, folder):
            return folder
        raise _not_found(model, [folder], "the folder given is incomplete")
    candidates = candidate_folders(model)
    for candidate in candidates:
        if is_complete(model, candidate):
            log.info("%s weights: %s", model.key, candidate)
            return candidate
    if not downloads_allowed():
        raise _not_found(model, candidates, f"downloads are off ({base_models.ENV_ALLOW_DOWNLOAD}=0)")
    target = project_folder(model)
    try:
        log.info("downloading %s to %s (%s)", model.hf_repo, target, ", ".join(model.allow_patterns))
        fetch_snapshot(model.hf_repo, target, list(model.allow_patterns))
    except Exception as error:  # offline, rate-limited, disk full: all end in the same advice
        raise _not_found(model, candidates, f"download failed: {error}") from error
    if not is_complete(model, target):
        raise _not_found(model, candidates, f"{model.hf_repo} downloaded to {target} but files are missing")
    return target


def _not_found(model: HelperModel, looked: list[Path], why: str) -> HelperWeightsNotFoundError:
    places = "; ".join(str(p) for p in looked)
    needs = ", ".join(" or ".join(group) for group in model.required)
    command = download_command(model.hf_repo, project_folder(model), list(model.allow_patterns))
    return HelperWeightsNotFoundError(
        f"weights of {model.purpose} ({model.hf_repo}) not found. Looked in: {places} (a complete folder has"
        f" {needs}); {why}. Fetch them with: {command}, or `python -m weights.helper_models {model.key}`, or"
        f" point {ENV_HELPER_WEIGHTS_DIR} at a folder holding {model.folder}/."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch the helper models' weights into weights/models/.")
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help=f"{', '.join(HELPER_MODELS)}; all when none"
    )
    args = parser.parse_args(argv)
    unknown = [key for key in args.models if key not in HELPER_MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(HELPER_MODELS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for key in args.models or HELPER_MODELS:
        try:
            print(resolve_helper_weights(HELPER_MODELS[key]))
        except HelperWeightsNotFoundError as error:
            raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
