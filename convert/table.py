"""A [V, D] float table (the embedding, the lm_head) read and transformed a block of rows at a time.

The Llama 3 vocabulary makes these the largest tensors: 128256 x 3072 on the 3B shape, 1.6 GB
in float32, as much as the conversion's whole memory budget allows beside a layer. Every
transform a table gets is row by row (rotation: w Q, the final norm folded into the lm_head's
columns, smoothing's column scales), and so is every quantizer, so none of them needs the table
whole: a `Table` reads rows lo:hi from the checkpoint (`Checkpoint.rows`) and applies its
transforms to them when asked, and the readers (the calibration rows, the smoothing search,
the head's quantization: convert/llama_graph.by_row_blocks) ask for blocks.

A table computed by blocks equals the whole table up to float rounding (the matmul of a block
may sum in another order than the matmul of the whole), so only tables above STREAM_ELEMS are
read this way; smaller ones are made whole, as before, and their bundles are unchanged.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from convert import workers

STREAM_ELEMS = 1 << 25          # tables above this (128 MB of float32) are read by blocks of rows
BLOCK_ELEMS = 1 << 24           # values per block while gathering rows (64 MB of float32)


class Table:
    """Rows of a [V, D] float32 table on demand: `t[lo:hi]` (a fresh array), `take(rows)`,
    `gather(ids)`. `then(f)` adds a row-wise transform (f may rewrite its argument in place)."""

    ndim = 2

    def __init__(self, shape: tuple[int, int], load: Callable[[int, int], np.ndarray],
                 transforms: tuple[Callable[[np.ndarray], np.ndarray], ...] = ()):
        self.shape, self._load, self._transforms = tuple(shape), load, transforms

    def __len__(self) -> int:
        return self.shape[0]

    def then(self, f: Callable[[np.ndarray], np.ndarray]) -> "Table":
        return Table(self.shape, self._load, self._transforms + (f,))

    def _made(self, block: np.ndarray) -> np.ndarray:
        for f in self._transforms:
            block = f(block)
        return block

    def __getitem__(self, s: slice) -> np.ndarray:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("a Table gives contiguous blocks of rows; use take() for other rows")
        lo, hi, _ = s.indices(self.shape[0])
        return self._made(self._load(lo, hi))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows` (sorted, unique) only: each read on its own, transformed together."""
        return self._made(np.concatenate([self._load(int(r), int(r) + 1) for r in rows]))

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """table[ids] for sorted unique ids, by blocks of rows: every row is read once."""
        out = np.empty((len(ids), self.shape[1]), np.float32)
        step = max(1, BLOCK_ELEMS // self.shape[1])

        def block(lo: int) -> None:                   # a block on a worker (convert/workers.py)
            at = np.flatnonzero((ids >= lo) & (ids < lo + step))
            if len(at):
                out[at] = self[lo:lo + step][ids[at] - lo]
        workers.map_ordered(block, range(0, self.shape[0], step))
        return out


def streamed(ckpt, name: str, source: str) -> Table | None:
    """`source`'s table of the checkpoint as a Table under `name`, or None when it is small
    enough to make whole or the reader cannot read rows."""
    V, D = ckpt.config.vocab_size, ckpt.config.hidden_size
    if V * D <= STREAM_ELEMS or source not in ckpt.row_loaders:
        return None
    return Table((V, D), lambda lo, hi: ckpt.rows(source, lo, hi))
