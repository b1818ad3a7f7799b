"""Lazy, zero-copy reading of .safetensors files (bf16 included, which NumPy lacks).

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
dtype/shape/byte offsets, then the raw data. We memory-map the file and view each tensor in
place, so a tensor costs memory only when it is converted.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from convert.checkpoint import CheckpointError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise CheckpointError(f"{self.path}: header length {n} exceeds the file size (truncated?)")
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {self.data_start + end} "
                                      f"but the file has {size} bytes (truncated?)")
            if e["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        self._map = None

    def names(self) -> list[str]:
        return list(self.entries)

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16 is the top half of a float32)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[name]
        begin, end = e["data_offsets"]
        raw = self._map[self.data_start + begin:self.data_start + end]
        arr = raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])
        if e["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)
