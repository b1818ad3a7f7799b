"""The preallocated, contiguous key/value cache of one sequence."""
from __future__ import annotations

import numpy as np

from edge.model.config import ModelConfig


class ContextFull(ValueError):
    """The sequence would not fit in the cache: `needed` tokens against a context of `max_ctx`."""

    def __init__(self, needed: int, max_ctx: int, message: str | None = None):
        self.needed, self.max_ctx = needed, max_ctx
        super().__init__(message or f"{needed} tokens do not fit in the context of {max_ctx} "
                                    "(at least one more is needed to answer)")


class KVCache:
    """K and V as [layers, kv_heads, max_ctx, head_dim]: one step's attention reads one
    contiguous [kv_heads, length, head_dim] slice per layer, shared by the grouped heads."""

    def __init__(self, cfg: ModelConfig, max_ctx: int, dtype=np.float32):
        shape = (cfg.num_layers, cfg.num_kv_heads, max_ctx, cfg.head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.max_ctx = max_ctx
        self.tokens: list[int] = []     # the token ids whose K/V are stored, in order
        # Leading rows computed exactly as a prefill from an empty cache computes them (whole
        # chunks at chunk-aligned positions); only these may be reused: see CausalLM.reusable
        self.canonical = 0

    @property
    def length(self) -> int:
        return len(self.tokens)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype=np.float32) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize   # K and V

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_ctx:
            raise ContextFull(self.length + n_new, self.max_ctx,
                              f"{self.length} cached + {n_new} new tokens exceed the context of {self.max_ctx}")

    def append(self, tokens) -> None:
        """Record tokens whose K/V the layers have just written at the next positions."""
        self.tokens.extend(int(t) for t in tokens)

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (their slots get overwritten later)."""
        del self.tokens[n:]
        self.canonical = min(self.canonical, n)

    def erase(self, start: int, end: int) -> None:
        """Zero the K/V rows [start, end) past the recorded tokens (a rejected draft's), so
        the arrays hold exactly what a run that never wrote them holds."""
        if start < self.length:
            raise ValueError(f"erase: row {start} holds a recorded token")
        self.k[:, :, start:end] = 0
        self.v[:, :, start:end] = 0

    def common_prefix(self, ids) -> int:
        """How many leading ids are already cached (prefix reuse)."""
        return common_prefix(self.tokens, ids)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
