"""Where the FLUX.1 base weights come from.

Order, per variant:
1. FLUX_WEIGHTS_DIR, an explicit folder holding `FLUX.1-schnell/` and/or `FLUX.1-dev/` (diffusers layout);
2. the project's own folder, weights/models/ next to this file (what a Cog image ships or caches);
3. a download from the Hugging Face Hub into that project folder (HF_TOKEN for the gated dev repo),
   resumable, fetching only the files the diffusers pipeline loads.
Nothing found and no download possible: WeightsNotFoundError says what is missing, where it looked and the
command that fetches it.
"""

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_MODELS_DIR = Path(__file__).resolve().parent / "models"
ENV_WEIGHTS_DIR = "FLUX_WEIGHTS_DIR"
ENV_ALLOW_DOWNLOAD = "FLUX_ALLOW_DOWNLOAD"  # "0" turns the Hub download off (air-gapped operators, tests)

# The diffusers-layout files a FluxPipeline loads; the repos also hold single-file BFL checkpoints
# (flux1-dev.safetensors, ae.safetensors: another 33 GB) that this container never reads.
PIPELINE_FILES = [
    "model_index.json",
    "scheduler/*.json",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "text_encoder_2/*.json",
    "text_encoder_2/*.safetensors",
    "tokenizer/*",
    "tokenizer_2/*",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
]
REQUIRED_SUBFOLDERS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)


class WeightsNotFoundError(RuntimeError):
    """The base weights are neither on disk nor downloadable."""


def is_complete(folder: Path) -> bool:
    """A diffusers-layout FLUX folder with every component the pipeline needs."""
    return (folder / "model_index.json").is_file() and all(
        (folder / sub).is_dir() for sub in REQUIRED_SUBFOLDERS
    )


def candidate_folders(variant_folder: str) -> list[Path]:
    found = []
    explicit = os.environ.get(ENV_WEIGHTS_DIR)
    if explicit:
        found.append(Path(explicit).expanduser() / variant_folder)
    found.append(PROJECT_MODELS_DIR / variant_folder)
    return found


def resolve_base_weights(variant_folder: str, hf_repo: str, gated: bool) -> Path:
    """A local folder with the variant's diffusers-layout weights, downloading them if allowed."""
    candidates = candidate_folders(variant_folder)
    for folder in candidates:
        if is_complete(folder):
            log.info("base weights for %s: %s", variant_folder, folder)
            return folder
    target = PROJECT_MODELS_DIR / variant_folder
    if not downloads_allowed():
        raise _not_found(
            variant_folder, hf_repo, gated, candidates, f"downloads are off ({ENV_ALLOW_DOWNLOAD}=0)"
        )
    try:
        return download_base_weights(hf_repo, target)
    except Exception as error:  # offline, gated without token, disk full: all end in the same advice
        raise _not_found(variant_folder, hf_repo, gated, candidates, f"download failed: {error}") from error


def download_base_weights(hf_repo: str, target: Path) -> Path:
    """Fetch the pipeline's files from the Hub; interrupted downloads resume on the next call."""
    log.info("downloading %s to %s (only the diffusers pipeline files)", hf_repo, target)
    fetch_snapshot(hf_repo, target, PIPELINE_FILES)
    if not is_complete(target):
        raise WeightsNotFoundError(f"{hf_repo} downloaded to {target} but components are missing")
    return target


def downloads_allowed() -> bool:
    return os.environ.get(ENV_ALLOW_DOWNLOAD, "1") != "0"


def fetch_snapshot(hf_repo: str, target: Path, patterns: list[str]) -> None:
    """The files of `hf_repo` matching `patterns` into `target`; shared with the helper models' weights."""
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id=hf_repo,
        local_dir=target,
        allow_patterns=patterns,
        token=os.environ.get("HF_TOKEN") or None,
    )


def download_command(hf_repo: str, target: Path, patterns: list[str] = PIPELINE_FILES) -> str:
    includes = " ".join(f"--include '{p}'" for p in patterns)
    return f"hf download {hf_repo} --local-dir {target} {includes}"


def _not_found(
    variant_folder: str, hf_repo: str, gated: bool, looked: list[Path], why: str
) -> WeightsNotFoundError:
    places = "; ".join(str(p) for p in looked)
    token_hint = " (a gated repo: accept its license on huggingface.co and set HF_TOKEN)" if gated else ""
    return WeightsNotFoundError(
        f"FLUX weights for {variant_folder} not found. Looked in: {places} (a complete diffusers-layout folder"
        f" has model_index.json and {', '.join(REQUIRED_SUBFOLDERS)}); {why}. Fetch them with:"
        f" {download_command(hf_repo, PROJECT_MODELS_DIR / variant_folder)}{token_hint}, or point"
        f" {ENV_WEIGHTS_DIR} at a folder holding {variant_folder}/."
    )
