"""A tiny FLUX.1 for local runs and tests: the real classes at toy size, saved in diffusers layout.

    python -m toys.tiny [OUTPUT_DIR] [--if-missing]   # default weights/tiny; writes FLUX.1-schnell/ and FLUX.1-dev/

Random weights: images are noise-like, but every code path (tokenizers, both text encoders, the
transformer with or without the guidance embedding, the 16-channel 8x VAE, both schedulers) is the
one the real weights go through, loaded by the same loader.
"""

import argparse
import logging
from pathlib import Path

import torch

from flux.variants import VARIANTS

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights" / "tiny"
TEXT_DIM = 32  # CLIP hidden size (pooled projection) and T5 d_model (joint attention dim)
CORPUS = [
    "a photo of a cat sitting on a mat",
    "a red circle on a white background",
    "TOK person smiling in a garden, portrait, bokeh",
    "an astronaut riding a horse on the moon, 4k, highly detailed",
    "blue square green triangle yellow star purple hexagon orange",
    "the quick brown fox jumps over the lazy dog 0123456789",
]
# The real schedulers' settings: schnell is a fixed-shift sampler, dev shifts with the image size.
SCHEDULERS = {
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
    "dev": dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
}


def _train_tokenizer(special: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=special[-1]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text tokenizes, byte by byte at worst
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer


def flux_tokenizers(clip_backend, t5_backend):
    """Wrap two `tokenizers` objects as FLUX.1's CLIP and T5 tokenizers (their special tokens and lengths)."""
    from transformers import PreTrainedTokenizerFast

    clip = PreTrainedTokenizerFast(
        tokenizer_object=clip_backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=77,
    )
    t5 = PreTrainedTokenizerFast(
        tokenizer_object=t5_backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )
    return clip, t5


def build_tokenizers():
    return flux_tokenizers(
        _train_tokenizer(["<|startoftext|>", "<|endoftext|>", "<unk>"], 400),
        _train_tokenizer(["<pad>", "</s>", "<unk>"], 400),
    )


def build_shared_components(seed: int = 0):
    """Text encoders and VAE: identical files in both variants, as in the real releases."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = build_tokenizers()
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            projection_dim=TEXT_DIM,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    # 4 blocks = the 8x downsampling of FLUX.1; 16 latent channels; FLUX.1's latent normalisation.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    return dict(tokenizer=clip_tok, tokenizer_2=t5_tok, text_encoder=clip, text_encoder_2=t5, vae=vae)


def build_transformer(guidance_embeds: bool, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 6, 6],
    )


def build_tiny_model(output_dir: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Write FLUX.1-schnell/ and FLUX.1-dev/ under output_dir (same encoders/VAE, own transformers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    output_dir = Path(output_dir)
    shared = build_shared_components(seed)
    for name, spec in VARIANTS.items():
        pipe = FluxPipeline(
            transformer=build_transformer(guidance_embeds=spec.uses_guidance, seed=seed + 1),
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name]),
            **shared,
        )
        pipe.save_pretrained(output_dir / spec.folder, safe_serialization=True)
        log.info("wrote tiny %s to %s", name, output_dir / spec.folder)
    return output_dir


def ensure_tiny_model(output_dir: Path = DEFAULT_DIR) -> Path:
    """Build the tiny model unless both variant folders are already there."""
    from weights.base_models import is_complete

    if all(is_complete(Path(output_dir) / spec.folder) for spec in VARIANTS.values()):
        return Path(output_dir)
    return build_tiny_model(output_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true", help="do nothing when both variants exist")
    args = parser.parse_args()
    print(
        ensure_tiny_model(args.output_dir)
        if args.if_missing
        else build_tiny_model(args.output_dir, args.seed)
    )
