"""The fast backend: weight matmuls in the bundle's TFLite graph (LiteRT + XNNPACK), the
rest in NumPy (embedding lookup, edge/model/embedding.py, RoPE + KV cache + attention via `Attention`).

One decode step is L + 2 graph calls: entry (norm + QKV of layer 0), one fused call per
layer (o_proj, residual, norm, SwiGLU MLP, residual, next layer's norm + QKV) and lm_head.
Prefill runs the same signatures on [T, D] chunks.

With several thread counts (`--threads auto`: 1 and all cores) the graph is loaded once per
count over the same XNNPACK weight cache (the second load maps the packed weights the first
wrote), and `ThreadPolicy` times each pass and picks the faster (edge/model/thread_policy.py).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from edge.model.attention import Attention
from edge.model.bundle import Bundle
from edge.model.forward import CausalLM, attend, last_rows
from edge.model.progress import watch_file
from edge.model.rope import RopeTables
from edge.model.thread_policy import ThreadPolicy, rows_key, thread_choices


def _cache_build_progress(graph: Path, weight_cache: Path | None):
    """Progress of XNNPACK writing the packed-weight cache (about the graph's size), when it will."""
    if weight_cache is None or any(Path(weight_cache).glob(f"{graph.stem}-*.xnnpack")):
        return nullcontext()
    return watch_file((Path(weight_cache), f".{graph.stem}-*.xnnpack.tmp-{os.getpid()}"),
                      graph.stat().st_size, "packing weights for XNNPACK (once)")


class LiteRTModel(CausalLM):
    backend = "litert"

    def __init__(self, bundle: Bundle, max_ctx: int, threads: int | str | None = None,
                 weight_cache: Path | None = None):
        """threads: a count, or "auto"/None (1 and all cores, timed: `ThreadPolicy`)."""
        from edge.model.litert_runner import GraphRunner
        super().__init__(bundle.config, max_ctx)
        cfg = bundle.config
        choices = thread_choices(threads)
        graph = Path(bundle.file("model.tflite"))
        identity = bundle.manifest["files"]["model.tflite"]["sha256"]
        with _cache_build_progress(graph, weight_cache):   # the first load writes the weight cache,
            self.graphs = {choices[0]: GraphRunner(graph, threads=choices[0], weight_cache=weight_cache,
                                                    identity=identity)}
        for n in choices[1:]:                              # the others map it
            self.graphs[n] = GraphRunner(graph, threads=n, weight_cache=weight_cache, identity=identity)
        self.embed = bundle.embedding()                              # rows read when asked (see bundle.py)
        self.attention = Attention(cfg, RopeTables(cfg, max_ctx))
        self.attention.workers = choices[-1]      # a long call's heads on the graph's thread count
        self.runners = {n: (g.runner("entry"), [g.runner(f"layer_{i}") for i in range(cfg.num_layers)],
                            g.runner("lm_head", fresh=True))        # the logits are handed on
                        for n, g in self.graphs.items()}
        self.policy = ThreadPolicy(choices) if len(choices) > 1 else None
        self.graph = self.graphs[choices[-1]]
        self.entry, self.layers, self.lm_head = self.runners[choices[-1]]

    def release_buffers(self) -> None:
        """Each signature's buffers for more than one row, of every thread count's graph (3B:
        ~40 MB a graph for the 16-row prompt chunks; made again in ~0.05 ms a signature)."""
        for g in self.graphs.values():
            g.release_buffers()

    def _forward(self, tokens, segments, all_logits):
        if self.policy is None:
            return self._run(self.entry, self.layers, self.lm_head, tokens, segments, all_logits)
        key = rows_key(len(tokens))
        with self.policy.timed(key, len(tokens)) as n:
            self.attention.workers = n
            return self._run(*self.runners[n], tokens, segments, all_logits)

    def _run(self, entry, layers, lm_head, tokens, segments, all_logits):
        x = self.embed(tokens)
        (qkv,) = entry(x)
        # Each signature has buffers of its own, overwritten only by its own next call: layer
        # i's outputs can go straight into layer i+1, no copies.
        for i, layer in enumerate(layers[:-1]):
            x, qkv = layer(x, attend(self.attention, i, qkv, segments))
        (h,) = layers[-1](x, attend(self.attention, len(layers) - 1, qkv, segments))
        if not all_logits and any(s.n > 1 for s in segments):
            h = np.ascontiguousarray(h[last_rows(segments)])
        (logits,) = lm_head(h)
        return logits
