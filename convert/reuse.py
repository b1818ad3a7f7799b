"""The calibration tokens' embedding rows, gathered once from the rotated table.

The calibration streams (convert/sweep.py: smoothing's and GPTQ's) start from the rows of
their tokens, not from the whole [V, D] table: `CalibrationRows` rotates the table once,
keeps the rows of the tokens' ids and lets the table go (1.6 GB of float32 on the 3B shape,
which is read by blocks of rows instead: convert/table.py).
The rows are the table's own, so the streams are bit for bit what the whole table gives.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from convert.table import Table


class _Rows:
    """table[ids] for the ids it was made with, as `embed[s]` would give them."""

    def __init__(self, table, ids: np.ndarray):
        self.ids = ids
        self.rows = table.gather(ids) if isinstance(table, Table) else table[ids]   # a Table: by blocks

    def __getitem__(self, s) -> np.ndarray:
        return self.rows[np.searchsorted(self.ids, s)]


class CalibrationRows:
    """`get` with "embed" answered by the rows of `segments`' tokens (made on first use)."""

    def __init__(self, get: Callable[[str], np.ndarray], segments: list[np.ndarray], table=None):
        """table: the rotated embedding as a convert.table.Table, read by blocks, instead of
        get("embed") whole."""
        self._get, self._ids, self._rows, self._table = get, np.unique(np.concatenate(segments)), None, table

    def __call__(self, name: str):
        if name != "embed":
            return self._get(name)
        if self._rows is None:
            self._rows = _Rows(self._get("embed") if self._table is None else self._table, self._ids)
        return self._rows

    def on(self, get: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
        """The same rows in front of another accessor whose "embed" is the same table."""
        return lambda name: self("embed") if name == "embed" else get(name)
