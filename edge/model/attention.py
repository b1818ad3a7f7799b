"""Grouped-query causal attention over the KV cache, shared by every backend.

Input is one layer's fused projection qkv [T, (H + 2*KV) * hd] for tokens at positions
start..start+T-1. RoPE is applied to q and k, k/v are written into the cache, and the
attention runs as batched matmuls over [KV, group*T, hd]: the `group` query heads that share
a KV head are stacked along the row axis, so K/V are never repeated or copied.

A long-context call (a prompt chunk or a step over thousands of cached rows) splits its KV
heads between `workers` threads: NumPy releases the GIL in its matmuls and ufuncs, and the
graph's own threads are idle while attention runs. Each head's arithmetic is the same however
the heads are split, so the result is bit for bit the one-thread result.
"""
from __future__ import annotations

import numpy as np

from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache
from edge.model.rope import RopeTables

PARALLEL_MIN_SCORES = 1 << 16      # score entries ([G*T, S] per KV head) from which heads go to threads


class Attention:
    def __init__(self, cfg: ModelConfig, rope: RopeTables):
        self.H, self.KV, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.group = self.H // self.KV
        self.scale = np.float32(1.0 / np.sqrt(self.hd))
        self.rope = rope
        self.workers = 1           # threads for a long call's heads (the graph pass's thread count)
        self._pool, self._pool_size = None, 0

    def _map(self, fn, kv: int, work: int) -> None:
        """fn(a, b) over KV-head ranges covering 0..kv, on up to `workers` threads."""
        n = min(self.workers, kv) if work >= PARALLEL_MIN_SCORES else 1
        if n <= 1:
            fn(0, kv)
            return
        if self._pool_size < n:
            from concurrent.futures import ThreadPoolExecutor
            self._pool, self._pool_size = ThreadPoolExecutor(n, thread_name_prefix="attention"), n
        bounds = [kv * i // n for i in range(n + 1)]
        futures = [self._pool.submit(fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
        fn(bounds[0], bounds[1])
        for f in futures:
            f.result()

    def __call__(self, layer: int, qkv: np.ndarray, cache: KVCache, start: int) -> np.ndarray:
        T, H, KV, hd, G = qkv.shape[0], self.H, self.KV, self.hd, self.group
        qk = self.rope.rotated(qkv[:, :(H + KV) * hd].reshape(T, H + KV, hd), start)   # q and k heads at once
        v = qkv[:, (H + KV) * hd:].reshape(T, KV, hd).transpose(1, 0, 2)
        end = start + T
        cache.k[layer, :, start:end] = qk[:, H:].transpose(1, 0, 2)
        cache.v[layer, :, start:end] = v
        keys, values = cache.k[layer, :, :end], cache.v[layer, :, :end]          # [KV, S, hd]

        # [H, T, hd] -> [KV, G*T, hd], rows ordered (head-in-group, t); contiguous (a view
        # when T = 1), so matmul takes the same BLAS path as ever
        q = np.ascontiguousarray(qk[:, :H].transpose(1, 0, 2)).reshape(KV, G * T, hd)
        out = np.empty((KV, G * T, hd), np.float32)
        mask = None
        if T > 1:                                         # causal: token t sees start+t and before
            mask = np.arange(T)[None, :] > np.arange(T)[:, None]     # within the chunk's own columns

        def heads(a: int, b: int) -> None:
            scores = np.matmul(q[a:b], keys[a:b].transpose(0, 2, 1))    # [b-a, G*T, S]
            scores *= self.scale
            if mask is not None:
                scores.reshape(b - a, G, T, end)[:, :, :, start:][:, :, mask] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            np.matmul(scores, values[a:b].astype(np.float32, copy=False), out=out[a:b])   # [b-a, G*T, hd]

        self._map(heads, KV, G * T * end)
        return out.reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)
