"""The embedding lookup: rows of a table in the bundle, read per token (`FileRows`) and
decoded to float32 for the tokens asked.

Where the rows live is the bundle's business (edge/model/bundle.py): in an integer bundle of
a tied model they are the lm_head's own weight bytes inside model.tflite, so the table is
stored once; elsewhere a table of their own in weights.bin. Formats (`Embedding.scheme`):

    int8        int8 [V, D] and one f32 scale per row (the head's per-channel scales)
    int4        int4 [V, D] packed two per byte (element 2i in the low nibble), f32 per row
    int4-b32    int4 as above with fp16 scales [V, D / block] that the runtime applies as
                bfloat16 (XNNPACK converts them so); `block_size` values per scale
    float       f32 / f16 [V, D] rows, no scales

The graph's lm_head may have been rewritten for quantization (convert/smoothing.py scales its
columns by s; convert/rotation.py folds the final norm n into it, in the rotated basis Q).
The lookup undoes both exactly, per token: x = row / s, then ((x Q^T) / n) Q, with Q applied
from its factors (`OrthogonalFactors`) in O(D log D), never as a [D, D] matrix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def bf16_round(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Row-major int4 bytes (element 2i in the low nibble, 2i+1 in the high one) -> int8 levels."""
    packed = np.ascontiguousarray(packed).view(np.uint8)
    lo = (packed << 4).view(np.int8) >> 4
    hi = packed.view(np.int8) >> 4
    return np.stack([lo, hi], axis=-1).reshape(shape)


def hadamard(n: int) -> np.ndarray:
    """Sylvester's orthonormal Hadamard matrix, n a power of two."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@dataclass(frozen=True)
class OrthogonalFactors:
    """Q = diag(signs) kron(r, H_two), H_two Sylvester's orthonormal Hadamard matrix: what
    convert/rotation.py's `random_orthogonal` builds. Applied without forming Q: H_two is
    kron(H_a, H_b) with a, b <= 64, so x Q is three small matmuls (D = 2048: ~0.2 M MACs a
    row, against 4 M for the dense [D, D] product)."""
    signs: np.ndarray        # [D]
    r: np.ndarray            # [m, m], m = D / two

    @cached_property
    def _parts(self):
        m = self.r.shape[0]
        two = len(self.signs) // m
        b = 1 << min(6, two.bit_length() - 1)
        f32 = lambda a: np.asarray(a, np.float32)
        return f32(self.signs), f32(self.r), f32(self.r.T), f32(hadamard(two // b)), f32(hadamard(b))

    def apply(self, x: np.ndarray, transpose: bool = False) -> np.ndarray:
        """x [T, D] @ Q (or @ Q^T), float32."""
        signs, r, r_t, ha, hb = self._parts
        t, d = x.shape
        if not transpose:
            x = x * signs
        y = ha @ (x.reshape(t, r.shape[0], ha.shape[0], hb.shape[0]) @ hb)
        y = ((r if transpose else r_t) @ y.reshape(t, r.shape[0], -1)).reshape(t, d)
        return y * signs if transpose else y


class FileRows:
    """Rows of a [V, ...] table stored in a file at `offset`, read with one pread per row asked
    (`rows[tokens]`). The rows sit in the page cache, shared and reclaimable, as a memory map's
    would, but none is mapped into this process: a mapped row brings the kernel's whole
    fault-around window or page-cache folio (64 KB, up to 2 MB with large folios) into its
    RSS, and a prompt of varied tokens touches most of Llama 3's 188 MB int4 table."""

    def __init__(self, path, offset: int, shape: tuple[int, ...], dtype):
        import weakref
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._offset = offset
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens)
        flat = ids.reshape(-1).tolist()
        out = np.empty((len(flat),) + self.shape[1:], self.dtype)
        view = out.view(np.uint8).reshape(len(flat), self.row_bytes)
        for i, t in enumerate(flat):
            if not 0 <= t < self.shape[0]:
                raise IndexError(f"row {t} is outside a table of {self.shape[0]} rows")
            if os.preadv(self._fd, [view[i]], self._offset + t * self.row_bytes) != self.row_bytes:
                raise OSError(f"short read of row {t}: the file is shorter than its table")
        return out.reshape(ids.shape + self.shape[1:])


class Embedding:
    """tokens [T] -> float32 [T, D]; see the module docstring."""

    def __init__(self, rows: np.ndarray, scheme: str, dim: int, scales: np.ndarray | None = None,
                 block_size: int = 0, divisor: np.ndarray | None = None, norm: np.ndarray | None = None,
                 rotation: OrthogonalFactors | None = None):
        if scheme not in ("int8", "int4", "int4-b32", "float"):
            raise ValueError(f"unknown embedding format {scheme!r}")
        self.rows, self.scheme, self.dim, self.scales, self.block_size = rows, scheme, dim, scales, block_size
        self.divisor, self.norm, self.rotation = divisor, norm, rotation

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        r = self.rows[tokens]
        if self.scheme == "float":
            x = r.astype(np.float32)
        elif self.scheme == "int8":
            x = r.astype(np.float32)
            x *= self.scales[tokens, None]
        else:
            x = unpack_int4(r, (len(tokens), self.dim)).astype(np.float32)
            if self.block_size:
                s = bf16_round(self.scales[tokens].astype(np.float32))
                x = (x.reshape(len(tokens), -1, self.block_size) * s[..., None]).reshape(len(tokens), self.dim)
            else:
                x *= self.scales[tokens, None]
        if self.divisor is not None:
            x /= self.divisor
        if self.rotation is not None:
            x = self.rotation.apply(self.rotation.apply(x, transpose=True) / self.norm)
        return x
