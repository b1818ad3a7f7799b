"""What every backend is: a causal LM that runs tokens at the next positions of KV caches.

`forward_batch` runs several sequences in one pass: their rows are stacked, so each weight
matmul reads its weights once for all of them, and attention runs per sequence over its own
cache. A backend implements `_forward(tokens, segments, all_logits)` for stacked rows;
`forward_batch` owns the rules they share (room in each cache, each cache recording its
tokens), `forward` is the one-sequence case and `prefill` the chunking that the engine,
`bench` and `perplexity` all use.
`prefill` runs chunks that start at multiples of PREFILL_CHUNK, so a row always runs in the
same chunk layout, and `reusable` says which cached rows a request may keep without changing
its answer.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache

PREFILL_CHUNK = 16      # rows per graph call in prefill, and the grain of prefix reuse (see `reusable`)


class Segment(NamedTuple):
    """`n` stacked rows that belong to one sequence: positions start.. of its cache. `stepwise`
    rows (a speculative draft being verified) attend one at a time, bit for bit as n one-row
    decode steps would, so accepting a draft never changes the output; a prompt chunk's rows
    attend together."""
    cache: KVCache
    start: int
    n: int
    stepwise: bool = False


def attend(attention, layer: int, qkv: np.ndarray, segments: list[Segment]) -> np.ndarray:
    """Attention for stacked rows [R, ...]: each segment over its own cache."""
    if len(segments) == 1 and not (segments[0].stepwise and segments[0].n > 1):
        s = segments[0]
        return attention(layer, qkv, s.cache, s.start)
    out, r = None, 0
    for s in segments:
        parts = [(i, 1) for i in range(s.n)] if s.stepwise else [(0, s.n)]
        for i, n in parts:
            a = attention(layer, qkv[r + i:r + i + n], s.cache, s.start + i)
            if out is None:
                out = np.empty((len(qkv), a.shape[1]), np.float32)
            out[r + i:r + i + n] = a
        r += s.n
    return out


def chunk_rows(start: int, remaining: int) -> int:
    """Rows of the next prompt chunk at position `start`: chunks end on multiples of
    PREFILL_CHUNK, so a position always runs in the same chunk layout."""
    return min(PREFILL_CHUNK - start % PREFILL_CHUNK, remaining)


def whole_chunk(cache: KVCache, n: int) -> bool:
    """Whether n rows at the cache's end extend its run of whole aligned prompt chunks."""
    return cache.canonical == cache.length and n == PREFILL_CHUNK


def last_rows(segments: list[Segment]) -> np.ndarray:
    """Index of each segment's last row among the stacked rows."""
    return np.cumsum([s.n for s in segments]) - 1


class CausalLM:
    backend = "?"

    def __init__(self, cfg: ModelConfig, max_ctx: int):
        self.cfg = cfg
        self.max_ctx = max_ctx

    def new_cache(self, dtype=np.float32) -> KVCache:
        return KVCache(self.cfg, self.max_ctx, dtype)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Logits [T, V] (all_logits) or [V] for the last token; the tokens join the cache."""
        return self.forward_batch([(tokens, cache)], all_logits)[0]

    def forward_batch(self, items, all_logits: bool = False, stepwise=()) -> list[np.ndarray]:
        """items: (tokens, cache) per sequence, each cache a different sequence's. Returns,
        per item, logits as `forward` gives them; every item's tokens join its cache.
        `stepwise[i]`: item i's rows attend as successive decode steps (see Segment)."""
        items = [(np.asarray(t, dtype=np.int64).reshape(-1), c) for t, c in items]
        if len({id(c) for _, c in items}) != len(items):
            raise ValueError("forward_batch: each sequence needs its own cache")
        for tokens, cache in items:
            if not len(tokens):
                raise ValueError("forward_batch: a sequence with no tokens")
            cache.check_room(len(tokens))
        stepwise = list(stepwise) + [False] * (len(items) - len(stepwise))
        segments = [Segment(c, c.length, len(t), w) for (t, c), w in zip(items, stepwise)]
        logits = self._forward(np.concatenate([t for t, _ in items]), segments, all_logits)
        for tokens, cache in items:
            cache.append(tokens)
        if not all_logits:
            return list(logits)
        bounds = np.cumsum([0] + [s.n for s in segments])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def prefill(self, ids, cache: KVCache, all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """`forward` over `ids` in chunks of PREFILL_CHUNK; logits as `forward` gives them.
        `progress(done, total)` is called after each chunk (the scheduler's stall watch)."""
        out, i = [], 0
        while i < len(ids):
            n = chunk_rows(cache.length, len(ids) - i)
            out.append(self.forward_chunk(ids[i:i + n], cache, all_logits))
            i += n
            if progress is not None:
                progress(i, len(ids))
        return np.concatenate(out) if all_logits else out[-1]

    def forward_chunk(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """`forward` for a prompt chunk (as `chunk_rows` sizes it), keeping count of the
        whole aligned chunks at the cache's start: the rows `reusable` may hand on."""
        whole = whole_chunk(cache, len(tokens))
        logits = self.forward(tokens, cache, all_logits)
        if whole:
            cache.canonical = cache.length
        return logits

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

    def release_buffers(self) -> None:
        """Let go of what the backend keeps for multi-row calls (a prompt's chunks) while
        nothing runs; the next such call makes it again."""

    def _forward(self, tokens: np.ndarray, segments: list[Segment], all_logits: bool) -> np.ndarray:
        """Logits of all stacked rows [R, V] (all_logits) or of each segment's last row [B, V]."""
        raise NotImplementedError
