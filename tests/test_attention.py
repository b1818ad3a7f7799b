"""Attention and RoPE give bit for bit what their plain formulation gives: the fused rotation
(q and k heads in one pass, [b, a] * [-sin, sin]) must round exactly as a*cos - b*sin and
b*cos + a*sin do, so that a faster step never changes an answer."""
from __future__ import annotations

import numpy as np
import pytest

from edge.model.attention import Attention
from edge.model.config import ModelConfig, RopeScaling
from edge.model.kv_cache import KVCache
from edge.model.rope import RopeTables


def config(scaling=None, heads=8, kv=2, hd=64) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=heads * hd, intermediate_size=64, num_layers=2,
                       num_heads=heads, num_kv_heads=kv, head_dim=hd, max_position_embeddings=4096,
                       rope_theta=500000.0, rope_scaling=scaling)


def plain_rope(rope: RopeTables, x: np.ndarray, start: int) -> np.ndarray:
    """x [heads, T, hd], the rotate-half formula, one float32 op at a time."""
    T, h = x.shape[1], rope.half
    cos, sin = rope.cos[start:start + T], rope.sin[start:start + T]
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def plain_attention(cfg: ModelConfig, rope: RopeTables, layer, qkv, cache: KVCache, start: int) -> np.ndarray:
    """The straightforward formulation: split, rotate, write K/V, softmax(q k^T / sqrt(hd)) v."""
    T, H, KV, hd = qkv.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // KV
    q = plain_rope(rope, qkv[:, :H * hd].reshape(T, H, hd).transpose(1, 0, 2), start)
    k = plain_rope(rope, qkv[:, H * hd:(H + KV) * hd].reshape(T, KV, hd).transpose(1, 0, 2), start)
    v = qkv[:, (H + KV) * hd:].reshape(T, KV, hd).transpose(1, 0, 2)
    end = start + T
    cache.k[layer, :, start:end] = k
    cache.v[layer, :, start:end] = v
    keys, values = cache.k[layer, :, :end], cache.v[layer, :, :end]
    scores = np.matmul(np.ascontiguousarray(q).reshape(KV, G * T, hd), keys.transpose(0, 2, 1))
    scores *= np.float32(1.0 / np.sqrt(hd))
    if T > 1:
        mask = np.arange(end)[None, :] > (start + np.arange(T))[:, None]
        scores.reshape(KV, G, T, end)[:, :, mask] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, values.astype(np.float32, copy=False))
    return out.reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)


@pytest.mark.parametrize("scaling", [None, RopeScaling(), RopeScaling(rope_type="yarn", factor=4.0,
                                                                      attention_factor=1.2)])
def test_rope_rotation_is_the_rotate_half_formula_bit_for_bit(scaling):
    cfg = config(scaling)
    rope = RopeTables(cfg, 4096)
    rng = np.random.default_rng(0)
    for start, T in ((0, 1), (5, 1), (4000, 1), (0, 64), (123, 9), (4032, 64)):
        x = (rng.standard_normal((T, 10, cfg.head_dim)) * 3).astype(np.float32)
        got = rope.rotated(x, start)
        want = plain_rope(rope, x.transpose(1, 0, 2), start).transpose(1, 0, 2)
        assert np.array_equal(got, want)
        assert not np.array_equal(got, x) or start == 0


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(8, 2, 64), (9, 3, 64), (4, 4, 32)])
def test_attention_equals_the_plain_formulation_bit_for_bit(kv_dtype, shape, workers, monkeypatch):
    """On one thread, and with the KV heads split between threads (every call counts as long)."""
    heads, kv, hd = shape
    cfg = config(RopeScaling(), heads, kv, hd)
    rope = RopeTables(cfg, 512)
    attention = Attention(cfg, rope)
    attention.workers = workers
    monkeypatch.setattr("edge.model.attention.PARALLEL_MIN_SCORES", 0)
    ours, ref = KVCache(cfg, 512, kv_dtype), KVCache(cfg, 512, kv_dtype)
    rng = np.random.default_rng(1)
    width = (heads + 2 * kv) * hd
    start = 0
    for T in (64, 7, 1, 1, 5, 1, 64, 1):          # a prompt, decode steps, multi-row steps
        for layer in range(cfg.num_layers):
            qkv = rng.standard_normal((T, width)).astype(np.float32)
            got = attention(layer, qkv, ours, start)
            want = plain_attention(cfg, rope, layer, qkv, ref, start)
            assert got.shape == (T, heads * hd)
            assert np.array_equal(got, want)
        start += T
    assert np.array_equal(ours.k, ref.k) and np.array_equal(ours.v, ref.v)
    assert (attention._pool is not None) == (workers > 1)       # the heads did go to threads
