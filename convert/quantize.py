"""Weight quantizers for the graph's FULLY_CONNECTED weights ([N, K], HF's [out, in] layout).

Every scheme returns a `QuantizedWeight` that holds exactly the bytes the .tflite file stores,
plus `dequantize()` so tests and the NumPy reference backend can reproduce the graph's math.

Schemes (all symmetric, zero point 0, as XNNPACK's hybrid FC kernels require):
    f32, f16      float reference paths
    int8          per output channel, clipping ratio searched per channel (0.80..1.00)
    int4          per output channel, clipping ratio searched per channel (0.70..1.00)
    int4-b32      blocks of 32 along K, fp16 scales (XNNPACK requires fp16 block scales)

XNNPACK converts fp16 block scales to bfloat16 (round to nearest even) when it packs the
weights (measured: its outputs match bf16 scales to 5e-7 and fp16 ones only to 2e-3). So
block scales are chosen on the bf16 grid, stored exactly as fp16, and `dequantize()` applies
them as bf16: the error the search minimises is the error the runtime produces.

Scales are searched over clipping ratios per channel/block, minimising the squared
reconstruction error, weighted per input column by `importance` when the converter has
calibration statistics (E[x^2]: then it is the expected output error). Clipping the rare
large weights buys resolution for the many small ones, most of all with int4's 16 levels.
Ratio 1.00 is in every grid, so the search is never worse than plain max-abs scaling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from convert import workers
from edge.model.embedding import bf16_round as _bf16, unpack_int4   # the runtime decodes with these too

SCHEMES = ("int8", "int4", "int4-b32", "f16", "f32")
DEFAULT_QUANT = "int8"          # below BIG_MODEL_PARAMS (the default SmolLM2-135M): see default_quant
BIG_MODEL_QUANT = "int4"
BIG_MODEL_PARAMS = 500_000_000
CLIP_RATIOS = np.linspace(0.70, 1.00, 16)       # int4
INT8_CLIP_RATIOS = np.linspace(0.80, 1.00, 11)  # int8: 255 levels, little to gain below 0.8
INT4_BLOCK = 32
_CHUNK_ELEMS = 1 << 22   # elements per chunk while quantizing (see _by_rows)


@dataclass(frozen=True)
class QuantizedWeight:
    """A [N, K] weight as stored in the graph file.

    data:   f32 [N, K] | f16 [N, K] | int8 [N, K] | int4 packed uint8 [N*K/2]
    scales: None (float) | f32 [N] (per channel) | f16 [N, K/block] (blockwise)
    """
    scheme: str
    shape: tuple[int, int]
    data: np.ndarray
    scales: np.ndarray | None = None
    block_size: int = 0

    def int_values(self) -> np.ndarray:
        """The integer levels [N, K] (int8) of a quantized weight."""
        if self.scheme == "int8":
            return self.data
        return unpack_int4(self.data, self.shape)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K] exactly as the runtime sees the weight."""
        if self.scheme in ("f32", "f16"):
            return self.data.astype(np.float32)
        q = self.int_values().astype(np.float32)
        if self.block_size:
            n, k = self.shape
            s = _BLOCK.load(self.scales)[:, :, None]
            return (q.reshape(n, k // self.block_size, self.block_size) * s).reshape(n, k)
        return q * self.scales[:, None]


def default_quant(parameter_count: int) -> str:
    """The --quant a checkpoint gets when none is asked for (README, Defaults). Below half a
    billion parameters int8: quality decides, the bundle is small either way. From there int4:
    decode reads every weight once a token, so int4 decodes about 1.9x as fast as int8 on the
    1B shape, in 0.61 GiB instead of 1.17, with a lower mean KL than llama.cpp's Q4_0 on
    every suite text."""
    return BIG_MODEL_QUANT if parameter_count >= BIG_MODEL_PARAMS else DEFAULT_QUANT


def quantize(w: np.ndarray, scheme: str, importance: np.ndarray | None = None) -> QuantizedWeight:
    """Quantize a float [N, K] matrix with one of `SCHEMES`.

    importance [K] (optional): how much an error in each input column costs, e.g.
    E[x_k^2] of the activations the matrix meets. The clip search then minimises
    sum_k importance_k * err_k^2, the expected squared error of the output, instead of the
    plain weight error.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a [N, K] matrix, got shape {w.shape}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    imp = np.ones(shape[1], np.float32) if importance is None else np.asarray(importance, np.float32)
    if imp.shape != (shape[1],):
        raise ValueError(f"importance must have shape ({shape[1]},), got {imp.shape}")
    if scheme == "f32":
        return QuantizedWeight(scheme, shape, w)
    if scheme == "f16":
        return QuantizedWeight(scheme, shape, w.astype(np.float16))
    if scheme == "int8":
        q, scale = _by_rows(_search_int8, w[:, None, :], _CHANNEL, imp[None])
        return QuantizedWeight(scheme, shape, q.reshape(shape), scale.reshape(-1))
    if scheme == "int4":
        if shape[1] % 2:
            raise ValueError(f"int4 needs an even K, got {shape}")
        q, scale = _by_rows(_search_int4, w[:, None, :], _CHANNEL, imp[None])
        return QuantizedWeight(scheme, shape, pack_int4(q), scale.reshape(-1))
    if scheme == "int4-b32":
        if shape[1] % INT4_BLOCK:
            raise ValueError(f"int4-b32 needs K divisible by {INT4_BLOCK}, got {shape}")
        blocks = w.reshape(shape[0], -1, INT4_BLOCK)
        q, scale = _by_rows(_search_int4, blocks, _BLOCK, imp.reshape(-1, INT4_BLOCK))
        return QuantizedWeight(scheme, shape, pack_int4(q.reshape(shape)), scale, INT4_BLOCK)
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {SCHEMES}")


def runtime_scales(qw: QuantizedWeight) -> np.ndarray:
    """The scales [N, groups] as the runtime applies them (float32; bf16-rounded for blocks)."""
    if qw.block_size:
        return _BLOCK.load(qw.scales)
    return qw.scales.reshape(-1, 1).astype(np.float32)


def encode_levels(scheme: str, shape: tuple[int, int], q: np.ndarray, scales: np.ndarray) -> QuantizedWeight:
    """A `QuantizedWeight` from integer levels [N, K] (int8) and stored scales (as `quantize`
    returns them): for quantizers that choose the levels themselves (convert/gptq.py)."""
    if scheme == "int8":
        return QuantizedWeight(scheme, shape, np.ascontiguousarray(q, np.int8), scales)
    packed = pack_int4(q.reshape(shape))
    return QuantizedWeight(scheme, shape, packed, scales, INT4_BLOCK if scheme == "int4-b32" else 0)


@dataclass(frozen=True)
class _ScaleFormat:
    """How scales are stored (store: float32 -> file dtype) and applied (load: -> float32)."""
    store: Callable[[np.ndarray], np.ndarray]
    load: Callable[[np.ndarray], np.ndarray]
    dtype: type


_CHANNEL = _ScaleFormat(lambda s: s.astype(np.float32), lambda s: s, np.float32)
_BLOCK = _ScaleFormat(lambda s: _bf16(s).astype(np.float16),
                      lambda s: _bf16(s.astype(np.float32)), np.float16)


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    """An all-zero group gets scale 1 (its levels are 0 either way) instead of a 0 divisor."""
    return np.where(scale > 0, scale, 1).astype(np.float32)


def _by_rows(fn, groups: np.ndarray, fmt: _ScaleFormat, imp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply fn(groups, fmt, imp) -> (int8 levels, stored scales) chunk by chunk of rows.

    groups is [N, B, G]: B scale groups of G weights per row (per channel: B = 1, G = K);
    imp [B, G] weighs each weight's error. Chunking bounds the float temporaries (~16 MB
    each) whatever the matrix: the 1B model's tied embedding is 1 GB in float32 and must
    not be copied several times over.
    """
    q = np.empty(groups.shape, np.int8)
    scales = np.empty(groups.shape[:2], fmt.dtype)
    step = max(1, _CHUNK_ELEMS // (groups.shape[1] * groups.shape[2]))

    def rows(lo: int) -> None:
        q[lo:lo + step], scales[lo:lo + step] = fn(groups[lo:lo + step], fmt, imp)
    workers.map_ordered(rows, range(0, groups.shape[0], step))   # the same chunks on any number of workers
    return q, scales


def _search_int8(g: np.ndarray, fmt: _ScaleFormat, imp: np.ndarray):
    return _search_rows(g, fmt, imp, 127, INT8_CLIP_RATIOS)


def _search_int4(g: np.ndarray, fmt: _ScaleFormat, imp: np.ndarray):
    return _search_rows(g, fmt, imp, 7, CLIP_RATIOS)


def _search_rows(g: np.ndarray, fmt: _ScaleFormat, imp: np.ndarray, qmax: int,
                 ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Try every clipping ratio on a chunk of rows; keep each group's best scale.

    Levels run from -qmax-1 (int4: -8; int8 stays symmetric at -127) to qmax. Each candidate
    goes through the scale's storage and runtime rounding before it is tried, so the error
    minimised is the error the runtime sees.
    """
    lo = -qmax - 1 if qmax == 7 else -qmax
    amax = np.abs(g).max(axis=2)
    best_err = np.full(amax.shape, np.inf, np.float32)
    best = np.ones(amax.shape, fmt.dtype)
    for r in ratios:
        stored = fmt.store(_safe_scale(amax * r / qmax))
        s = fmt.load(stored)[..., None]
        err = (np.square(np.clip(np.rint(g / s), lo, qmax) * s - g) * imp).sum(axis=2)
        better = err < best_err
        best_err[better], best[better] = err[better], stored[better]
    s = fmt.load(best)[..., None]
    return np.clip(np.rint(g / s), lo, qmax).astype(np.int8), best


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Row-major int4 levels -> bytes: element 2i in the low nibble, 2i+1 in the high nibble."""
    flat = np.ascontiguousarray(q).reshape(-1).view(np.uint8)     # two's complement: low nibble = level
    out = np.empty(flat.size // 2, np.uint8)
    step = _CHUNK_ELEMS          # in chunks: the 1B head has 263 M levels
    for i in range(0, out.size, step):
        pair = flat[2 * i:2 * (i + step)]
        out[i:i + step] = (pair[0::2] & 0x0F) | (pair[1::2] << 4)
    return out
