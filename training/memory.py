"""How much accelerator memory a FLUX.1 training step needs, and so whether to checkpoint.

From the peft baseline's training step (../shared/bench/diffusers_baseline.py on the H200,
2026-11-29, ../shared/GPU.md): LoRA rank 16, AdamW, bf16 autocast, batch 1, T5 at 512 tokens, peak
torch.cuda.max_memory_allocated in GiB, the bf16 transformer's weights included:

    512x512, no checkpointing     34 GiB
    1024x1024, no checkpointing   56 GiB
    1024x1024, checkpointing      26 GiB

The weights are 11.9e9 parameters x 2 bytes = 22.2 GiB, so the step itself needs 11.8 GiB at 0.26
megapixels and 33.8 GiB at 1.05: 28 GiB per megapixel plus 4.5 GiB that does not grow with the image
(the 512 text tokens' activations, the LoRA, its gradients and AdamW state). With checkpointing,
3.8 GiB at 1.05 megapixels. (26 GiB leaves no room for the 8.9 GiB T5 the script also builds, so it
cannot have been resident: these are transformer-only figures, as the training loop runs with the
encoders moved off.) Activations grow with the batch, so both terms are counted per sample, which
over-counts the LoRA/optimizer part a little: on the safe side.
"""

from __future__ import annotations

FLUX_WEIGHTS_GIB = 22.2  # not in the step figures below: already on the device when they are compared
STEP_GIB_PER_MEGAPIXEL = 28.0  # (33.8 - 11.8) / (1.049 - 0.262)
STEP_GIB_PER_SAMPLE = 4.5  # 11.8 - 28.0 * 0.262
# max_memory_allocated leaves out the allocator's fragmentation and the CUDA context's own memory.
MARGIN_FACTOR = 1.1
MARGIN_GIB = 1.0
# FLUX.1's width x depth (3072 channels, 19 double blocks counted twice for their two streams, 38
# single): activations scale with it, so smaller transformers (flux-mini) need proportionally less.
FLUX_ACTIVATION_SIZE = 3072 * (2 * 19 + 38)


def activation_scale(config) -> float:
    """This transformer's activations relative to FLUX.1's (a diffusers FluxTransformer2DModel config)."""
    width = config.num_attention_heads * config.attention_head_dim
    return width * (2 * config.num_layers + config.num_single_layers) / FLUX_ACTIVATION_SIZE


def step_memory_gib(megapixels: float, batch_size: int, scale: float = 1.0) -> float:
    """GiB a training step needs without gradient checkpointing, on top of the weights; megapixels
    of the largest sample."""
    return scale * batch_size * (STEP_GIB_PER_SAMPLE + STEP_GIB_PER_MEGAPIXEL * megapixels)


def needs_checkpointing(free_gib: float, megapixels: float, batch_size: int, scale: float = 1.0) -> bool:
    """True when the step without checkpointing (plus margin) would not fit in free_gib, the memory
    left with the weights loaded. Checkpointing costs ~40% more time per step, so only then."""
    needed = MARGIN_FACTOR * step_memory_gib(megapixels, batch_size, scale) + MARGIN_GIB
    return free_gib < needed
