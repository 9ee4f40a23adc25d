"""Cog adapter for LoRA training on FLUX.1 dev: declare the inputs, call lora/, return the weights tar.

Input names, defaults and ranges are those of the public FLUX.1 LoRA trainer, so existing users send
the same requests. training.config checks every rule (the Cog server does not without a built schema).
"""

import logging
import shutil
import sys
import tempfile
from pathlib import Path as LocalPath

from cog import BaseModel, Input, Path, Secret

from training.config import (
    DEFAULTS,
    MAX_BATCH,
    MAX_RANK,
    MAX_STEPS,
    MIN_BATCH,
    MIN_RANK,
    MIN_STEPS,
    OPTIMIZERS,
    build_training_config,
)
from training.job import run_training
from training.previews import preview_settings_from_env


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path = Input(
        description="A zip of training images (jpg, png, webp, ...), optionally with a same-named .txt "
        "caption each; `[trigger]` in a caption becomes the trigger word. Images without a caption are "
        "captioned by autocaption, or with the trigger word alone when autocaption is off."
    ),
    trigger_word: str = Input(
        description="A word that is not a real word (like TOK) that stands for what you train; added to "
        "every caption that lacks it.",
        default=DEFAULTS["trigger_word"],
    ),
    steps: int = Input(
        description=f"Training steps ({MIN_STEPS}-{MAX_STEPS}).",
        default=DEFAULTS["steps"],
        ge=MIN_STEPS,
        le=MAX_STEPS,
    ),
    learning_rate: float = Input(
        description="Learning rate (AdamW: 1e-4 to 4e-4 is typical; prodigy: a multiplier, usually 1.0).",
        default=DEFAULTS["learning_rate"],
    ),
    batch_size: int = Input(
        description=f"Images per step ({MIN_BATCH}-{MAX_BATCH}); one step's images share a size bucket.",
        default=DEFAULTS["batch_size"],
        ge=MIN_BATCH,
        le=MAX_BATCH,
    ),
    resolution: str = Input(
        description="Comma-separated training resolutions (256-1536); each image is trained at every one "
        "it is large enough for, never upscaled.",
        default=DEFAULTS["resolution"],
    ),
    lora_rank: int = Input(
        description=f"LoRA rank ({MIN_RANK}-{MAX_RANK}); alpha = rank. Higher learns more detail, larger file.",
        default=DEFAULTS["lora_rank"],
        ge=MIN_RANK,
        le=MAX_RANK,
    ),
    caption_dropout_rate: float = Input(
        description="Share of steps trained with an empty caption (0-1); helps the LoRA generalise.",
        default=DEFAULTS["caption_dropout_rate"],
        ge=0,
        le=1,
    ),
    optimizer: str = Input(
        description="adamw8bit (8-bit states; falls back to adamw, logged, where bitsandbytes is missing), "
        "adamw, or prodigy (sets its own step size).",
        default=DEFAULTS["optimizer"],
        choices=["adamw8bit", "adamw", "prodigy"],
    ),
    cache_latents_to_disk: bool = Input(
        description="Keep the pre-computed latents and text embeddings on disk instead of in memory "
        "(for large datasets).",
        default=DEFAULTS["cache_latents_to_disk"],
    ),
    layers_to_optimize_regex: str = Input(
        description="Train only the layers whose name matches this regex, e.g. "
        "'transformer.single_transformer_blocks.(7|12|16|20).proj_out'. Empty: all block linears.",
        default=DEFAULTS["layers_to_optimize_regex"],
    ),
    gradient_checkpointing: bool = Input(
        description="Trade speed for memory; switched on by itself when GPU memory is short.",
        default=DEFAULTS["gradient_checkpointing"],
    ),
    autocaption: bool = Input(
        description="Caption images that have no .txt with a vision-language model (Florence-2); images "
        "with a .txt keep it. Off: such images are captioned with the trigger word alone.",
        default=DEFAULTS["autocaption"],
    ),
    autocaption_prefix: str = Input(
        description="Text put before every automatic caption, e.g. 'a photo of TOK,'.",
        default=DEFAULTS["autocaption_prefix"],
    ),
    autocaption_suffix: str = Input(
        description="Text put after every automatic caption, e.g. 'in the style of TOK'.",
        default=DEFAULTS["autocaption_suffix"],
    ),
    seed: int = Input(
        description="Random seed; empty draws one (saved in config.json).", default=DEFAULTS["seed"]
    ),
    hf_repo_id: str = Input(
        description="Hugging Face repo to push the LoRA to, like 'your-name/my-flux-lora' (needs hf_token).",
        default=DEFAULTS["hf_repo_id"],
    ),
    hf_token: Secret = Input(
        description="Hugging Face token with write access, for hf_repo_id.", default=None
    ),
) -> TrainingOutput:
    # Library logs (progress, fallbacks, warnings) go to stdout, which Cog returns as the training's logs.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    token = hf_token.get_secret_value() if hf_token is not None else None
    config = build_training_config(
        trigger_word=trigger_word,
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        resolution=resolution,
        lora_rank=lora_rank,
        caption_dropout_rate=caption_dropout_rate,
        optimizer=optimizer,
        cache_latents_to_disk=cache_latents_to_disk,
        layers_to_optimize_regex=layers_to_optimize_regex,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        hf_repo_id=hf_repo_id,
        autocaption=autocaption,
        autocaption_prefix=autocaption_prefix,
        autocaption_suffix=autocaption_suffix,
        has_hf_token=bool(token),
    )
    # Cog reads the returned tar after train() returns, so it cannot be deleted here; one fixed folder,
    # emptied when the next training starts, keeps at most one finished tar on disk.
    out_dir = LocalPath(tempfile.gettempdir()) / "flux-lora-training-output"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    tar = run_training(
        config, LocalPath(input_images), out_dir, hf_token=token, previews=preview_settings_from_env()
    )
    return TrainingOutput(weights=Path(tar))
