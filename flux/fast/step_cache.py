"""Step caching with cache-dit (DBCache): skip the transformer blocks on steps where they would change little.

On each denoising step the first block always runs; when its output moved less than a threshold since the
last fully computed step, the other blocks are skipped and the residual they added then is added again.
A request opts in with a level (`step_cache`); "off" is the default, so every public call keeps its meaning.

Per request, and only for its duration: cache-dit is switched on for the variant's transformer with a cache
sized to the request's own step count (img2img runs fewer steps than it asks for), and switched off after,
with every attribute cache-dit set on the transformer or its blocks taken away again. So a cache never
outlives the request that built it (a LoRA switch cannot reuse one built under other weights) and the next
request without caching runs exactly the code of a server that never cached.

The blocks are called as modules, so go_fast's compiled blocks and fp8 copies run inside a cached request too.
"""

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from errors import UserInputError
from flux.fast.targets import repeated_blocks

log = logging.getLogger(__name__)

STEP_CACHE_OFF = "off"
# The first FIRST_BLOCKS blocks always run: the change of their output decides whether a step is cached.
FIRST_BLOCKS = 1


@dataclass(frozen=True)
class CacheLevel:
    """One named level: how readily a step is served from the cache."""

    threshold: float  # relative change of the first block's output under which the step is cached
    warmup_share: float  # the first steps always run, this share of the request's steps (at least one)
    max_in_a_row: int  # at most this many cached steps one after the other (-1: no limit)


# Chosen on flux-mini (bench/step_cache_quality.py, figures in README and bench/RESULTS.md).
LEVELS: dict[str, CacheLevel] = {
    "light": CacheLevel(threshold=0.08, warmup_share=4 / 28, max_in_a_row=-1),
    "medium": CacheLevel(threshold=0.16, warmup_share=4 / 28, max_in_a_row=3),
    "strong": CacheLevel(threshold=0.28, warmup_share=3 / 28, max_in_a_row=5),
}
STEP_CACHE_LEVELS = (STEP_CACHE_OFF, *LEVELS)


def check_step_cache(value: object) -> str:
    allowed = (STEP_CACHE_OFF, *LEVELS)  # read now: a benchmark may add candidate levels
    if value not in allowed:
        raise UserInputError("step_cache", value, f"allowed: {', '.join(allowed)}")
    return value


def warmup_steps(level: CacheLevel, steps: int) -> int:
    return max(1, math.ceil(level.warmup_share * steps - 1e-9))


def cache_config(level_name: str, steps: int):
    """cache-dit's configuration for `steps` transformer calls at the named level."""
    from cache_dit import DBCacheConfig

    level = LEVELS[level_name]
    return DBCacheConfig(
        Fn_compute_blocks=FIRST_BLOCKS,
        Bn_compute_blocks=0,
        residual_diff_threshold=level.threshold,
        max_warmup_steps=warmup_steps(level, steps),
        max_continuous_cached_steps=level.max_in_a_row,
        num_inference_steps=steps,
    )


@dataclass
class StepCacheReport:
    """What one request's caching skipped: filled in when its denoising loop has run."""

    level: str
    steps: int
    blocks: int  # transformer blocks per step (double + single)
    cached_steps: int = 0

    @property
    def block_forwards(self) -> int:
        """Block forwards per image that ran: all blocks on computed steps, the first ones on cached steps."""
        return self.steps * self.blocks - self.cached_steps * (self.blocks - FIRST_BLOCKS)

    @property
    def skipped_share(self) -> float:
        return 1 - self.block_forwards / (self.steps * self.blocks)


def prepare_step_cache() -> None:
    """Import cache-dit now (setup), not on the first request that asks for it (it takes seconds)."""
    _cache_dit()


def _cache_dit():
    # cache-dit prints its configuration and a statistics table on every switch (its level is read
    # once, at its import); the request's log gets one line from here instead. An operator's setting wins.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


@contextmanager
def step_caching(transformer: torch.nn.Module, level: str, steps: int) -> Iterator[StepCacheReport | None]:
    """Inside: `transformer` serves steps from the cache at `level` for one run of `steps` transformer
    calls. Yields the report (None when off), complete once the block exits."""
    if level == STEP_CACHE_OFF:
        yield None
        return
    cache_dit = _cache_dit()
    blocks = repeated_blocks(transformer)
    report = StepCacheReport(level=level, steps=steps, blocks=len(blocks))
    saved = _InstanceAttributes([transformer, *blocks])
    try:
        cache_dit.enable_cache(transformer, cache_config=cache_config(level, steps))
        yield report
        report.cached_steps = sum(len(stats.cached_steps) for stats in cache_dit.summary(transformer))
        log.info(
            "step_cache=%s: %d of %d steps served from the cache, %d of %d block forwards run (%.0f %% skipped)",
            level,
            report.cached_steps,
            steps,
            report.block_forwards,
            steps * report.blocks,
            100 * report.skipped_share,
        )
    finally:
        if getattr(transformer, "_is_cached", False):
            cache_dit.disable_cache(transformer)
        saved.restore()


class _InstanceAttributes:
    """The instance attributes of some modules, put back exactly: cache-dit's own release leaves its
    patched forward, a hook registry and markers on the transformer."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.saved = [(module, dict(vars(module)), dict(module._modules)) for module in modules]

    def restore(self) -> None:
        for module, before, children in self.saved:
            for now, then in ((vars(module), before), (module._modules, children)):
                for name in [name for name in now if name not in then]:
                    del now[name]
                for name, value in then.items():
                    if now.get(name) is not value:
                        now[name] = value
