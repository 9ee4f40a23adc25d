"""flux-mini's training images: the shapes world drawn in fixed chunks, so that a large dataset can be
drawn by several processes and still be the same images whatever their number.

Chunk k of a draw seeded s is generate_dataset(seed=(s, k)): the images depend on the seed and the
chunk size only. Drawing is PIL work on the CPU (~7 ms a 256 px image), the first minutes of a GPU
build without workers.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from toys.shapes import Example, generate_dataset

CHUNK = 100  # images per chunk; part of what a seed means, so never change it for an existing spec


def draw_examples(n: int, seed: int, size: int, workers: int = 1, **world) -> list[Example]:
    """`n` captioned images at `size`; `world`: generate_dataset's exclude / two_tone."""
    chunks = [(min(CHUNK, n - start), (seed, k)) for k, start in enumerate(range(0, n, CHUNK))]
    if workers <= 1 or len(chunks) <= 1:
        return [e for count, chunk_seed in chunks for e in _chunk(count, chunk_seed, size, world)]
    # spawn, not fork: the builder may already hold a CUDA context, which a forked child cannot use.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        parts = pool.map(_chunk, *zip(*[(c, s, size, world) for c, s in chunks], strict=True))
        return [e for part in parts for e in part]


def _chunk(count: int, chunk_seed: tuple[int, int], size: int, world: dict) -> list[Example]:
    return generate_dataset(count, seed=chunk_seed, size=size, **world)
