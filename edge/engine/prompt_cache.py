"""A prompt cache on disk: the KV of known prefixes (a voice assistant's long system prompt),
kept across restarts so the first request after a reboot skips what it already computed.

One file per entry, `<key>.kv`, key = sha256 of (bundle identity, token ids):

    line 1     JSON header: format, bundle identity, token count, dtype, shape of K (and V),
               CRC-32 of everything after the header
    then       the token ids (int32), K, then V ([layers, kv_heads, n, head_dim] each)

Writes go to a temporary file in the same directory, are fsynced and renamed, so a crash
leaves either the old entry or the new one. The directory is bounded (`limit_bytes`): the
least recently used entries go first.

Verified: at start (`entries`) every header field is checked (type and range, the shape
against the token count and the file's size, the name against the tokens); at each restore
the data's CRC-32 and that every K/V value is finite. A file failing any check is ignored,
removed and logged, never loaded, and never stops the service from starting. CRC-32 (zlib)
because it is the cheapest check that catches damage (measured in docs, with sha256 and
blake2b); the cache guards against bit rot and broken writes, not against an attacker who
can write the service's own state directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.model.forward import PREFILL_CHUNK
from edge.model.kv_cache import KVCache

log = logging.getLogger("edge.prompt_cache")

# rows are whole prefill chunks (their values depend on the chunk layout): another chunk size is another format
FORMAT = f"edge-llm-kv-2-chunk{PREFILL_CHUNK}"
SUFFIX = ".kv"
MAX_HEADER = 4096
DTYPES = ("float32", "float16")


@dataclass
class Entry:
    path: Path
    tokens: list[int]


def snapshot(cache: KVCache, n: int, copy: bool = True) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The first n tokens of a cache and their K/V (copied, so the cache may change meanwhile)."""
    k, v = cache.k[:, :, :n], cache.v[:, :, :n]
    return cache.tokens[:n], (k.copy() if copy else k), (v.copy() if copy else v)


