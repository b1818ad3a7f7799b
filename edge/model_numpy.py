"""The NumPy reference model: the whole Llama forward pass, readable in one sitting.

It is the oracle the fast (LiteRT) backend is tested against, so it favours clarity:
float32 weights, one function per block. Backends share `Attention` (RoPE + KV cache).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from edge.attention import Attention
from edge.config import ModelConfig
from edge.kv_cache import KVCache
from edge.rope import RopeTables


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(var + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class NumpyModel:
    """forward(tokens, cache) appends tokens to the cache and returns their logits."""
    backend = "numpy"

    def __init__(self, cfg: ModelConfig, tensor: Callable[[str], np.ndarray], max_ctx: int):
        self.cfg = cfg
        self.max_ctx = max_ctx
        w = lambda name: np.ascontiguousarray(tensor(name), dtype=np.float32)
        self.embed = w("embed")
        self.final_norm = w("final_norm")
        self.lm_head = self.embed if cfg.tie_word_embeddings else w("lm_head")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            self.layers.append({
                "attn_norm": w(p + "attn_norm"),
                "wqkv_t": np.ascontiguousarray(np.concatenate([w(p + "wq"), w(p + "wk"), w(p + "wv")]).T),
                "wo_t": np.ascontiguousarray(w(p + "wo").T),
                "ffn_norm": w(p + "ffn_norm"),
                "w_gate_t": np.ascontiguousarray(w(p + "w_gate").T),
                "w_up_t": np.ascontiguousarray(w(p + "w_up").T),
                "w_down_t": np.ascontiguousarray(w(p + "w_down").T),
            })
        self.attention = Attention(cfg, RopeTables(cfg, max_ctx))

    def new_cache(self, dtype=np.float32) -> KVCache:
        return KVCache(self.cfg, self.max_ctx, dtype)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Logits [T, V] (all_logits) or [V] for the last token; tokens join the cache."""
        tokens = np.asarray(tokens, dtype=np.int64)
        cache.check_room(len(tokens))
        start, eps = cache.length, self.cfg.rms_norm_eps
        x = self.embed[tokens]                                            # [T, D]
        for i, L in enumerate(self.layers):
            qkv = rms_norm(x, L["attn_norm"], eps) @ L["wqkv_t"]
            x = x + self.attention(i, qkv, cache, start) @ L["wo_t"]
            h = rms_norm(x, L["ffn_norm"], eps)
            x = x + (silu(h @ L["w_gate_t"]) * (h @ L["w_up_t"])) @ L["w_down_t"]
        cache.tokens.extend(int(t) for t in tokens)
        h = rms_norm(x if all_logits else x[-1:], self.final_norm, eps)
        logits = h @ self.lm_head.T
        return logits if all_logits else logits[0]
