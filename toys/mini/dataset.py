"""flux-mini's training images: the shapes world drawn as one stream (the CPU builds) or in fixed
chunks that several processes draw (MiniSpec.draw_chunk > 0, the GPU builds): the images depend on the
seed and the chunk size only, never on the number of processes.

Chunk k of a draw seeded s is generate_dataset(seed=(s, k)). Drawing is PIL work on the CPU (~40 ms a
256 px image here): 8,000 images are five minutes in one process, 24 s in 15 on the H200's machine.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from toys.shapes import Example, generate_dataset


def draw_examples(n: int, seed: int, size: int, chunk: int = 0, workers: int = 1, **world) -> list[Example]:
    """`n` captioned images at `size`; chunk 0: generate_dataset(n, seed) itself; `world`:
    generate_dataset's exclude / two_tone / sizes."""
    if chunk <= 0:
        return generate_dataset(n, seed=seed, size=size, **world)
    chunks = [(min(chunk, n - start), (seed, k)) for k, start in enumerate(range(0, n, chunk))]
    if workers <= 1 or len(chunks) <= 1:
        return [e for count, chunk_seed in chunks for e in _chunk(count, chunk_seed, size, world)]
    # spawn, not fork: the builder may already hold a CUDA context, which a forked child cannot use.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        parts = pool.map(_chunk, *zip(*[(c, s, size, world) for c, s in chunks], strict=True))
        return [e for part in parts for e in part]


def _chunk(count: int, chunk_seed: tuple[int, int], size: int, world: dict) -> list[Example]:
    return generate_dataset(count, seed=chunk_seed, size=size, **world)
