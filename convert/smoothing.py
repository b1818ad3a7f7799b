"""Activation-aware per-channel scales, folded into the float weights before quantization.

A matmul y = x W^T equals (x / s) (W * s)^T for any positive s over the input channels. Two
errors depend on s:
  - XNNPACK quantizes each row of x to int8 at run time (asymmetric, per row). A few large
    channels set the row's range and crush the others; dividing them by s evens the row out
    (SmoothQuant, Xiao et al. 2022).
  - int4 weights lose most where large activations meet them; scaling those columns up
    gives them more of the 16 levels (AWQ, Lin et al. 2023).
Both are one search. For each matmul group, try s = amax|x|^a / amax|W|^(1-a) over `ALPHAS`
(and s = 1), simulate the runtime's quantization of x / s and of W * s on calibration inputs
(convert/calibration.py), and keep the s whose output is closest to the float output. s = 1
is a candidate, so the chosen s is never worse than none on the calibration text.

Each 1/s lands exactly in a tensor that already exists; the graph gains no op:
    qkv      attn_norm /= s                 wq, wk, wv columns *= s
    wo       wv rows /= s (per KV channel)  wo columns *= s     attention is linear in v
    gate_up  ffn_norm /= s                  w_gate, w_up columns *= s
    down     w_up rows /= s                 w_down columns *= s  silu(g) * u is linear in u
    head     final_norm /= s                lm_head columns *= s (the model is untied first:
                                                                  the embedding table is untouched)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from convert import workers
from convert.calibration import matmul_inputs
from convert.quantize import quantize
from convert.table import Table
from edge.model.config import ModelConfig

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SEARCH_ROWS = 512          # output rows the search simulates (evenly spaced; s is per column)
_S_RANGE = (1e-4, 1e4)


def fake_quant_rows(x: np.ndarray) -> np.ndarray:
    """XNNPACK's dynamic activation quantization (qd8): each row to int8 with its own scale
    and zero point over [min(row, 0), max(row, 0)], then back to float."""
    lo = np.minimum(x.min(axis=1, keepdims=True), 0)
    hi = np.maximum(x.max(axis=1, keepdims=True), 0)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-128 - lo / scale), -128, 127)
    return (np.clip(np.rint(x / scale) + zero, -128, 127) - zero) * scale


def search_rows(w: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """The SEARCH_ROWS output rows the search simulates, evenly spaced, of w or of the
    concatenation of a list of weights (taken part by part: no concatenated copy)."""
    parts = w if isinstance(w, list) else [w]
    n = sum(len(p) for p in parts)
    rows = np.unique(np.linspace(0, n - 1, min(SEARCH_ROWS, n)).astype(int))
    if isinstance(w, Table):                        # read by rows: only these rows are read
        return w.take(rows)
    if not isinstance(w, list):
        return w[rows]
    out, start = [], 0
    for p in parts:
        out.append(p[rows[(rows >= start) & (rows < start + len(p))] - start])
        start += len(p)
    return np.concatenate(out)


def search_scale(x: np.ndarray, w: np.ndarray | list[np.ndarray], scheme: str,
                 tie: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> np.ndarray:
    """The s [K] for input x [T, K] and weight w [N, K] that minimises the simulated error.

    tie maps a per-channel statistic to one that respects a constraint (GQA: the query
    heads sharing a KV head must share s), by taking the max over each tied set.
    """
    w = search_rows(w)
    y = x @ w.T
    ax = np.maximum(tie(np.abs(x).max(axis=0)), 1e-8)
    aw = np.maximum(tie(np.abs(w).max(axis=0)), 1e-8)
    candidates = [np.ones(x.shape[1], np.float32)] + [np.clip(ax ** a / aw ** (1 - a), *_S_RANGE) for a in ALPHAS]

    def trial(s: np.ndarray) -> tuple[np.ndarray, float]:
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)   # centre the range near 1
        wq = quantize(w * s, scheme, input_importance(x / s)).dequantize()
        return s, float(np.square(fake_quant_rows(x / s) @ wq.T - y).sum())

    best, best_err = candidates[0], np.inf
    for s, err in workers.map_ordered(trial, candidates):   # in order: the same choice on any number of workers
        if err < best_err:                        # a NaN error (overflowing candidate) never wins
            best, best_err = s, err
    return best


def input_importance(x: np.ndarray) -> np.ndarray:
    """E[x_k^2] per input channel: what an error in weight column k costs the output."""
    return np.mean(np.square(x), axis=0) + 1e-12


class Smoothing:
    """Per-group scales for one checkpoint and scheme; `weights(get)` applies them, and
    `importance[group]` is E[x^2] of the smoothed input, for the quantizer's clip search."""

    def __init__(self, scales: dict[str, np.ndarray], importance: dict[str, np.ndarray],
                 cfg: ModelConfig):
        self.scales, self.importance, self.cfg = scales, importance, cfg

    @classmethod
    def fit(cls, get: Callable[[str], np.ndarray], cfg: ModelConfig, tokens: np.ndarray,
            scheme: str, head_scheme: str, on_group: Callable[[str], None] = lambda g: None,
            down_rotation: np.ndarray | None = None) -> "Smoothing":
        """down_rotation: the graph rotates w_down's input (convert/rotation.py); its channels
        are then mixtures, so no 1/s can fold into w_up and that group keeps s = 1."""
        sm = cls({}, {}, cfg)
        for group, x in matmul_inputs(get, cfg, tokens, down_rotation):
            sm.fit_group(group, x, get, scheme, head_scheme, down_rotation)
            on_group(group)
        return sm

    def fit_group(self, group: str, x: np.ndarray, get: Callable[[str], np.ndarray], scheme: str,
                  head_scheme: str, down_rotation: np.ndarray | None = None) -> None:
        """The scale and importance of one group from its input x (unsmoothed) and its
        unsmoothed weights (`get`, by the checkpoint's names)."""
        layer, _, kind = group.rpartition(".")
        w = lambda n: get(f"{layer}.{n}")
        if kind == "qkv":
            s = search_scale(x, [w("wq"), w("wk"), w("wv")], scheme)
        elif kind == "wo":
            s = search_scale(x, w("wo"), scheme, _kv_tie(self.cfg))
        elif kind == "gate_up":
            s = search_scale(x, [w("w_gate"), w("w_up")], scheme)
        elif kind == "down":
            s = (np.ones(x.shape[1], np.float32) if down_rotation is not None
                 else search_scale(x, w("w_down"), scheme))
        else:
            s = search_scale(x, get("lm_head"), head_scheme)
        self.scales[group] = s
        self.importance[group] = input_importance(x / s)

    def weights(self, get: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
        """An accessor with the same names as `get` whose tensors carry the scales. The
        embedding table is untouched: the graph's lm_head is its own tensor (see untie)."""
        cfg, s = self.cfg, self.scales
        per_v = lambda layer: s[f"{layer}.wo"].reshape(cfg.num_kv_heads, -1, cfg.head_dim)[:, 0].reshape(-1)

        def smoothed(name: str) -> np.ndarray:
            t = get(name)
            layer, _, kind = name.rpartition(".")
            col = lambda g: t * s[f"{layer}.{g}"][None, :]
            if kind == "attn_norm":
                return t / s[f"{layer}.qkv"]
            if kind in ("wq", "wk"):
                return col("qkv")
            if kind == "wv":
                return col("qkv") / per_v(layer)[:, None]
            if kind == "wo":
                return col("wo")
            if kind == "ffn_norm":
                return t / s[f"{layer}.gate_up"]
            if kind == "w_gate":
                return col("gate_up")
            if kind == "w_up":
                return col("gate_up") / s[f"{layer}.down"][:, None]
            if kind == "w_down":
                return col("down")
            if name == "final_norm":
                return t / s["head"]
            if name == "lm_head":
                t *= s["head"][None, :]             # in place: [V, D] is 1 GB on the 1B shape
                return t
            return t
        return smoothed


def _kv_tie(cfg: ModelConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Channels of the attention output [H*hd] that come from one v channel share a scale."""
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // KV

    def tie(stat: np.ndarray) -> np.ndarray:
        per_kv = stat.reshape(KV, G, hd).max(axis=1, keepdims=True)       # [KV, 1, hd]
        return np.broadcast_to(per_kv, (KV, G, hd)).reshape(H * hd)
    return tie
