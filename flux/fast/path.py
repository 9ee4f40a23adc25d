"""FastPath: what load_flux sets up for go_fast, and the per-request switch generate() uses.

Setup (once, at load time): detect the device; where fp8 runs, install FastTransformer on each
variant's transformer, compile its blocks and run a warm-up forward at the common sizes, so the first
request does not pay the compile. Elsewhere nothing is installed and go_fast requests run the standard
path, with one log line saying why.

    FLUX_FAST=auto (default) | nocompile (fp8 without torch.compile) | off (never set up; saves memory)
"""

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from flux.fast.capability import FastSupport, detect_fast_support
from flux.fast.compile_cache import (
    compile_cache_file,
    inductor_misses,
    load_compile_cache,
    save_compile_cache,
)
from flux.fast.targets import planned_fp8_bytes
from flux.fast.transformer import FastTransformer

log = logging.getLogger(__name__)

ENV_FAST = "FLUX_FAST"
FAST_MODES = ("auto", "nocompile", "off")
# Warm-up shapes (height, width, batch). The blocks compile with dynamic sizes from the start, but Dynamo
# specializes size 1: batch 1 and batch >= 2 are the two graphs per block class, so setup traces both and
# every later size, batch and prompt length reuses them (compiled.py).
WARMUP_SHAPES = ((1024, 1024, 1), (768, 1344, 2))
# Left free after the fp8 copies: activations of a 1024x1024 batch, the VAE decode, LoRA fusing.
HEADROOM_BYTES = 10 * 2**30


@dataclass
class FastPath:
    support: FastSupport
    # FastTransformer (fp8 copies, compiled) or, under the 8bit memory plan, flux.eight_bit.Fp8Storage
    transformers: dict[str, FastTransformer] = field(default_factory=dict)
    setup_seconds: float = 0.0
    _fallback_logged: bool = False

    @contextmanager
    def session(self, variant: str, go_fast: bool) -> Iterator[bool]:
        """Inside: the variant's transformer runs fp8 + compiled if go_fast and supported. Yields whether it does."""
        fast = self.transformers.get(variant) if go_fast else None
        if go_fast and fast is None:
            self._log_fallback(variant)
        with fast.active(True) if fast is not None else nullcontext():
            yield fast is not None

    def refresh(self, variant: str) -> int:
        """Re-quantize the fp8 copies a LoRA change touched (also done lazily by the next fast request)."""
        fast = self.transformers.get(variant)
        return fast.refresh_stale() if fast is not None else 0

    def _log_fallback(self, variant: str) -> None:
        if self._fallback_logged:
            return
        self._fallback_logged = True
        why = self.support.reason if not self.support.available else f"not set up for {variant} ({ENV_FAST})"
        log.info("go_fast: using the standard bf16 path instead of fp8 + compile: %s", why)


def fast_mode() -> str:
    mode = os.environ.get(ENV_FAST, "auto").strip().lower() or "auto"
    if mode not in FAST_MODES:
        raise ValueError(f"{ENV_FAST}={mode!r}: allowed {', '.join(FAST_MODES)}")
    return mode


def setup_fast(
    transformers: dict[str, torch.nn.Module],
    device: torch.device,
    max_sequence_lengths: dict[str, int] | None = None,
    mode: str | None = None,
    warmup_shapes: tuple[tuple[int, int, int], ...] = WARMUP_SHAPES,
    compile_options: dict | None = None,
) -> FastPath:
    """Detect support and, where fp8 runs, install + compile + warm up each transformer.

    compile_options: extra torch.compile arguments (a benchmark's mode, a test's counting backend).
    """
    mode = mode or fast_mode()
    support = detect_fast_support(device)
    if mode == "off":
        support = FastSupport(False, f"switched off ({ENV_FAST}=off or load_flux(fast=False))")
    if not support.available:
        log.info("go_fast not set up: %s", support.reason)
        return FastPath(support)
    started = time.perf_counter()
    path = FastPath(support)
    # Inductor's artifacts only: a test's or a benchmark's own backend has nothing worth saving.
    inductor = (compile_options or {}).get("backend", "inductor") == "inductor"
    cache_file = compile_cache_file(device) if mode == "auto" and inductor else None
    loaded = load_compile_cache(cache_file)
    misses = inductor_misses()
    for name, transformer in transformers.items():
        if not fits_in_memory(transformer, device, name):
            continue  # go_fast requests on this variant run bf16; the fallback line says so
        fast = FastTransformer(transformer)
        if mode == "auto":
            fast.compile_blocks(**(compile_options or {}))
            seq = (max_sequence_lengths or {}).get(name, 512)
            for height, width, batch in warmup_shapes:
                t = time.perf_counter()
                with fast.active(True):
                    warm_up(transformer, height, width, batch, seq)
                if device.type == "cuda":  # the timing below is the GPU's, not the launch's
                    torch.cuda.synchronize(device)
                log.info(
                    "go_fast warm-up %s %dx%d x%d: %.1f s",
                    name,
                    width,
                    height,
                    batch,
                    time.perf_counter() - t,
                )
        path.transformers[name] = fast
    if not loaded or inductor_misses() > misses:  # first boot, or the saved file no longer matched
        save_compile_cache(cache_file)
    path.setup_seconds = time.perf_counter() - started
    log.info("go_fast ready (%s, %s) in %.1f s", support.reason, mode, path.setup_seconds)
    return path


def fp8_copy_bytes(transformer: torch.nn.Module) -> int:
    """What FastTransformer will allocate for `transformer`: the same targets, counted (targets.py)."""
    return planned_fp8_bytes(transformer)


def fits_in_memory(transformer: torch.nn.Module, device: torch.device, name: str) -> bool:
    """Refuse to add fp8 copies that would leave the GPU without room to serve: a worker that runs out of
    memory at setup leaves the server unhealthy for good. Both variants in bf16 plus fp8 copies and the
    text encoders take ~75 GB; with the 10 GB of headroom that is more than an 80 GB card has, so there
    the second variant stays bf16-only."""
    needed = fp8_copy_bytes(transformer) + HEADROOM_BYTES
    free = torch.cuda.mem_get_info(device)[0]
    if free >= needed:
        return True
    log.warning(
        "go_fast: not set up for %s: its fp8 copies need %.1f GB with headroom, %.1f GB of GPU memory is free",
        name,
        needed / 2**30,
        free / 2**30,
    )
    return False


@torch.inference_mode()
def warm_up(transformer: torch.nn.Module, height: int, width: int, batch: int, seq_len: int) -> None:
    """One forward on dummy inputs of the shapes a request of this size produces (values do not matter)."""
    config = transformer.config
    param = next(transformer.parameters())
    like = dict(device=param.device, dtype=param.dtype)
    tokens = (height // 16) * (width // 16)  # 8x VAE, then 2x2 patches
    kwargs = dict(
        hidden_states=torch.randn(batch, tokens, config.in_channels, **like),
        encoder_hidden_states=torch.randn(batch, seq_len, config.joint_attention_dim, **like),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, **like),
        timestep=torch.full((batch,), 0.5, **like),
        img_ids=torch.zeros(tokens, 3, **like),
        txt_ids=torch.zeros(seq_len, 3, **like),
        return_dict=False,
    )
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5, **like)
    transformer(**kwargs)
