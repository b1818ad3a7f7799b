"""Grouped-query causal attention over the KV cache, shared by every backend.

Input is one layer's fused projection qkv [T, (H + 2*KV) * hd] for tokens at positions
start..start+T-1. RoPE is applied to q and k, k/v are written into the cache, and the
attention runs as batched matmuls over [KV, group*T, hd]: the `group` query heads that share
a KV head are stacked along the row axis, so K/V are never repeated or copied.
"""
from __future__ import annotations

import numpy as np

from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache
from edge.model.rope import RopeTables


class Attention:
    def __init__(self, cfg: ModelConfig, rope: RopeTables):
        self.H, self.KV, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.group = self.H // self.KV
        self.scale = np.float32(1.0 / np.sqrt(self.hd))
        self.rope = rope

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
        scores = np.matmul(q, keys.transpose(0, 2, 1))    # [KV, G*T, S]
        scores *= self.scale
        if T > 1:                                         # causal: token t sees start+t and before
            t = np.arange(T)
            s = np.arange(end)
            mask = s[None, :] > (start + t)[:, None]       # [T, S]
            scores.reshape(KV, G, T, end)[:, :, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, values.astype(np.float32, copy=False))   # [KV, G*T, hd]
        return out.reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)
