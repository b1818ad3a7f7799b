"""Llama's weight matmuls as one .tflite file: one fused subgraph per step between attentions.

NumPy owns the embedding lookup, RoPE, the KV cache, attention and sampling; everything else
runs here, cut so that a decode step is one invoke per layer (plus entry and lm_head):

    entry      x [T, D]                -> qkv [T, (H + 2 KV) hd]   rmsnorm(x, attn_norm_0) @ Wqkv_0^T
    layer_i    x [T, D], attn [T, H hd] -> x_out [T, D], qkv       (i < L-1; qkv is layer i+1's)
    layer_L-1  x, attn                 -> h_final [T, D]           rmsnorm(x_out, final_norm)
    lm_head    h [T, D]                -> logits [T, V]            (embed when tied)

    layer_i:  h = x + attn @ wo^T
              n = rmsnorm(h, ffn_norm)
              x_out = h + (silu(n @ w_gate^T) * (n @ w_up^T)) @ w_down^T

Wqkv = concat(wq, wk, wv) along the output axis: with per-row (or per-row-block) scales that
quantizes exactly like three separate matrices, and one FC streams them in one pass.
Every input has a dynamic T (decode T=1, prefill chunks) in one subgraph per signature,
which XNNPACK keeps delegated across `resize_tensor_input`.

gate/up stay two FCs. Measured against one fused [2F, D] FC + SPLIT (D=2048, F=8192, int4
and int8, T=1 and T=32, 2 threads): no difference beyond run-to-run noise, since both FCs
already sit in the same XNNPACK node; the fused form only adds a SPLIT and a [T, 2F] buffer.
"""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from convert.quantize import SCHEMES, QuantizedWeight, quantize
from convert.tflite_writer import Act, GraphBuilder, ModelBuilder
from edge.model.config import ModelConfig

Weights = Mapping[str, np.ndarray] | Callable[[str], np.ndarray]
Importance = Mapping[str, np.ndarray]


def build_llama_graph(weights_by_name: Weights, config: ModelConfig, quant: str,
                      importance: Importance = {}, down_rotation: np.ndarray | None = None,
                      hessians=None, head: str | None = None) -> bytes:
    """The whole graph file as bytes (small models, tests); see `write_llama_graph`. head None:
    `head_scheme(quant)`."""
    return _build(weights_by_name, config, quant, importance, down_rotation, [], hessians,
                  head_scheme(quant, head)).finish()


@dataclass(frozen=True)
class HeadLayout:
    """Where the lm_head's weight sits in the written graph file: what the embedding lookup of
    a tied model reads instead of a copy of its own (edge/model/embedding.py)."""
    scheme: str
    shape: tuple[int, int]
    data: tuple[int, int]                 # (offset, bytes) in the file
    block_scales: tuple[int, int] | None  # blockwise: the fp16 scales' (offset, bytes)
    block_size: int
    channel_scales: np.ndarray | None     # per-channel schemes: f32 [V] (the flatbuffer holds them too)


def write_llama_graph(path: str | os.PathLike, weights_by_name: Weights, config: ModelConfig,
                      quant: str, importance: Importance = {},
                      down_rotation: np.ndarray | None = None, hessians=None, *,
                      head: str) -> HeadLayout:
    """Write the graph file to `path` (streams weights; use for real models). Returns where
    its lm_head weight landed.

    importance maps a matmul group ("layers.{i}.qkv", ".wo", ".gate_up", ".down", "head"; see
    convert/calibration.py) to E[x^2] of its input, which steers the clip search.
    down_rotation [B, B]: multiply each B-channel block of w_down's input by it in the graph
    (convert/rotation.py; the weights must have been rotated to match).
    hessians (convert/gptq.Hessians): the groups it holds are rounded with GPTQ, the rest
    to nearest. head: the lm_head's scheme, as `head_scheme` resolved it."""
    layout: list = []
    mb = _build(weights_by_name, config, quant, importance, down_rotation, layout, hessians, head)
    mb.write(path)
    data_buf, scale_buf = layout[0].data            # buffer indices until the file is written
    return dataclasses.replace(layout[0], data=mb.buffer_span(data_buf),
                               block_scales=mb.buffer_span(scale_buf) if scale_buf else None)


