"""The KV pool: one budget of KV memory shared by all slots, so one conversation can grow
long while the others stay short (llama.cpp's unified KV cache and vLLM's block allocator
are the models).

Each slot's cache is laid out for the whole per-sequence context, but only the rows the pool
has granted it (`KVCache.committed`, whole blocks) may be written, and only those take
memory. A sequence is granted its prompt (and one more row) when it starts and a block more
whenever it grows past what it holds; what a slot holds past its tokens goes back to the
system when its request ends. When the budget is short, idle slots' cached prefixes are
evicted, least recently used first, and their memory given back. Grants that running
sequences hold are never taken: the caller waits (a request is admitted later, a decoding
sequence skips a step) until one of them ends.

Not thread-safe on its own: the slots call it under their lock.
"""
from __future__ import annotations

import logging

from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache, block_tokens

log = logging.getLogger("edge.engine")


class KVPool:
    def __init__(self, budget_tokens: int, block: int, token_bytes: int = 0):
        if budget_tokens < block:
            raise ValueError(f"the KV pool must hold at least one block of {block} tokens, got {budget_tokens}")
        self.block, self.token_bytes = block, token_bytes
        self.budget = budget_tokens // block * block      # tokens, whole blocks
        self.used = 0                                      # tokens granted to caches
        self.evictions = 0                                 # idle prefixes evicted to make room

    @classmethod
    def sized(cls, cfg: ModelConfig, dtype, slots: int, max_ctx: int, budget_bytes: int | None) -> "KVPool":
        """A pool for `slots` caches of `cfg` in `dtype`: `budget_bytes` of KV (None: room for
        every slot at `max_ctx` at once), at least one block."""
        per_token = KVCache.bytes_per_token(cfg, dtype)
        tokens = slots * max_ctx if budget_bytes is None else budget_bytes // per_token
        block = block_tokens(cfg, dtype)
        return cls(max(tokens, block), block, per_token)

    def rows(self, tokens: int) -> int:
        """`tokens` rounded up to whole blocks."""
        return -(-tokens // self.block) * self.block

    def adopt(self, cache: KVCache) -> KVCache:
        """A new cache under this pool: it holds nothing until granted."""
        if cache.block != self.block and cache.block % self.block:
            raise ValueError(f"a cache of {cache.block}-token blocks in a pool of {self.block}")
        cache.release_from(0)
        return cache

    @property
    def budget_bytes(self) -> int:
        return self.budget * self.token_bytes

    @property
    def used_bytes(self) -> int:
        return self.used * self.token_bytes

    @property
    def free(self) -> int:
        return self.budget - self.used

    def reserve(self, cache: KVCache, tokens: int, idle: list[KVCache]) -> bool:
        """Grant `cache` rows for `tokens` tokens, evicting caches from `idle` (least recently
        used first) when the budget is short. False, and nothing evicted, when even evicting
        every idle cache leaves too little."""
        extra = self.rows(tokens) - cache.committed
        if extra <= 0:
            return True
        if extra > self.free:
            if extra > self.free + sum(c.committed for c in idle):
                return False
            for victim in idle:
                if extra <= self.free:
                    break
                if victim.committed:
                    self.evict(victim)
        cache.committed += extra
        self.used += extra
        return True

    def shrink(self, cache: KVCache, keep: int) -> None:
        """Give back the rows of `cache` past `keep` tokens (rounded up to a block)."""
        before = cache.committed
        cache.release_from(keep)
        self.used -= before - cache.committed

    def evict(self, cache: KVCache) -> None:
        """Forget an idle cache's tokens and give all its memory back."""
        log.info("KV pool: evicting an idle prefix of %d tokens to make room", cache.length)
        cache.truncate(0)
        self.shrink(cache, 0)
        self.evictions += 1
