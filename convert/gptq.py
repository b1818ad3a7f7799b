"""GPTQ: round a weight column by column, pushing each column's rounding error onto the
columns not yet rounded, weighted by the Hessian of the matmul's inputs (Frantar et al. 2022).

For y = x W^T, the output error of a quantized Q over calibration inputs X [T, K] is
tr((W - Q) H (W - Q)^T) with H = X^T X. Round-to-nearest ignores H; GPTQ walks the columns
in order, rounds column k, and moves the error onto columns k+1.. along H^-1's Cholesky row,
so correlated inputs cancel each other's errors. Rows are independent (H is shared), so the
work goes chunk of rows by chunk of rows, in bounded memory.

The grid is the graph's: scales come first from convert/quantize.py's clip search (per
channel, or bf16 block scales for int4-b32, weighted by E[x^2]), then GPTQ only chooses the
integer levels under those fixed scales. The result is a `QuantizedWeight` exactly like
`quantize()`'s: the graph writer and the runtime see nothing new.

`Hessians` takes the inputs X of every matmul group from a float forward pass of the weights
actually quantized (after rotation and smoothing: the pass on the rewritten weights sees
x / s), run lazily as the graph writer reaches each layer, so memory holds one layer's inputs
and factors (the 1B model's w_down H alone is 8192^2 f32 = 256 MB), never all of them; a
layer's factors are made on the conversion's workers (convert/workers.py) while the writer
rounds the groups before them.
A conversion feeds it from its one pass over the layers (convert/sweep.py); `collect` runs a
pass of its own over any weights.
The pass reads GPTQ_TOKENS tokens of the calibration text (convert/calibration.py).
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Callable, Iterator

import numpy as np

from convert import workers
from convert.calibration import GROUPS, matmul_inputs
from convert.prefetch import Prefetch
from convert.quantize import QuantizedWeight, encode_levels, quantize, runtime_scales
from edge.model.config import ModelConfig

DAMP = 0.01           # fraction of mean(diag H) added to the diagonal (the reference's 1 %) ...
SCHEME_DAMP = {"int8": 0.1, "int4": 0.03}   # ... but int8's (chosen on held-out calibration text) and int4's (on the development text: docs/QUANTIZATION.md)
BLOCK = 128           # columns per lazy batch update
ACT_ORDER = True      # columns in descending diag(H) order (README: int4 +17.6 % -> +15.8 % on SmolLM2)
PREFETCH_GROUPS = 2   # calibration inputs made ahead of the rounding: the pass overlaps a layer's rounding
_CHUNK_ELEMS = 1 << 23    # weight elements per chunk of rows (32 MB f32; larger chunks, fewer Python-level column steps)


def damping(scheme: str) -> float:
    """The damping GPTQ uses for a weight of this scheme. Measured on SmolLM2: int8 on the
    calibration text's held-out tokens, +0.28 % / top-1 96.5 % at 0.1 against +0.39 % / 96.3 %
    at 0.01; per-channel int4 on the development text, mean KL 0.2085 / 99th percentile 1.45
    at 0.03 against 0.2187 / 1.64 at 0.01 (docs/QUANTIZATION.md)."""
    return SCHEME_DAMP.get(scheme, DAMP)


def levels_range(scheme: str) -> tuple[int, int]:
    return (-127, 127) if scheme == "int8" else (-8, 7)


def prepare(h: np.ndarray, damp: float = DAMP, act_order: bool = ACT_ORDER, overwrite: bool = False,
            perm: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(U, perm, dead): the upper Cholesky factor of (H + damp*mean(diag)*I)^-1 (only its upper
    triangle is meaningful, and only that is read), the column order (None: natural), and the
    columns no calibration input ever reached (in natural order). overwrite: H may be used as
    scratch space. perm: H is already in this column order (`Hessians` permutes X instead, to
    avoid a second K x K copy)."""
    dtype = np.float64 if h.shape[0] <= 4096 else np.float32     # 1B w_down: 8192^2, f32 halves it
    h = np.asarray(h, dtype) if overwrite else np.array(h, dtype)     # becomes U, in place
    if act_order and perm is None:
        perm = np.argsort(-np.diag(h), kind="stable")
        h = h[np.ix_(perm, perm)]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    if perm is not None:
        dead = dead[_inverse(perm)]
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    # H = L L^T with L lower  =>  H^-1 = (J L^-1 J)^T (J L^-1 J), J the reversal: U = J L^-1 J
    # is the upper Cholesky factor of H^-1, with one factorisation and one triangular inverse,
    # both done in place in H's own buffer (np.linalg would hold 3-4 more copies of it: 1 GB
    # for the 1B model's w_down).
    _reverse(h)
    _cholesky_in_place(h)
    _invert_lower_in_place(h)
    _reverse(h)
    return (h if h.dtype == np.float32 else h.astype(np.float32)), perm, dead


