"""Cog adapter for LoRA training on FLUX.1 dev: declare the inputs, call training/, return the weights tar.

Input names, defaults and ranges are those of the public FLUX.1 LoRA trainer (replicate/flux-fine-tuner),
in its order, so existing users send the same requests; `seed` and diff_output_preservation_* (off by
default) are additions. `cog build` reads the Input(...) declarations as text, so they hold only
literals; tests/test_cog_schema.py checks them against training.config. training.config checks every
rule (the Cog server does not without a built schema); the README lists where behaviour differs from
the public trainer and why.
"""

import logging
import shutil
import sys
import tempfile
from pathlib import Path as LocalPath

from cog import BaseModel, Input, Path, Secret

from errors import UserInputError
from training.config import build_training_config
from training.job import run_training
from training.pretrained import check_pretrained_reference, package_pretrained_lora
from training.previews import preview_settings_from_env
from training.tracking import build_wandb_settings

log = logging.getLogger("train")


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path | None = Input(
        description="A zip of training images (jpg, png, webp, ...); 10 or more work best. A caption per image can come as a same-named .txt (my-photo.jpg: my-photo.txt); `[trigger]` in a caption becomes the trigger word. Images without one are captioned by autocaption, or with the trigger word alone when autocaption is off.",
        default=None,
    ),
    trigger_word: str = Input(
        description="A word that is not a real word (like TOK, or CYBRPNK for a style) that stands for what you train; added to every caption that lacks it. Use it in prompts to bring the LoRA in.",
        default="TOK",
    ),
    autocaption: bool = Input(
        description="Caption images that have no .txt with a vision-language model (Florence-2); images with a .txt keep it. Off: such images are captioned with the trigger word alone.",
        default=True,
    ),
    autocaption_prefix: str | None = Input(
        description="Text put before every automatic caption, e.g. 'a photo of TOK, '.",
        default=None,
    ),
    autocaption_suffix: str | None = Input(
        description="Text put after every automatic caption, e.g. ' in the style of TOK'.",
        default=None,
    ),
    steps: int = Input(
        description="Training steps (3-6000); 500-4000 is typical.",
        default=1000,
        ge=3,
        le=6000,
    ),
    learning_rate: float = Input(
        description="Learning rate; 4e-4 suits the AdamW optimizers. lion: about 1e-4. prodigy: a multiplier of its own step size (below 0.1 means 1.0).",
        default=0.0004,
    ),
    batch_size: int = Input(
        description="Images per step (1-32); 1 is usual. A step's images share a size bucket.",
        default=1,
        ge=1,
        le=32,
    ),
    resolution: str = Input(
        description="Comma-separated training resolutions (64-2048, usually 512-1024); each image is trained at every one it is large enough for, never upscaled.",
        default="512,768,1024",
    ),
    lora_rank: int = Input(
        description="LoRA rank (1-128); alpha = rank. Higher ranks learn more detail, train slower and make larger files; caption quality matters more for them.",
        default=16,
        ge=1,
        le=128,
    ),
    caption_dropout_rate: float = Input(
        description="Share of steps trained with an empty caption (0-1); 0.05 is usual. Higher values help a style generalise.",
        default=0.05,
        ge=0,
        le=1,
    ),
    optimizer: str = Input(
        description="Optimizer: adamw8bit, adamw, adam8bit, adam, lion8bit, lion, adagrad, adafactor or prodigy. The 8-bit ones need CUDA and fall back to their 32-bit version (logged) elsewhere.",
        default="adamw8bit",
    ),
    cache_latents_to_disk: bool = Input(
        description="Keep the pre-computed latents and text embeddings on disk instead of in memory (for many images).",
        default=False,
    ),
    layers_to_optimize_regex: str | None = Input(
        description="Train only the layers whose name matches this regex, e.g. 'transformer.single_transformer_blocks.(7|12|16|20).proj_out' (fast, good likeness). Empty: all block linears.",
        default=None,
    ),
    gradient_checkpointing: bool = Input(
        description="Trade speed for memory; switched on by itself when the GPU has too little memory for the step without it.",
        default=False,
    ),
    hf_repo_id: str | None = Input(
        description="Hugging Face repo to push the LoRA to, like 'your-name/my-flux-lora' (needs hf_token); created as a public repo if it does not exist.",
        default=None,
    ),
    hf_token: Secret | None = Input(
        description="Hugging Face token with write access, for hf_repo_id; read access is enough for a private skip_training_and_use_pretrained_hf_lora_url.",
        default=None,
    ),
    wandb_api_key: Secret | None = Input(
        description="Weights & Biases API key, to log the training (loss, learning rate, samples, the LoRA) to W&B.",
        default=None,
    ),
    wandb_project: str = Input(
        description="Weights & Biases project; with wandb_api_key.",
        default="flux_train_replicate",
    ),
    wandb_run: str | None = Input(
        description="Weights & Biases run name; with wandb_api_key. Empty: W&B picks one.",
        default=None,
    ),
    wandb_entity: str | None = Input(
        description="Weights & Biases entity (user or team); with wandb_api_key. Empty: the key's default.",
        default=None,
    ),
    wandb_sample_interval: int = Input(
        description="Every this many steps, sample images from wandb_sample_prompts are logged to W&B (with the EMA weights that will be saved).",
        default=100,
        ge=1,
    ),
    wandb_sample_prompts: str | None = Input(
        description="Prompts for the W&B sample images, one per line (at most 10); with wandb_api_key.",
        default=None,
    ),
    wandb_save_interval: int = Input(
        description="Every this many steps, the LoRA so far is saved to W&B; with wandb_api_key.",
        default=100,
        ge=1,
    ),
    skip_training_and_use_pretrained_hf_lora_url: str | None = Input(
        description="Skip training and make the output from a LoRA already on Hugging Face, e.g. https://huggingface.co/fofr/flux-80s-cyberpunk/resolve/main/lora.safetensors; it is checked and converted like any LoRA predict accepts. No input_images needed.",
        default=None,
    ),
    seed: int | None = Input(
        description="Random seed (0-4294967295); empty draws one (saved in config.json).",
        default=None,
    ),
    diff_output_preservation_class: str | None = Input(
        description="A word for what the trigger word stands for (e.g. 'person', 'dog', 'shape'; several, comma-separated, take turns from step to step). With it, each step also trains the LoRA to draw what the base model draws for the caption with this word in place of the trigger word, so prompts without the trigger word stay as they were (ai-toolkit's differential output preservation; about twice the time per step). Empty: off.",
        default=None,
    ),
    diff_output_preservation_multiplier: float = Input(
        description="Weight of the preservation term against the training loss (0-10; 0 turns it off).",
        default=1.0,
        ge=0,
        le=10,
    ),
    shift_timesteps_by_resolution: bool = Input(
        description="Draw noise levels shifted towards more noise for larger images, as the dev scheduler shifts its steps (more composition and large shapes, less fine detail). Off: the public trainer's sampling, the same at every size.",
        default=False,
    ),
    continue_from_lora: str | None = Input(
        description="Continue training this LoRA instead of a fresh one: a tar from this trainer, a Hugging Face repo or file, any URL or source lora_weights takes. Its rank and layers are used (not lora_rank / layers_to_optimize_regex); steps counts the new steps. A tar written with save_training_state continues exactly.",
        default=None,
    ),
    save_training_state: bool = Input(
        description="Also put the training's state (optimizer, moving average, step, random state) in the tar, so continue_from_lora with it goes on exactly as one longer training; about 8x the LoRA's size (1.4 GB at rank 16).",
        default=False,
    ),
) -> TrainingOutput:
    # Library logs (progress, fallbacks, warnings) go to stdout, which Cog returns as the training's logs.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    token = _secret(hf_token)
    # Cog reads the returned tar after train() returns, so it cannot be deleted here; one fixed folder,
    # emptied when the next training starts, keeps at most one finished tar on disk.
    out_dir = LocalPath(tempfile.gettempdir()) / "flux-lora-training-output"

    if skip_training_and_use_pretrained_hf_lora_url is not None and skip_training_and_use_pretrained_hf_lora_url.strip():
        reference = check_pretrained_reference(skip_training_and_use_pretrained_hf_lora_url)
        if input_images is not None:
            log.warning("skip_training_and_use_pretrained_hf_lora_url given: input_images is not used")
        if hf_repo_id:
            log.warning("skip_training_and_use_pretrained_hf_lora_url given: nothing is pushed to hf_repo_id")
        _empty(out_dir)
        return TrainingOutput(weights=Path(package_pretrained_lora(reference, out_dir, hf_token=token)))

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
        diff_output_preservation_class=diff_output_preservation_class,
        diff_output_preservation_multiplier=diff_output_preservation_multiplier,
        shift_timesteps_by_resolution=shift_timesteps_by_resolution,
        continue_from_lora=continue_from_lora,
        save_training_state=save_training_state,
        has_hf_token=bool(token),
    )
    wandb = build_wandb_settings(
        project=wandb_project,
        run=wandb_run,
        entity=wandb_entity,
        sample_interval=wandb_sample_interval,
        sample_prompts=wandb_sample_prompts,
        save_interval=wandb_save_interval,
    )
    if input_images is None:
        raise UserInputError(
            "input_images", "(empty)", "a zip of training images (or skip_training_and_use_pretrained_hf_lora_url)"
        )
    _empty(out_dir)
    tar = run_training(
        config,
        LocalPath(input_images),
        out_dir,
        hf_token=token,
        previews=preview_settings_from_env(),
        wandb_api_key=_secret(wandb_api_key),
        wandb=wandb,
        continue_from_lora=continue_from_lora,
    )
    return TrainingOutput(weights=Path(tar))


def _secret(value: Secret | None) -> str | None:
    text = value.get_secret_value() if value is not None else None
    return text.strip() if text and text.strip() else None


def _empty(folder: LocalPath) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
