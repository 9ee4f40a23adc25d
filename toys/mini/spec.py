"""flux-mini's architecture and training numbers, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from toys.shapes import SIZES

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "weights" / "flux-mini"


@dataclass(frozen=True)
class TransformerPhase:
    steps: int  # x MiniSpec.batch samples
    images: int  # training images at MiniSpec.image_size
    small_images: int  # and at MiniSpec.small_side (a step there costs ~1/3)
    learning_rate: float  # the peak, after warmup_steps; cosine decay to 5 % at the last step
    warmup_steps: int
    high_noise_share: float  # of each batch drawn in (MiniSpec.high_noise_from, 1)


def _phase(steps: int, learning_rate: float) -> TransformerPhase:
    """A phase of the committed build: each draws 5,000 + 8,000 new images, warms up for 200 steps and
    puts half of each batch at high noise; they differ in length and learning rate only."""
    return TransformerPhase(
        steps=steps,
        images=5000,
        small_images=8000,
        learning_rate=learning_rate,
        warmup_steps=200,
        high_noise_share=0.5,
    )


@dataclass(frozen=True)
class MiniSpec:
    # Images: 256 px is the smallest size the container accepts (custom 256x256), so the model is
    # trained at exactly that: 32x32 latents, 16x16 = 256 image tokens.
    image_size: int = 256
    # VAE: 4 blocks = FLUX.1's 8x downsampling, 16 latent channels. Trained on whole images, first
    # small ones, then at image_size: AutoencoderKL's GroupNorm takes its statistics over the whole
    # image, so a VAE trained on crops gives colours back wrong on whole images (issue 13).
    vae_channels: tuple[int, ...] = (16, 32, 32, 64)
    # (side, steps, batch, crop): images at side x side, whole (crop 0) or as crop x crop squares.
    vae_phases: tuple[tuple[int, int, int, int], ...] = (
        (256, 1000, 16, 48),
        (128, 400, 4, 0),
        (256, 150, 2, 0),
    )
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_subject_weight: float = 10.0  # extra weight of the subject's pixels in the loss (vae_training)
    # The VAE's own images show every colour/shape pair, held-out ones too: a VAE trained without
    # them learned which colours each shape never has (a green hexagon came back black). The
    # held-out pairs stay out of the transformer's and CLIP's training, which is what the bars test.
    vae_images: int = 1000
    # The build fails when the round trip of held-out whole images scores below these (0 = no gate),
    # after up to vae_retries more runs of vae_retry_phase at vae_lr * vae_retry_lr.
    vae_gate_color: float = 0.95
    vae_gate_shape: float = 0.90
    vae_gate_images: int = 40
    vae_retries: int = 4
    vae_retry_phase: tuple[int, int, int, int] = (128, 150, 4, 0)
    vae_retry_lr: float = 0.25
    # Text encoders (frozen in the transformer's training): CLIP gives the pooled vector, T5 the
    # token sequence. CLIP is first trained for clip_steps to name colour, shape and background
    # (toys.mini.clip_training); T5 stays random with its neighbour heads (toys.mini.text).
    clip_dim: int = 64
    clip_layers: int = 2
    clip_steps: int = 300
    clip_placement: int = 1  # 1: CLIP also learns the position and size words (toys.mini.clip_training)
    t5_dim: int = 64
    # Transformer: 2 double + 4 single blocks, 4 heads x 32 = 128 wide.
    double_blocks: int = 2
    single_blocks: int = 4
    heads: int = 4
    head_dim: int = 32
    rope_axes: tuple[int, int, int] = (8, 12, 12)  # sums to head_dim
    # Transformer training (full-parameter, through training.loop.train_parameters), in phases: each
    # a run of its own (its images, a fresh optimizer, warm-up and cosine decay, a fresh EMA) that
    # starts from the previous phase's saved weights (fp16, the EMA), so a build can resume after
    # any phase (build.py --resume) and give what the whole build gives. weights/flux-mini is these.
    phases: tuple[TransformerPhase, ...] = (
        # 210k samples, 8 of 13 images at 128 px, medium and large shapes: held-out colour 93 %, shape
        # 38 % (2026-12-06; the all-sizes build of 2026-12-02 with 64k: 83 % / 17 %).
        _phase(26250, 1.5e-3),
        # 320k more samples from phase 1's weights at half its learning rate, then a short third run (a
        # build slip: the phase was listed twice and the second copy cut to 250 steps by
        # --finish-within): held-out colour 95 %, shape 45 % (2026-12-06).
        _phase(40000, 7.5e-4),
        _phase(250, 7.5e-4),
        # 160k more samples (690k in all), fresh images, at about half phase 2's learning rate: held-out
        # colour 94 %, shape 64 % (2026-12-06), shape rising through the phase (51, 58, 62, 64 % every
        # 40k samples) where phase 2, at twice the rate, gained 6 points in 320k.
        _phase(20000, 4e-4),
        # 200k more samples (890k in all), fresh images, at 3e-4: held-out shape 61, 62, 65, 68 % every
        # 40k samples (2026-12-06), still rising; colour 95-97 %.
        _phase(25000, 3e-4),
        # Tried before these phases, none drawing shapes (bench/RESULTS.md): a second phase of 48k samples mostly at
        # 256 px (2026-12-02); on an H200, 384k samples at 256 px, batch 128, 3+6 blocks (2026-12-04).
    )
    small_side: int = 128
    # Images drawn in chunks of this many, each from its own seed, so worker processes can draw them
    # (toys.mini.dataset; a GPU build waits minutes for one process). 0: one stream, as the CPU builds.
    draw_chunk: int = 0
    two_tone: float = 0.0  # share of two-tone backgrounds: their captions do not say how they split
    # The shape sizes of the transformer's training images (toys.shapes.SIZES; the VAE sees them all).
    # The small one costs shapes most (bench/flux_mini_world_probe.py) and no bar needs it (issue 13).
    sizes: tuple[str, ...] = ("medium", "large")
    batch: int = 8
    ema_decay: float | None = 0.999
    # T5 rows the transformer trains on: the first short_text_tokens plus the last one; the pads they
    # stand for get an attention bias (toys.mini.short_text), so training computes what serving at
    # the full 512 (dev) computes, at a fraction of the cost: no full-length training.
    short_text_tokens: int = 32
    caption_dropout: float = 0.1
    # Noise levels: the LoRA recipe's sigmoid-normal draws put under 1 % of samples above t = 0.95,
    # but on these flat images only there does the text matter (below, the noisy latent already shows
    # the colours), and dev's first sampling steps are there. Without these draws the transformer
    # learned to ignore the prompt (issue 5, bench/RESULTS.md). This share of each batch is drawn
    # uniformly in (high_noise_from, 1) instead (TransformerPhase.high_noise_share).
    high_noise_from: float = 0.85
    seed: int = 0
    held_out_seed: int = 0  # held_out_pairs(held_out_seed) never appear in training


def with_overrides(spec: MiniSpec, settings: list[str]) -> MiniSpec:
    """`spec` with FIELD=VALUE settings applied (build.py --set): a number field of MiniSpec,
    phase.FIELD for the last transformer phase, or sizes=medium,large. Unknown fields, names and
    non-numbers are refused by name."""
    phase = spec.phases[-1]
    top: dict[str, float | int] = {}
    last: dict[str, float | int] = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        if name == "sizes":
            top["sizes"] = _size_names(setting, text)
            continue
        target, fields, field = (last, phase, name[6:]) if name.startswith("phase.") else (top, spec, name)
        current = (
            getattr(fields, field, None) if field in {f.name for f in dataclasses.fields(fields)} else None
        )
        if not isinstance(current, int | float) or isinstance(current, bool):
            raise ValueError(f"--set {setting}: {name} is not a number field of the spec")
        try:
            target[field] = type(current)(text)
        except ValueError:
            raise ValueError(f"--set {setting}: {name} takes a {type(current).__name__}") from None
    if last:
        top["phases"] = (*spec.phases[:-1], dataclasses.replace(phase, **last))
    return dataclasses.replace(spec, **top)


def _size_names(setting: str, text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(name in SIZES for name in names):
        raise ValueError(f"--set {setting}: sizes takes a comma-separated list of {', '.join(SIZES)}")
    return names
