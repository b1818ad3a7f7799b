"""Orthogonal rotations folded into the float weights: outliers spread out, math unchanged.

LLM activations carry a few huge channels. XNNPACK quantizes each activation row to int8 at
run time, and int4 weights quantize each row with one scale, so a few large values cost every
other value its resolution. Rotating by an orthogonal Q spreads each large channel over all
of them (QuaRot, Ashkboos et al. 2024), and Q can be folded into weights that exist already:

  residual stream x -> x Q. First the RMSNorm weights move into the matmuls that read the
  normalized stream (rmsnorm(x) = x / rms(x) commutes with Q: rms(x Q) = rms(x)), then
      embed -> embed Q                         (the lookup table the runtime reads)
      wq, wk, wv, w_gate, w_up, lm_head -> (W diag(norm)) Q     norms become 1
      wo, w_down -> Q^T W                      (they write into the stream)
  attention values, per head: v -> v H (H orthogonal, head_dim wide), so
      wv rows of each KV head -> H^T wv_j;  wo columns of each query head -> wo_h H
  (attention mixes v linearly, so every query head sharing KV head j sees v_j H).
  MLP hidden state a = silu(gate) * up, the input of w_down: nothing linear precedes it, so
  this one rotation runs in the graph (`down_rotation`, a [B, B] block Hadamard applied to
  each block of B channels, B = 64 where the width allows: 64 MACs per channel, nothing
  next to w_down's), with w_down's columns rotated to match: w_down -> Q^T w_down Hb.

The q/k outputs are untouched, and the one op the graph gains is the small block rotation
before w_down. `weights()` reads an untied checkpoint (see convert.convert.untie): the lm_head is rotated
and norm-folded on its own, the embedding table only rotated.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from convert import workers

from edge.model.config import ModelConfig
from edge.model.embedding import OrthogonalFactors, hadamard

SEED = 20241123
DOWN_BLOCK = 64


def rotate_blocks(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """x [..., n] with each consecutive block of h.shape[0] channels multiplied by h."""
    b = h.shape[0]
    return (x.reshape(*x.shape[:-1], -1, b) @ h).reshape(x.shape)


def rotate_rows(w: np.ndarray, q: np.ndarray, rows: int = 4096) -> np.ndarray:
    """w @ q computed in place, a chunk of rows at a time: the 1B model's [V, D] tables are
    1 GB in float32, and `w @ q` would hold two of them. The chunks run on the conversion's
    workers (convert/workers.py), each the same call whatever their number."""
    def chunk(lo: int) -> None:
        w[lo:lo + rows] = w[lo:lo + rows] @ q
    workers.map_ordered(chunk, range(0, w.shape[0], rows))
    return w


def orthogonal_factors(n: int, seed: int = SEED) -> OrthogonalFactors:
    """The factors of `random_orthogonal(n, seed)`: row signs and the random block r, so that
    Q = diag(signs) kron(r, H) (the runtime applies Q from them: edge/model/embedding.py)."""
    rng = np.random.default_rng(seed + n)
    two = n & -n                                    # largest power of two dividing n
    m = n // two
    r = np.linalg.qr(rng.standard_normal((m, m)))[0] if m > 1 else np.ones((1, 1))
    signs = rng.choice([-1.0, 1.0], n)
    return OrthogonalFactors(signs, r)


def random_orthogonal(n: int, seed: int = SEED) -> np.ndarray:
    """An orthogonal [n, n] matrix that spreads every coordinate over all n: a Hadamard block
    for the power-of-two factor of n, a random orthogonal one (QR) for the rest, random
    signs on the rows. float64 for exact folding; cast when applied."""
    f = orthogonal_factors(n, seed)
    return f.signs[:, None] * np.kron(f.r, hadamard(n // f.r.shape[0]))


class Rotation:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.q = random_orthogonal(cfg.hidden_size).astype(np.float32)
        self.q_factors = orthogonal_factors(cfg.hidden_size)    # the same Q, for the embedding lookup
        self.h = random_orthogonal(cfg.head_dim, SEED + 1).astype(np.float32)
        block = np.gcd(cfg.intermediate_size, DOWN_BLOCK)
        self.down_rotation = random_orthogonal(block, SEED + 2).astype(np.float32) if block >= 16 else None

    def table_rows(self, name: str, w: np.ndarray, final_norm: np.ndarray | None = None) -> np.ndarray:
        """Rows of "embed" (rotated) or "lm_head" (the final norm folded in, then rotated), in
        place: the whole table or a block of its rows (convert/table.py)."""
        if name == "lm_head":
            w *= final_norm
        return rotate_rows(w, self.q)

    def table(self, name: str, t, final_norm: np.ndarray | None = None):
        """A convert.table.Table of "embed" or "lm_head" with the rotation `weights` gives it."""
        return t.then(lambda w: self.table_rows(name, w, final_norm))

    def weights(self, get: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
        """An accessor over `get`'s names (plus "lm_head") returning rotated float tensors."""
        cfg, q, h = self.cfg, self.q, self.h
        hd = cfg.head_dim

        def per_head(w: np.ndarray, heads: int, rows: bool) -> np.ndarray:
            if rows:                                 # [heads*hd, K]: H^T w_j per head
                return np.einsum("dk,jdn->jkn", h, w.reshape(heads, hd, -1)).reshape(w.shape)
            return (w.reshape(w.shape[0], heads, hd) @ h).reshape(w.shape)   # w_h H per head

        def rotated(name: str) -> np.ndarray:
            layer, _, kind = name.rpartition(".")
            if name in ("embed", "lm_head"):
                return self.table_rows(name, get(name), get("final_norm") if name == "lm_head" else None)
            if name == "final_norm" or kind in ("attn_norm", "ffn_norm"):
                return np.ones_like(get(name))
            if kind in ("wq", "wk", "wv"):
                w = (get(name) * get(f"{layer}.attn_norm")) @ q
                return per_head(w, cfg.num_kv_heads, rows=True) if kind == "wv" else w
            if kind in ("w_gate", "w_up"):
                return (get(name) * get(f"{layer}.ffn_norm")) @ q
            if kind == "wo":
                return q.T @ per_head(get(name), cfg.num_heads, rows=False)
            if kind == "w_down":
                w = get(name)
                return q.T @ (w if self.down_rotation is None else rotate_blocks(w, self.down_rotation))
            return get(name)
        return rotated
