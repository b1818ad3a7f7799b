"""Every key/value field of a GGUF as plain Python values.

`gguf.GGUFReader` exposes each field as numpy views into the memory-mapped file, one view per
array element. `ReaderField.contents()` turns those into Python one element at a time, which is
slow for a 128k-token vocabulary; here numeric arrays are joined with a single numpy
concatenate and strings are decoded straight from their byte views.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Map every field name (including the reader's `GGUF.*` header fields) to its value:
    str for strings, int/float/bool for numbers, lists for arrays."""
    return {name: _value(field) for name, field in reader.fields.items()}


def _value(field: ReaderField) -> Any:
    kind = field.types[0]
    if kind != GGUFValueType.ARRAY:
        return _scalar(kind, field.parts[field.data[0]])
    if not field.data:
        return []
    if len(field.types) != 2:
        # The reader flattens nested arrays, so their shape is lost: refuse rather than guess.
        raise ValueError(f"GGUF field {field.name!r}: nested arrays are not supported")
    parts = [field.parts[i] for i in field.data]
    if field.types[1] == GGUFValueType.STRING:
        return [part.tobytes().decode("utf-8") for part in parts]
    return np.concatenate(parts).tolist()


def _scalar(kind: GGUFValueType, part: np.ndarray) -> Any:
    if kind == GGUFValueType.STRING:
        return part.tobytes().decode("utf-8")
    return part.tolist()[0]
