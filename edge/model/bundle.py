"""A converted model on disk, and the one place that knows its layout.

    manifest.json   format version, config, quantization, tokenizer/chat facts, tensor index,
                    size and sha256 of every other file, and its own sha256 (manifest_sha256)
    tokenizer.json  Hugging Face `tokenizers` format, whatever the source format was
    model.tflite    the weight matmuls as a TFLite graph (int8 / int4 / int4-b32 / f16 / f32)
    weights.bin     the tensors NumPy reads, each at a 16 KB-aligned offset (Pi 5 pages), and in
                    f32/f16 bundles every float tensor, for the NumPy reference backend

The tensor index may point into either file. The embedding table (`embedding()`, format in
the manifest's "embedding"): in an integer bundle of a tied model it is the lm_head's weight
buffer inside model.tflite (int8 / int4 / int4-b32 rows, as the head is quantized; per-row
scales in weights.bin, block scales in model.tflite next to the rows), plus what undoes the
head's rewrites (embed_divisor, embed_norm, embed_rotation_*; edge/model/embedding.py): one
copy, not two. Untied integer bundles keep int8 rows + scales in weights.bin; float bundles
the float table.

Loading checks the format version and every file's hash before anything else reads it, and
refuses a damaged bundle with a message naming the bad file. Tensors are memory-mapped, but
the embedding table's rows are read one by one as tokens ask for them (`tensor_rows`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.model.config import ModelConfig

FORMAT_VERSION = 2      # 2: the tied embedding is read from the lm_head's rows in model.tflite
MANIFEST = "manifest.json"
ALIGN = 16384   # Raspberry Pi OS runs the Pi 5 with 16 KB pages
VERIFIED_STAMP = ".verified.json"


class BundleError(ValueError):
    """A bundle we refuse to load; the message names the file and the problem."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The manifest's own hash: sha256 of its canonical JSON without the `manifest_sha256` field
    (a bit flipped in manifest.json either breaks the JSON or changes this)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: Path) -> dict:
    """A small JSON file (a stamp, a manifest), or {} when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_stamp(path: Path, stamp: dict) -> None:
    """Best effort: a read-only bundle just gets hashed in full every time."""
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, path)
    except OSError:
        pass


def is_bundle(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_current(path: Path) -> bool:
    """A bundle in this edge-llm's format (one that `Bundle.open` will not refuse as old)."""
    return is_bundle(path) and read_json(Path(path) / MANIFEST).get("format_version") == FORMAT_VERSION


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: ModelConfig

    @classmethod
    def open(cls, path: Path, verify: bool | str = True) -> "Bundle":
        """verify: True checks sizes, re-hashing files whose stat changed since they last hashed
        clean; "full" hashes every file (what serve does before it loads: bit rot keeps size and
        mtime); False skips the files (the manifest's own hash is always checked)."""
        path = Path(path)
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{mpath}: missing; {path} is not an edge-llm bundle") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: damaged ({e})") from e
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath}: damaged (not a JSON object)")
        if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
            raise BundleError(f"{mpath}: sha256 does not match its content (damaged)")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{mpath}: format version {version!r}, this edge-llm reads {FORMAT_VERSION}; "
                              "convert the checkpoint again")
        try:
            bundle = cls(path, manifest, ModelConfig.from_dict(manifest["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{mpath}: damaged ({type(e).__name__}: {e})") from e
        if verify:
            bundle.verify(full=verify == "full")
        return bundle

    def verify(self, full: bool = False) -> None:
        """Check every file's size and sha256. Hashing a 1B bundle takes seconds on a Pi, so
        a stamp records each file's (size, mtime, inode) once it has hashed clean; later
        opens re-hash only files whose stat differs (any rewrite or replacement changes it).
        `full` (or EDGE_LLM_VERIFY=full) hashes everything: the only way to catch bit rot,
        which keeps size and mtime."""
        stamp_path = self.path / VERIFIED_STAMP
        full = full or os.environ.get("EDGE_LLM_VERIFY") == "full"
        stamp = {} if full else read_json(stamp_path)
        fresh = {}
        for name, info in self.manifest["files"].items():
            f = self.path / name
            if not f.is_file():
                raise BundleError(f"{f}: missing from the bundle")
            st = f.stat()
            if st.st_size != info["size"]:
                raise BundleError(f"{f}: size {st.st_size} != {info['size']} in the manifest (damaged)")
            key = [st.st_size, st.st_mtime_ns, st.st_ino, info["sha256"]]
            if stamp.get(name) != key and sha256_of(f) != info["sha256"]:
                raise BundleError(f"{f}: sha256 does not match the manifest (damaged)")
            fresh[name] = key
        if fresh != stamp:
            _write_stamp(stamp_path, fresh)

    @property
    def quant(self) -> str:
        return self.manifest["quant"]

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    def file(self, name: str) -> Path:
        return self.path / name

    def _tensor_entry(self, name: str) -> dict:
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise BundleError(f"{self.path / MANIFEST}: no tensor {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor (its stored dtype)."""
        t = self._tensor_entry(name)
        return np.memmap(self.path / t["file"], dtype=np.dtype(t["dtype"]), mode="r",
                         offset=t["offset"], shape=tuple(t["shape"]))

    def tensor_rows(self, name: str):
        """One tensor's rows, each read from the file when asked (`FileRows`: nothing mapped)."""
        from edge.model.embedding import FileRows
        t = self._tensor_entry(name)
        return FileRows(self.path / t["file"], t["offset"], tuple(t["shape"]), np.dtype(t["dtype"]))

    @property
    def has_graph(self) -> bool:
        return "model.tflite" in self.manifest["files"]

    @property
    def has_float_weights(self) -> bool:
        """All float tensors stored (f32/f16 bundles): what the NumPy reference backend reads."""
        return self.has_tensor("layers.0.wq")

    def has_tensor(self, name: str) -> bool:
        return name in self.manifest["tensors"]

    def embedding(self):
        """The embedding lookup (edge/model/embedding.py) over memory-mapped rows."""
        from edge.model.embedding import Embedding, OrthogonalFactors
        spec = self.manifest.get("embedding") or {"scheme": "float"}
        opt = lambda n: self.tensor(n) if self.has_tensor(n) else None
        rotation = (OrthogonalFactors(np.asarray(self.tensor("embed_rotation_signs")),
                                      np.asarray(self.tensor("embed_rotation_r")))
                    if self.has_tensor("embed_rotation_signs") else None)
        divisor, norm = opt("embed_divisor"), opt("embed_norm")
        return Embedding(self.tensor_rows("embed"), spec["scheme"], self.config.hidden_size, opt("embed_scale"),
                         int(spec.get("block_size", 0)),
                         None if divisor is None else np.asarray(divisor),
                         None if norm is None else np.asarray(norm), rotation)

    def tokenizer(self):
        from tokenizers import Tokenizer
        path = self.path / self.manifest["tokenizer"]
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:        # tokenizers raises its own Exception subclass with serde's text
            raise BundleError(f"{path}: not a readable tokenizer ({e}); convert the checkpoint again") from e
