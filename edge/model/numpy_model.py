"""The NumPy reference model: the whole Llama forward pass, readable in one sitting.

It is the oracle the fast (LiteRT) backend is tested against, so it favours clarity:
float32 weights, one function per block. `llama_layer` is the one place the decoder layer's
math is written: this model runs it, and the converter's calibration pass runs it with an
`observe` hook that records what each weight matmul sees.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from edge.model.attention import Attention
from edge.model.config import ModelConfig
from edge.model.forward import CausalLM, attend, last_rows
from edge.model.rope import RopeTables

Observe = Callable[[str, np.ndarray], np.ndarray]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(var + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def layer_weights(w: Callable[[str], np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Layer i's weights, laid out for `x @ W` (transposed views, QKV fused)."""
    p = f"layers.{i}."
    t = lambda name: w(p + name).T
    return {
        "attn_norm": w(p + "attn_norm"),
        "wqkv_t": np.concatenate([w(p + "wq"), w(p + "wk"), w(p + "wv")]).T,
        "wo_t": t("wo"),
        "ffn_norm": w(p + "ffn_norm"),
        "w_gate_t": t("w_gate"),
        "w_up_t": t("w_up"),
        "w_down_t": t("w_down"),
    }


def llama_layer(x: np.ndarray, L: dict, attend: Callable[[np.ndarray], np.ndarray], eps: float,
                observe: Observe | None = None) -> np.ndarray:
    """One decoder layer on the residual stream x [T, D]. `attend(qkv)` is this layer's
    attention (RoPE, the KV cache, softmax). `observe(group, input)` sees the input of each
    group of matmuls ("qkv", "wo", "gate_up", "down") and returns the input the matmul uses
    (calibration models the graph's rotation there)."""
    seen = observe or (lambda group, v: v)
    n = seen("qkv", rms_norm(x, L["attn_norm"], eps))
    attn = seen("wo", attend(n @ L["wqkv_t"]))
    x = x + attn @ L["wo_t"]
    h = seen("gate_up", rms_norm(x, L["ffn_norm"], eps))
    a = seen("down", silu(h @ L["w_gate_t"]) * (h @ L["w_up_t"]))
    return x + a @ L["w_down_t"]


class NumpyModel(CausalLM):
    backend = "numpy"

    def __init__(self, cfg: ModelConfig, tensor: Callable[[str], np.ndarray], max_ctx: int):
        super().__init__(cfg, max_ctx)
        w = lambda name: np.ascontiguousarray(tensor(name), dtype=np.float32)
        self.embed = w("embed")
        self.final_norm = w("final_norm")
        self.lm_head = self.embed if cfg.tie_word_embeddings else w("lm_head")
        self.layers = [layer_weights(w, i) for i in range(cfg.num_layers)]
        self.attention = Attention(cfg, RopeTables(cfg, max_ctx))

    def _forward(self, tokens, segments, all_logits):
        eps = self.cfg.rms_norm_eps
        x = self.embed[tokens]                                            # [R, D]
        for i, L in enumerate(self.layers):
            x = llama_layer(x, L, lambda qkv: attend(self.attention, i, qkv, segments), eps)
        h = rms_norm(x if all_logits else x[last_rows(segments)], self.final_norm, eps)
        return h @ self.lm_head.T
