"""Transformed weights made once and handed to every reader that needs them.

A conversion reads a layer's float weights in three places: smoothing's calibration pass and
its scale search (the rotated weights), GPTQ's calibration pass and the graph writer (the
rotated and smoothed weights). Making a tensor costs a read of the checkpoint and a rotation
(a D x D matmul per weight), so each is made once per place and shared by that place's
readers, not made per read: `Reuse` keeps a tensor until it has been read `reads` times, and
only for the layers nearest the one read last, so memory holds about one layer.
`CalibrationRows` gives the calibration passes the embedding rows of the calibration tokens,
gathered once from the rotated table, so the [V, D] table is rotated once, not once per pass.

The tensors are the same arrays the readers would have made, so the bundle is bit for bit
the same; readers must not write into them (none does).
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" else None


class Reuse:
    """An accessor over `get` that shares each layer tensor between its first `reads` reads."""

    def __init__(self, get: Callable[[str], np.ndarray], reads: int = 2, window: int = 1):
        self._get, self._reads, self._window = get, reads, window
        self._kept: dict[str, tuple[np.ndarray, int]] = {}
        self.made = 0                     # tensors made (for tests)
        self._lock = threading.Lock()     # GPTQ's pass reads on a thread of its own (convert/prefetch.py)

    def __call__(self, name: str) -> np.ndarray:
        i = _layer(name)
        if i is None:
            return self._get(name)
        with self._lock:
            return self._shared(name, i)

    def _shared(self, name: str, i: int) -> np.ndarray:
        for other in [n for n in self._kept if abs(_layer(n) - i) > self._window]:
            del self._kept[other]         # a layer left behind: its readers are done with it
        kept = self._kept.pop(name, None)
        if kept is None:
            kept = (self._get(name), 0)
            self.made += 1
        t, count = kept[0], kept[1] + 1
        if count < self._reads:
            self._kept[name] = (t, count)
        return t

    def clear(self) -> None:
        self._kept.clear()


class _Rows:
    """table[ids] for the ids it was made with, as `embed[s]` would give them."""

    def __init__(self, table: np.ndarray, ids: np.ndarray):
        self.ids = ids
        self.rows = table[ids]

    def __getitem__(self, s) -> np.ndarray:
        return self.rows[np.searchsorted(self.ids, s)]


class CalibrationRows:
    """`get` with "embed" answered by the rows of `segments`' tokens (made on first use)."""

    def __init__(self, get: Callable[[str], np.ndarray], segments: list[np.ndarray]):
        self._get, self._ids, self._rows = get, np.unique(np.concatenate(segments)), None

    def __call__(self, name: str):
        if name != "embed":
            return self._get(name)
        if self._rows is None:
            self._rows = _Rows(self._get("embed"), self._ids)
        return self._rows

    def on(self, get: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
        """The same rows in front of another accessor whose "embed" is the same table."""
        return lambda name: self("embed") if name == "embed" else get(name)
