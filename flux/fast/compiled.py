"""Compiled block regions that stay a few graphs for every request size, batch and variant.

Dynamo guards each graph on its inputs' sizes and strides. Compiled as they are, FLUX's blocks make a
graph per (block class, stride layout, warm-up shape): a single block returns two slices of one tensor,
so the first single block sees contiguous inputs and the next 37 strided ones, and schnell (256 text
tokens) and dev (512) differ again. At Dynamo's recompile limit a block silently runs eagerly, or with
fullgraph=True the request fails. Here:

- every tensor entering or leaving a compiled block has standard strides (`dense`): layout never tells
  graphs apart. Leaving, the copy is inside the graph, where inductor can fuse it into the block's last
  elementwise op (not measured on a GPU yet); entering, it is then a no-op except for the first block.
- `dynamic=True` from the first compile: batch, image tokens and text tokens are symbols. Dynamo still
  specializes size 1, so batch 1 and batch >= 2 are two graphs per block class: four in all, shared by
  both variants (same classes, weights are graph inputs) and every size.
- arguments enter by name (`by_name`): diffusers passes them by keyword, cache-dit's cached blocks
  (step_cache) pass the first two by position, and Dynamo would make a graph per calling style.
- the recompile limit is raised anyway (`raise_recompile_limit`): headroom for what a future torch may
  specialize, so a request never falls back to eager or fails on it.
"""

import inspect
from collections.abc import Callable
from functools import cache, partial

import torch

# Dynamo's default is 8 graphs per code object; the four expected here leave room, 64 leaves plenty.
RECOMPILE_LIMIT = 64
DEFAULT_OPTIONS = dict(fullgraph=True, dynamic=True)


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> str:
    """Raise Dynamo's per-function graph limit to at least `limit`; returns the setting's name.

    torch renamed cache_size_limit to recompile_limit (the old name stays as an alias on recent
    versions); set whichever this torch has, so the code runs on 2.11 and 2.13 alike.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < limit:
        setattr(config, name, limit)
    return name


def dense(value):
    """Tensors (also inside tuples, lists, dict values) with standard contiguous strides.

    `.contiguous()` alone is not enough: a tensor whose only odd stride is on a size-1 dimension (a
    batch-1 slice) counts as contiguous and keeps that stride, which Dynamo still guards on; the
    `.view(shape)` after it rewrites the strides without copying.
    """
    if isinstance(value, torch.Tensor):
        return value.contiguous().view(value.shape)
    if isinstance(value, (tuple, list)):
        return type(value)(dense(v) for v in value)
    if isinstance(value, dict):
        return {k: dense(v) for k, v in value.items()}
    return value


def _region(block: torch.nn.Module, *args, **kwargs):
    """What is compiled: one block call with dense outputs. One function for every block, so its graphs
    are cached once per (class, size-1 pattern) rather than per block or per variant."""
    return dense(block._call_impl(*args, **kwargs))


@cache
def _parameter_names(block_class: type) -> tuple[str, ...]:
    return tuple(inspect.signature(block_class.forward).parameters)[1:]  # without self


def by_name(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments all by keyword, so one graph serves callers that pass them either way."""
    if not args:
        return kwargs
    return {**dict(zip(_parameter_names(type(block)), args, strict=False)), **kwargs}


def compile_region(**options) -> Callable[..., object]:
    """A `call(block, *args, **kwargs)` that runs `block` through the compiled region with dense inputs."""
    raise_recompile_limit()
    compiled = torch.compile(_region, **{**DEFAULT_OPTIONS, **options})

    def call(block: torch.nn.Module, *args, **kwargs):
        return compiled(block, **dense(by_name(block, args, kwargs)))

    return call


def block_call(region: Callable[..., object], block: torch.nn.Module) -> Callable[..., object]:
    """The callable nn.Module uses as the block's `_compiled_call_impl`."""
    return partial(region, block)