_PANEL = 512      # rows per block of the in-place factorisations: temporaries are [_PANEL, K]


def _reverse(a: np.ndarray) -> None:
    """a <- J a J (rows and columns reversed) in place, a block of rows at a time."""
    n = a.shape[0]
    for r0 in range(0, n // 2, _PANEL):
        r1 = min(r0 + _PANEL, n // 2)
        top = a[r0:r1, ::-1].copy()
        a[r0:r1] = a[n - r1:n - r0][::-1, ::-1]       # rows n-1-r0 .. n-r1, each reversed
        a[n - r1:n - r0] = top[::-1]
    if n % 2:
        a[n // 2] = a[n // 2, ::-1].copy()


def _cholesky_in_place(a: np.ndarray) -> None:
    """a (symmetric positive definite; its lower triangle is read) <- L, lower, a = L L^T;
    the strict upper triangle is zeroed. Blocked, right-looking."""
    n = a.shape[0]
    for k0 in range(0, n, _PANEL):
        k1 = min(k0 + _PANEL, n)
        lkk = np.linalg.cholesky(np.tril(a[k0:k1, k0:k1]) + np.tril(a[k0:k1, k0:k1], -1).T)
        a[k0:k1, k0:k1] = lkk
        a[k0:k1, k1:] = 0
        if k1 == n:
            break
        a[k1:, k0:k1] = a[k1:, k0:k1] @ np.linalg.inv(lkk).T        # the panel below: A_ik L_kk^-T
        panel = a[k1:, k0:k1]
        for r0 in range(k1, n, _PANEL):                              # trailing lower part -= P P^T
            r1 = min(r0 + _PANEL, n)
            a[r0:r1, k1:r1] -= panel[r0 - k1:r1 - k1] @ panel[:r1 - k1].T


def _invert_lower_in_place(a: np.ndarray) -> None:
    """a (lower triangular, zero above) <- a^-1, block row by block row: from L X = I,
    X_i,<i = -L_ii^-1 (L_i,<i X_<i,<i), where X_<i,<i is already in place above."""
    n = a.shape[0]
    for i0 in range(0, n, _PANEL):
        i1 = min(i0 + _PANEL, n)
        xii = np.tril(np.linalg.inv(a[i0:i1, i0:i1]))
        if i0:
            a[i0:i1, :i0] = -xii @ (a[i0:i1, :i0] @ a[:i0, :i0])
        a[i0:i1, i0:i1] = xii


def gptq_quantize(w: np.ndarray, scheme: str, h: np.ndarray | tuple, importance: np.ndarray | None = None,
                  damp: float | None = None, act_order: bool = ACT_ORDER) -> QuantizedWeight:
    """Quantize w [N, K] to `scheme` (int8, int4, int4-b32) with GPTQ under H [K, K] (or a
    `prepare(H, damping(scheme))` result, to reuse one factorisation for several weights of a
    group). damp None: `damping(scheme)`."""
    if scheme not in ("int8", "int4", "int4-b32"):
        return quantize(w, scheme, importance)
    w = np.ascontiguousarray(w, dtype=np.float32)
    n, k = w.shape
    u, perm, dead = prepare(h, damping(scheme) if damp is None else damp, act_order) \
        if isinstance(h, np.ndarray) else h
    if u.shape != (k, k):
        raise ValueError(f"Hessian {u.shape} does not match weight {w.shape}")
    rtn = quantize(w, scheme, importance)          # the scales: the clip search's, fixed from here on
    s = runtime_scales(rtn)                         # [N, groups] float32 as the runtime applies them
    stored_scales = rtn.scales
    del rtn                                         # its levels: 263 MB for the 1B head, not needed
    col_group = np.arange(k) // (k // s.shape[1])   # which scale each column uses
    lo, hi = levels_range(scheme)
    q = np.empty((n, k), np.int8)
    step = max(1, _CHUNK_ELEMS // k)
    unperm = None if perm is None else _inverse(perm)
    cols = col_group if perm is None else col_group[perm]

    def rows(r0: int) -> None:                      # one chunk: the same call on any worker
        wt = w[r0:r0 + step].T.copy()               # [K, R]: a column is a contiguous row here
        wt[dead] = 0.0
        if perm is not None:
            wt = wt[perm]
        levels = _gptq_columns(wt, np.ascontiguousarray(s[r0:r0 + step].T), cols, u, lo, hi)
        q[r0:r0 + step] = (levels if unperm is None else levels[unperm]).T
    workers.map_ordered(rows, range(0, n, step))   # chunks never re-cut: the bytes are the same on any count
    return encode_levels(scheme, (n, k), q, stored_scales)


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def _gptq_columns(wt: np.ndarray, st: np.ndarray, cols: np.ndarray, u: np.ndarray, lo: int, hi: int
                  ) -> np.ndarray:
    """The lazy-batch GPTQ loop over the columns of a chunk of rows, held transposed: wt [K, R]
    (modified in place), st [G, R] the scales, cols [K] which of them each column uses.
    Returns the int8 levels [K, R]. Transposed, each column's update is contiguous: 2-5x
    faster than walking strided columns of [R, K] (same levels)."""
    k, r = wt.shape
    q = np.empty((k, r), np.int8)
    err = np.empty((BLOCK, r), np.float32)
    lv = np.empty(r, np.float32)
    upd = np.empty((BLOCK, r), np.float32)          # each column's update, in place of a fresh temporary
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, sc, e = w1[i], st[cols[i1 + i]], err[i]
            np.clip(np.rint(np.divide(col, sc, out=lv), out=lv), lo, hi, out=lv)
            q[i1 + i] = lv
            np.subtract(col, np.multiply(lv, sc, out=e), out=e)
            e /= u1[i, i]
            d = upd[:i2 - i1 - i]
            np.subtract(w1[i:], np.multiply(u1[i, i:, None], e, out=d), out=w1[i:])
        if i2 < k:
            wt[i2:] -= u[i1:i2, i2:].T @ err[:i2 - i1]
    return q


def _factor(x: np.ndarray, damp: float, act_order: bool) -> tuple:
    """`prepare`'s (U, perm, dead) from a group's inputs X [T, K] (taken over: X is freed)."""
    perm = None
    if act_order:                                   # descending diag(H) = column sums of x^2
        perm = np.argsort(-np.einsum("tk,tk->k", x, x), kind="stable")
        x = x[:, perm]
    h = x.T @ x
    del x
    return prepare(h, damp, act_order, overwrite=True, perm=perm)


def _rest_of_layer(group: str) -> list[str]:
    """`group` and the groups after it in its layer ("layers.3.wo" -> wo, gate_up, down), or
    just [group] outside the layers. Never the next layer's: taking its inputs early would
    let the pass make one more layer."""
    layer, _, kind = group.rpartition(".")
    if not layer.startswith("layers.") or kind not in GROUPS:
        return [group]
    return [f"{layer}.{g}" for g in GROUPS[GROUPS.index(kind):]]


class Hessians:
    """The Hessian H = X^T X of each matmul group's calibration inputs, made when the graph
    writer asks for it. The float forward pass (`matmul_inputs`) is advanced lazily, group by
    group; the writer asks in the order the pass yields (qkv, wo, gate_up, down of each layer,
    then the head), so only one layer's inputs and factors exist at a time, and
    nothing is written to disk (4096 tokens of the 1B model's inputs would be 3.7 GB)."""

    def __init__(self, inputs: Iterator[tuple[str, np.ndarray]], groups: set[str], n_tokens: int,
                 on_group: Callable[[str], None] = lambda g: None):
        self._inputs, self._groups, self._on_group = inputs, groups, on_group
        self.n_tokens = n_tokens
        self._pending: dict[str, np.ndarray] = {}      # yielded by the pass, not yet asked for
        self._taken: set[str] = set()                  # groups whose inputs were asked for
        self._last: tuple[str, tuple, tuple] | None = None   # (group, (damp, act_order), factor)
        self._ahead: dict[str, tuple[tuple, Future]] = {}    # the layer's factors, being made

    @classmethod
    def collect(cls, get: Callable[[str], np.ndarray], cfg: ModelConfig, tokens: list[np.ndarray],
                down_rotation: np.ndarray | None = None,
                on_group: Callable[[str], None] = lambda g: None) -> "Hessians":
        """A float forward pass of `get` (the weights as they will be quantized) over tokens
        (segments, as `matmul_inputs` takes them), run as its groups are asked for."""
        groups = {f"layers.{i}.{g}" for i in range(cfg.num_layers) for g in GROUPS} | {"head"}
        # The pass runs on a thread of its own, at most a layer ahead of the rounding (memory
        # holds two layers' inputs at most): convert/prefetch.py
        return cls(Prefetch(matmul_inputs(get, cfg, tokens, down_rotation), ahead=PREFETCH_GROUPS,
                            name="edge-llm-calibration"), groups, sum(len(s) for s in tokens), on_group)

    def __contains__(self, group: str) -> bool:
        return group in self._groups

    def inputs(self, group: str) -> np.ndarray:
        """X [T, K] of one group; each group's inputs can be taken once."""
        self._taken.add(group)
        while group not in self._pending:
            try:
                name, x = next(self._inputs)
            except StopIteration:
                raise KeyError(f"no calibration inputs (left) for {group!r}") from None
            self._pending[name] = x
            self._on_group(name)
        return self._pending.pop(group)

    def hessian(self, group: str) -> np.ndarray:
        x = self.inputs(group)
        return x.T @ x

    def prepared(self, group: str, damp: float = DAMP, act_order: bool = ACT_ORDER,
                 damp_of: Callable[[str], float] | None = None) -> tuple:
        """`prepare`'s (U, perm, dead) for a group, made once: its inputs can be taken once, so
        a group's weights must all ask with the same settings. damp_of(g): the damping the
        layer's later groups will ask with (made ahead); None: `damp` for all of them."""
        if self._last is not None and self._last[0] == group:
            if self._last[1] != (damp, act_order):
                raise ValueError(f"{group}: prepared with {self._last[1]}, asked with {(damp, act_order)}")
            return self._last[2]
        self._last = None                           # free the previous group's factor first
        for g in [g for g in self._ahead if g.rpartition(".")[0] != group.rpartition(".")[0]]:
            del self._ahead[g]                     # another layer's, never asked for
        if group not in self._ahead:
            # The rest of the layer's factors are made on the workers while the writer rounds
            # the groups before them, the widest (w_down's) first: it takes longest.
            rest = [g for g in _rest_of_layer(group)
                    if g in self._groups and g not in self._ahead and (g == group or g not in self._taken)]
            inputs = {g: self.inputs(g) for g in rest}
            for g in sorted(rest, key=lambda g: -inputs[g].shape[1]):
                d = damp if damp_of is None or g == group else damp_of(g)
                self._ahead[g] = ((d, act_order), workers.submit(_factor, inputs.pop(g), d, act_order))
        settings, future = self._ahead.pop(group)
        if settings != (damp, act_order):
            raise ValueError(f"{group}: prepared with {settings}, asked with {(damp, act_order)}")
        self._last = (group, settings, future.result())
        return self._last[2]

    def release(self) -> None:
        """Let go of the factors made so far (the next group's is made when asked for)."""
        self._last = None
        self._ahead = {}

    def close(self) -> None:
        self._last, self._ahead = None, {}
        self._pending.clear()
        self._inputs.close()

    def __enter__(self) -> "Hessians":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
