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
        self.graph = GraphRunner(bundle.file("model.tflite"), threads=threads, weight_cache=weight_cache,
                                 identity=bundle.manifest["files"]["model.tflite"]["sha256"])
        self.embed = bundle.embedding()                              # rows mmapped (see bundle.py)
        self.attention = Attention(cfg, RopeTables(cfg, max_ctx))
        self.entry = self.graph.runner("entry")
        self.layers = [self.graph.runner(f"layer_{i}") for i in range(cfg.num_layers)]
        self.lm_head = self.graph.runner("lm_head", fresh=True)     # the logits are handed on

    def _forward(self, tokens, segments, all_logits):
        x = self.embed(tokens)
        (qkv,) = self.entry(x)
        # Each signature has buffers of its own, overwritten only by its own next call: layer
        # i's outputs can go straight into layer i+1, no copies.
        for i, layer in enumerate(self.layers[:-1]):
            x, qkv = layer(x, attend(self.attention, i, qkv, segments))
        (h,) = self.layers[-1](x, attend(self.attention, len(self.layers) - 1, qkv, segments))
        if not all_logits and any(s.n > 1 for s in segments):
            h = np.ascontiguousarray(h[last_rows(segments)])
        (logits,) = self.lm_head(h)
        return logits
