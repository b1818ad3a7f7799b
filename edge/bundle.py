"""A converted model on disk, and the one place that knows its layout.

    manifest.json   format version, config, quantization, tokenizer/chat facts, tensor index,
                    size and sha256 of every other file
    tokenizer.json  Hugging Face `tokenizers` format, whatever the source format was
    model.tflite    the weight matmuls as a TFLite graph (int8 / int4 / int4-b32 / f16 / f32)
    weights.bin     the tensors NumPy reads, each at a 16 KB-aligned offset (Pi 5 pages): the
                    embedding table (int8 rows + scales when the graph is quantized), and in
                    f32/f16 bundles every float tensor, for the NumPy reference backend

Loading checks the format version and every file's hash before anything else reads it, and
refuses a damaged bundle with a message naming the bad file. Tensors are memory-mapped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import ModelConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ALIGN = 16384   # Raspberry Pi OS runs the Pi 5 with 16 KB pages


class BundleError(ValueError):
    """A bundle we refuse to load; the message names the file and the problem."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def is_bundle(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: ModelConfig

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{mpath}: missing; {path} is not an edge-llm bundle") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: damaged ({e})") from e
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{mpath}: format version {version!r}, this edge-llm reads {FORMAT_VERSION}; "
                              "convert the checkpoint again")
        bundle = cls(path, manifest, ModelConfig.from_dict(manifest["config"]))
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for name, info in self.manifest["files"].items():
            f = self.path / name
            if not f.is_file():
                raise BundleError(f"{f}: missing from the bundle")
            if f.stat().st_size != info["size"]:
                raise BundleError(f"{f}: size {f.stat().st_size} != {info['size']} in the manifest (damaged)")
            if sha256_of(f) != info["sha256"]:
                raise BundleError(f"{f}: sha256 does not match the manifest (damaged)")

    @property
    def quant(self) -> str:
        return self.manifest["quant"]

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    def file(self, name: str) -> Path:
        return self.path / name

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor (its stored dtype)."""
        try:
            t = self.manifest["tensors"][name]
        except KeyError:
            raise BundleError(f"{self.path / MANIFEST}: no tensor {name!r}") from None
        return np.memmap(self.path / t["file"], dtype=np.dtype(t["dtype"]), mode="r",
                         offset=t["offset"], shape=tuple(t["shape"]))

    @property
    def has_graph(self) -> bool:
        return "model.tflite" in self.manifest["files"]

    @property
    def has_float_weights(self) -> bool:
        """All float tensors stored (f32/f16 bundles): what the NumPy reference backend reads."""
        return self.has_tensor("layers.0.wq")

    def has_tensor(self, name: str) -> bool:
        return name in self.manifest["tensors"]

    def tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.path / self.manifest["tokenizer"]))