class PromptCache:
    def __init__(self, directory: Path, bundle_id: str, limit_bytes: int):
        self.dir = Path(directory)
        self.bundle_id = bundle_id          # the graph's sha256 (or the weights'): KV is only valid for it
        self.limit = limit_bytes
        self.dir.mkdir(parents=True, exist_ok=True)

    def key(self, tokens: list[int]) -> str:
        h = hashlib.sha256(self.bundle_id.encode())
        h.update(np.asarray(tokens, dtype=np.int32).tobytes())
        return h.hexdigest()[:32]

    # --- writing ------------------------------------------------------------------------
    def save(self, cache: KVCache, n: int | None = None) -> Path | None:
        """Store the first n (default: all) cached tokens' K/V; returns the file or None
        when it cannot fit the limit at all."""
        n = cache.length if n is None else n
        return self.write(*snapshot(cache, n, copy=False)) if n else None

    def write(self, tokens: list[int], k: np.ndarray, v: np.ndarray) -> Path | None:
        """`save` for K/V [layers, kv_heads, n, head_dim] taken from a cache (`snapshot`)."""
        n = len(tokens)
        ids = np.asarray(tokens, dtype=np.int32)
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        crc = zlib.crc32(v, zlib.crc32(k, zlib.crc32(ids)))
        header = json.dumps({"format": FORMAT, "bundle": self.bundle_id, "n": n, "dtype": str(k.dtype),
                             "shape": list(k.shape), "crc32": crc}).encode() + b"\n"
        size = len(header) + 4 * n + k.nbytes + v.nbytes
        if size > self.limit:
            return None
        path = self.dir / (self.key(tokens) + SUFFIX)
        self._evict(self.limit - size, keep=path)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(ids)
                f.write(k)
                f.write(v)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def _evict(self, budget: int, keep: Path) -> None:
        entries = sorted((p for p in self.dir.glob("*" + SUFFIX) if p != keep), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > budget:
            p = entries.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)

    # --- reading ------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Valid entries for this bundle, most recently used first; bad files are removed."""
        found = []
        for path in sorted(self.dir.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                header, tokens = self._read_header(path)
                found.append(Entry(path, tokens))
            except Exception as e:          # whatever is wrong with it: never a reason not to start
                log.warning("prompt cache: ignoring and removing %s: %s", path.name, e)
                path.unlink(missing_ok=True)
        for p in self.dir.glob(".*.tmp"):            # a write that was interrupted
            p.unlink(missing_ok=True)
        return found

    def _read_header(self, path: Path) -> tuple[dict, list[int]]:
        """The header, every field checked, and the tokens; ValueError naming what is wrong."""
        with open(path, "rb") as f:
            line = f.readline(MAX_HEADER)
            try:
                header = json.loads(line)
            except ValueError:
                raise ValueError("not a prompt-cache file") from None
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError("not a prompt-cache file of this version")
            if header.get("bundle") != self.bundle_id:
                raise ValueError("it belongs to another bundle")
            n, shape, dtype, crc = (header.get(k) for k in ("n", "shape", "dtype", "crc32"))
            if not _count(n) or n < 1:
                raise ValueError(f"damaged header: n = {n!r}")
            if dtype not in DTYPES:
                raise ValueError(f"damaged header: dtype = {dtype!r}")
            if not (isinstance(shape, list) and len(shape) == 4 and all(_count(x) and x > 0 for x in shape)
                    and shape[2] == n):
                raise ValueError(f"damaged header: shape = {shape!r} for n = {n!r}")
            if not _count(crc) or crc >= 1 << 32:
                raise ValueError(f"damaged header: crc32 = {crc!r}")
            want = len(line) + 4 * n + 2 * int(np.prod(shape)) * np.dtype(dtype).itemsize
            if os.fstat(f.fileno()).st_size != want:
                raise ValueError("truncated or damaged")
            tokens = np.frombuffer(f.read(4 * n), dtype=np.int32).tolist()
        if path.name != self.key(tokens) + SUFFIX:
            raise ValueError("its name does not match its tokens")
        return header, tokens

    def restore(self, entry: Entry, cache: KVCache, limit: int | None = None) -> int:
        """Load an entry's first `limit` (default: all) tokens into `cache` (replacing what it
        held); returns the tokens restored. ValueError when they do not fit the rows the cache
        holds, or the entry fails a check (then the file is removed: its data's CRC-32, finite
        values, and the header again)."""
        try:
            header, tokens = self._read_header(entry.path)
            n, shape = header["n"], tuple(header["shape"])
            m = n if limit is None else min(n, limit)
            if shape[:2] + shape[3:] != (cache.k.shape[0], cache.k.shape[1], cache.k.shape[3]) or m > min(
                    cache.max_ctx, cache.committed):
                raise _Unfit(f"{entry.path.name}: shape {shape} does not fit this cache")
            dtype = np.dtype(header["dtype"])
            with open(entry.path, "rb") as f:
                f.readline(MAX_HEADER)
                data = f.read()
            if zlib.crc32(data) != header["crc32"]:
                raise ValueError("its data fails its checksum (damaged)")
            count = int(np.prod(shape))
            k = np.frombuffer(data, dtype=dtype, count=count, offset=4 * n).reshape(shape)
            v = np.frombuffer(data, dtype=dtype, count=count, offset=4 * n + k.nbytes).reshape(shape)
            if not (np.isfinite(k).all() and np.isfinite(v).all()):
                raise ValueError("it holds values that are not finite (damaged)")
        except _Unfit:
            raise
        except Exception as e:
            log.warning("prompt cache: removing %s: %s", entry.path.name, e)
            entry.path.unlink(missing_ok=True)
            raise ValueError(f"{entry.path.name}: {e}") from e
        cache.truncate(0)
        cache.k[:, :, :m] = k[:, :, :m]
        cache.v[:, :, :m] = v[:, :, :m]
        cache.append(tokens[:m])
        cache.canonical = m - m % PREFILL_CHUNK     # stored from whole aligned prompt chunks
        os.utime(entry.path)                         # recently used
        return m


class _Unfit(ValueError):
    """A sound entry this cache cannot hold (a smaller context): kept for later."""


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
