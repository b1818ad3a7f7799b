"""The fast backend: weight matmuls in the bundle's TFLite graph (LiteRT + XNNPACK), the
rest in NumPy (embedding lookup, edge/model/embedding.py, RoPE + KV cache + attention via `Attention`).

One decode step is L + 2 graph calls: entry (norm + QKV of layer 0), one fused call per
layer (o_proj, residual, norm, SwiGLU MLP, residual, next layer's norm + QKV) and lm_head.
Prefill runs the same signatures on [T, D] chunks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.model.attention import Attention
from edge.model.bundle import Bundle
from edge.model.forward import CausalLM, attend, last_rows
from edge.model.rope import RopeTables


class LiteRTModel(CausalLM):
    backend = "litert"

    def __init__(self, bundle: Bundle, max_ctx: int, threads: int | None = None,
                 weight_cache: Path | None = None):
        from edge.model.litert_runner import GraphRunner
        super().__init__(bundle.config, max_ctx)
        cfg = bundle.config
        self.graph = GraphRunner(bundle.file("model.tflite"), threads=threads, weight_cache=weight_cache)
        self.embed = bundle.embedding()                              # rows mmapped (see bundle.py)
        self.attention = Attention(cfg, RopeTables(cfg, max_ctx))
        self.entry = self.graph.runner("entry")
        self.layers = [self.graph.runner(f"layer_{i}") for i in range(cfg.num_layers)]
        self.lm_head = self.graph.runner("lm_head")

    def _forward(self, tokens, segments, all_logits):
        x = self.embed(tokens)
        (qkv,) = self.entry(x)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            attn = attend(self.attention, i, qkv, segments)
            if i < last:
                x, qkv = (a.copy() for a in layer(x, attn))   # the runner reuses its buffers
            else:
                (h,) = layer(x, attn)
        (logits,) = self.lm_head(np.ascontiguousarray(h if all_logits else h[last_rows(segments)]))
        return logits.copy()