def _build(weights_by_name: Weights, cfg: ModelConfig, quant: str, importance: Importance,
           down_rotation: np.ndarray | None, head_out: list, hessians, head: str) -> ModelBuilder:
    """Quantize tensor by tensor into a spilling builder: float weights never pile up.
    The lm_head's `HeadLayout` (buffer indices, not yet file offsets) is appended to head_out."""
    get = weights_by_name if callable(weights_by_name) else weights_by_name.__getitem__

    def quant_for(w: np.ndarray, group: str, scheme: str | None = None):
        scheme = scheme or group_scheme(quant, group, cfg.num_layers)
        if hessians is not None and group in hessians:
            from convert.gptq import damping, gptq_quantize
            factor = hessians.prepared(group, damping(scheme),
                                       damp_of=lambda g: damping(group_scheme(quant, g, cfg.num_layers)))
            return gptq_quantize(w, scheme, factor, importance.get(group))
        return quantize(w, scheme, importance.get(group))
    mb = ModelBuilder(f"edge-llm llama {quant}")
    D, L, eps = cfg.hidden_size, cfg.num_layers, cfg.rms_norm_eps

    g = mb.subgraph("entry")
    g.output("qkv", _qkv(g, g.input("x", D), get, 0, quant_for, eps))
    for i in range(L):
        g = mb.subgraph(f"layer_{i}")
        x_out = _layer(g, g.input("x", D), g.input("attn", cfg.num_heads * cfg.head_dim),
                       get, i, quant_for, eps, down_rotation)
        if i < L - 1:
            g.output("x_out", x_out)
            g.output("qkv", _qkv(g, x_out, get, i + 1, quant_for, eps))
        else:
            g.output("h_final", g.rms_norm(x_out, get("final_norm"), eps))

    g = mb.subgraph("lm_head")
    head_w = get("embed") if cfg.tie_word_embeddings else get("lm_head")
    head_q = by_row_blocks(head_w, lambda w: quant_for(w, "head", head))
    del head_w                                    # [V, D] float32: 1 GB on the 1B shape
    g.output("logits", g.fully_connected(g.input("h", D), head_q, "logits"))
    head_out.append(HeadLayout(head_q.scheme, head_q.shape, mb.weight_buffers(head_q), None,
                               head_q.block_size,
                               None if head_q.block_size or head_q.scales is None else head_q.scales))
    return mb


HEAD_BLOCK_ELEMS = 1 << 25    # weights per row block of the head (128 MB of float32)


