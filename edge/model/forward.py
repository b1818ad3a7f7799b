"""What every backend is: a causal LM that runs tokens at the next positions of a KV cache.

A backend implements `_forward(tokens, cache, start, all_logits)`; `forward` owns the rules
they share (room in the cache, the cache recording its tokens) and `prefill` the chunking that
the engine, `bench` and `perplexity` all use: chunks start at multiples of PREFILL_CHUNK, so
a row always runs in the same chunk layout, and `reusable` says which cached rows a request
may keep without changing its answer.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache

PREFILL_CHUNK = 64      # tokens per graph call in prefill (the graph's second input shape)


class CausalLM:
    backend = "?"

    def __init__(self, cfg: ModelConfig, max_ctx: int):
        self.cfg = cfg
        self.max_ctx = max_ctx

    def new_cache(self, dtype=np.float32) -> KVCache:
        return KVCache(self.cfg, self.max_ctx, dtype)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Logits [T, V] (all_logits) or [V] for the last token; the tokens join the cache."""
        tokens = np.asarray(tokens, dtype=np.int64)
        cache.check_room(len(tokens))
        logits = self._forward(tokens, cache, cache.length, all_logits)
        cache.append(tokens)
        return logits

    def prefill(self, ids, cache: KVCache, all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """`forward` over `ids` in chunks of PREFILL_CHUNK; logits as `forward` gives them.
        `progress(done, total)` is called after each chunk (the scheduler's stall watch)."""
        out, start, i = [], cache.length, 0
        while i < len(ids):
            n = min(PREFILL_CHUNK - (start + i) % PREFILL_CHUNK, len(ids) - i)   # chunk-aligned
            canonical = cache.canonical == cache.length and n == PREFILL_CHUNK
            out.append(self.forward(ids[i:i + n], cache, all_logits))
            if canonical:
                cache.canonical = cache.length
            i += n
            if progress is not None:
                progress(i, len(ids))
        return np.concatenate(out) if all_logits else out[-1]

    @staticmethod
    def reusable(ids, cache: KVCache) -> int:
        """How many leading `ids` may keep their cached K/V so that a prefill of the rest gives
        bit for bit what a prefill from an empty cache gives (the same request, the same answer,
        whatever ran before). A row's result depends on the chunk it ran in (XNNPACK quantizes
        activations dynamically; attention and BLAS kernels differ with the row count), so only
        whole aligned prefill chunks are reused, never rows from a decode step or a partial chunk.
        The last id always runs again: its logits are needed."""
        n = min(cache.common_prefix(ids), len(ids) - 1, cache.canonical)
        return n - n % PREFILL_CHUNK

    def _forward(self, tokens: np.ndarray, cache: KVCache, start: int, all_logits: bool) -> np.ndarray:
        raise NotImplementedError
