"""Tiny helper models for local runs and tests: the real classes at toy size, saved as the real repos are.

    python -m toys.tiny_helpers [OUTPUT_DIR] [--if-missing]   # default weights/tiny; writes one folder per helper

Writes OUTPUT_DIR/nsfw_image_detection/ (ViT image classifier, labels normal/nsfw) and
OUTPUT_DIR/Florence-2-large/ (Florence-2 with its processor and a locally trained byte-level BPE tokenizer).
Point FLUX_HELPER_WEIGHTS_DIR at OUTPUT_DIR and flux.safety / training.autocaption load them through the same
path as the real weights. Random weights: the classifier's scores and the captions are meaningless.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from toys.tiny import DEFAULT_DIR
from weights.helper_models import CAPTIONER, SAFETY_CHECKER, is_complete

log = logging.getLogger(__name__)

CLASSIFIER_SIZE = 32  # pixels; the real one takes 224
CAPTIONER_SIZE = 64  # pixels; the real one takes 768. 64 / 32 (the DaViT stride) = a 2x2 feature map
CAPTIONER_DIM = 16
CORPUS = [
    "describe with a paragraph what is shown in the image",
    "the image shows a cat sitting on a mat next to a red ball",
    "a woman in a blue dress stands in a garden, soft light, bokeh",
    "a close-up photo of a dog with brown fur looking at the camera",
]
# The parse tasks the real Florence-2 processor configures; a caption only needs "pure_text".
FLORENCE_PARSE_TASKS = (
    "ocr",
    "phrase_grounding",
    "pure_text",
    "description_with_bboxes",
    "description_with_polygons",
    "polygons",
    "bboxes",
    "description_with_bboxes_or_polygons",
)


def build_tiny_safety_checker(output_dir: Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    target = Path(output_dir) / SAFETY_CHECKER.folder
    torch.manual_seed(seed)
    model = ViTForImageClassification(
        ViTConfig(
            image_size=CLASSIFIER_SIZE,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            id2label={0: "normal", 1: "nsfw"},  # the real model's labels, in its order
            label2id={"normal": 0, "nsfw": 1},
        )
    )
    # Random weights would flag a random share of demo images; a bias towards "normal" makes the tiny
    # checker pass everything at the default threshold. Tests force decisions with the threshold instead.
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([4.0, -4.0]))
    processor = ViTImageProcessor(size={"height": CLASSIFIER_SIZE, "width": CLASSIFIER_SIZE})
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    log.info("wrote tiny safety checker to %s", target)
    return target


def _florence_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # BART's special-token ids (0-3), then the image placeholder the processor repeats per image feature.
    special = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=128,
    )


def build_tiny_captioner(output_dir: Path, seed: int = 0) -> Path:
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    target = Path(output_dir) / CAPTIONER.folder
    tokenizer = _florence_tokenizer()
    feature_side = CAPTIONER_SIZE // 32
    image_processor = CLIPImageProcessor(
        size={"height": CAPTIONER_SIZE, "width": CAPTIONER_SIZE},
        crop_size={"height": CAPTIONER_SIZE, "width": CAPTIONER_SIZE},
        do_center_crop=False,
        image_seq_length=1 + feature_side * feature_side,  # one pooled token + the feature map
    )
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config={task: {} for task in FLORENCE_PARSE_TASKS},
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=CAPTIONER_DIM,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=1024,  # as the real one: room for MAX_NEW_TOKENS and more
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # BART starts decoding from </s>
    )
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[8, 8, 16, 16],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=2,
        projection_dim=CAPTIONER_DIM,  # image features enter the text encoder
        drop_path_rate=0.0,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(
        Florence2Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            image_token_id=tokenizer.image_token_id,
        )
    )
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    log.info("wrote tiny captioner to %s", target)
    return target


def build_tiny_helpers(output_dir: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    build_tiny_safety_checker(output_dir, seed)
    build_tiny_captioner(output_dir, seed)
    return Path(output_dir)


def ensure_tiny_helpers(output_dir: Path = DEFAULT_DIR) -> Path:
    """Build the tiny helpers unless both folders are already complete."""
    output_dir = Path(output_dir)
    if all(is_complete(model, output_dir / model.folder) for model in (SAFETY_CHECKER, CAPTIONER)):
        return output_dir
    return build_tiny_helpers(output_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true", help="do nothing when both helpers exist")
    args = parser.parse_args()
    print(
        ensure_tiny_helpers(args.output_dir)
        if args.if_missing
        else build_tiny_helpers(args.output_dir, args.seed)
    )