def by_row_blocks(w, quantize_rows: Callable[[np.ndarray], QuantizedWeight]) -> QuantizedWeight:
    """quantize_rows(w) of a [V, D] table (an array or a convert.table.Table, which makes each
    block when it is sliced), a block of rows at a time into one result: every
    scheme rounds each row on its own, so the bytes are the same, but the temporaries (the
    clip search's levels, GPTQ's) are a block's, not the table's (the 3B head is 1.6 GB of
    float32; its int8 levels alone would be 394 MB). Blocks are whole multiples of GPTQ's row
    chunk, so GPTQ sees the same chunks it would see in one call."""
    from convert.gptq import _CHUNK_ELEMS
    n, k = w.shape
    chunk = max(1, _CHUNK_ELEMS // k)
    rows = max(1, HEAD_BLOCK_ELEMS // (k * chunk)) * chunk
    if n <= rows:
        return quantize_rows(w if isinstance(w, np.ndarray) else w[0:n])
    data = scales = first = None
    for lo in range(0, n, rows):
        part = quantize_rows(w[lo:lo + rows])
        r, per_row = part.shape[0], part.data.size // part.shape[0]
        if first is None:
            first = (part.scheme, part.data.shape[1:], part.block_size)
            data = np.empty((n * per_row,), part.data.dtype)       # int4: packed bytes, row-major
            scales = None if part.scales is None else np.empty((n,) + part.scales.shape[1:], part.scales.dtype)
        data.reshape(n, per_row)[lo:lo + r] = part.data.reshape(r, per_row)
        if scales is not None:
            scales[lo:lo + r] = part.scales
        del part
    scheme, row_shape, block_size = first
    return QuantizedWeight(scheme, (n, k), data.reshape((n,) + row_shape) if row_shape else data, scales, block_size)


def head_scheme(quant: str, head: str | None = None) -> str:
    """The lm_head's format for each --quant (or the `--head` override, checked here): the one
    place this is decided. A tied model's embedding lookup reads the same rows, so this is the
    embedding's format too. Per-channel int4 keeps a per-channel int4 head: an int4-b32 head
    measured better on the development text (mean KL 0.2187 -> 0.2040, docs/QUANTIZATION.md),
    but XNNPACK's blockwise int4 kernels are 2-3x slower than its per-channel ones on x86
    (AVX2), and with it the 1B int4 decode fell from ~46 to ~32 t/s (docs/SPEED.md), so it is
    `--head int4-b32`, not the default. int4-b32 keeps an int8 head, as llama.cpp keeps its
    output matrix at Q6_K."""
    if head is not None:
        if head not in SCHEMES:
            raise ValueError(f"unknown head scheme {head!r}; choose from {', '.join(SCHEMES)}")
        return head
    return "int8" if quant == "int4-b32" else quant


# Matmul groups a scheme keeps at a wider format: (which layer, group) -> scheme. Per-channel
# int4 keeps w_down of the first and the last layer at int8: on the development text
# (docs/QUANTIZATION.md) mean KL 0.2187 -> 0.2071 and perplexity +24.5 % -> +22.8 % alone, for
# 8.4 MB a token each on the 1B shape (2 of its 112 matrices).
WIDER_GROUPS: dict[str, dict[tuple[str, str], str]] = {
    "int4": {("first", "down"): "int8", ("last", "down"): "int8"},
}


def group_scheme(quant: str, group: str, num_layers: int) -> str:
    """The format of one matmul group's weights ("layers.{i}.qkv|wo|gate_up|down"): --quant's,
    unless `WIDER_GROUPS` keeps it wider. The head's is `head_scheme`'s."""
    parts = group.split(".")
    if len(parts) != 3 or parts[0] != "layers":
        return quant
    i = int(parts[1])
    where = "first" if i == 0 else "last" if i == num_layers - 1 else "middle"
    return WIDER_GROUPS.get(quant, {}).get((where, parts[2]), quant)


def _qkv(g: GraphBuilder, x: Act, get, i: int, quant_for, eps: float) -> Act:
    p = f"layers.{i}."
    w = np.concatenate([get(p + "wq"), get(p + "wk"), get(p + "wv")], axis=0)
    return g.fully_connected(g.rms_norm(x, get(p + "attn_norm"), eps), quant_for(w, p + "qkv"), "qkv")


def _layer(g: GraphBuilder, x: Act, attn: Act, get, i: int, quant_for, eps: float,
           down_rotation: np.ndarray | None) -> Act:
    p = f"layers.{i}."

    def fc(t: Act, name: str, group: str) -> Act:
        return g.fully_connected(t, quant_for(get(p + name), p + group), name)

    h = g.add(x, fc(attn, "wo", "wo"))
    n = g.rms_norm(h, get(p + "ffn_norm"), eps)
    a = g.mul(g.silu(fc(n, "w_gate", "gate_up")), fc(n, "w_up", "gate_up"))
    if down_rotation is not None:
        a = g.rotate_blocks(a, down_rotation)
    return g.add(h, fc(a, "w_down", "down"))
