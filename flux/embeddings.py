"""Reuse of text embeddings for repeated prompts: users often re-run a prompt with another seed.

Running CLIP-L and T5-XXL again for the same prompt costs ~45 ms on an H200 (seconds on a CPU); the
embeddings depend only on the prompt, the sequence length and the (shared) encoders, so the last few
are kept. Entries are tensors on the model's device: a few MB each for T5 at 512 tokens.
"""

from collections import OrderedDict
from collections.abc import Callable

import torch

DEFAULT_KEEP = 8

# (prompt_embeds [1, seq, dim], pooled_prompt_embeds [1, dim]) for one image.
Embeddings = tuple[torch.Tensor, torch.Tensor]


class PromptEmbeddingCache:
    """An LRU of prompt embeddings keyed by (prompt, variant, max_sequence_length)."""

    def __init__(self, keep: int = DEFAULT_KEEP):
        self.keep = keep
        self._entries: OrderedDict[tuple[str, str, int], Embeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(
        self, prompt: str, variant: str, max_sequence_length: int, encode: Callable[[], Embeddings]
    ) -> Embeddings:
        key = (prompt, variant, max_sequence_length)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = encode()
        if self.keep > 0:
            self._entries[key] = value
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
