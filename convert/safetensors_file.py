"""Lazy, zero-copy reading of .safetensors files (bf16 included, which NumPy lacks).

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
dtype/shape/byte offsets, then the raw data. Each tensor is read with plain file reads, in
chunks, straight into its float32 array when it is converted: nothing is memory-mapped, so
the pages of tensors already converted do not stay in the process's resident set (a mapped
2.5 GB checkpoint would count whole towards the peak RSS), and a bf16 tensor costs its
float32 size, not three times it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from convert.checkpoint import CheckpointError

READ_CHUNK = 1 << 24      # bytes per read while loading a tensor
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

    def names(self) -> list[str]:
        return list(self.entries)

    def load(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or its rows lo:hi) as a fresh float32 array (bf16 is the top half of a
        float32)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = np.dtype(_DTYPES[e["dtype"]])
        count = (end - begin) // dtype.itemsize
        shape = list(e["shape"])
        if rows is not None:
            per_row = count // shape[0] if shape and shape[0] else 0
            lo, hi = max(0, rows[0]), min(shape[0], rows[1])
            begin, count, shape[0] = begin + lo * per_row * dtype.itemsize, max(0, hi - lo) * per_row, max(0, hi - lo)
        bf16 = e["dtype"] == "BF16"
        out = np.empty(count, np.uint32 if bf16 else np.float32)
        step = READ_CHUNK // dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            for lo in range(0, count, step):
                n = min(step, count - lo)
                chunk = np.fromfile(f, dtype=dtype, count=n)
                if len(chunk) != n:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
                out[lo:lo + n] = chunk
        if bf16:
            out <<= 16
            out = out.view(np.float32)
        return out.reshape(shape)
