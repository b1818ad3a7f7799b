"""The key/value cache of one sequence: K and V laid out contiguously per (layer, head), in
anonymous memory that the system commits only as rows are written and that gives rows back
(`release_from`) when the sequence shrinks or is evicted. How many rows each sequence may
hold is the engine's KV pool's business (engine/kv_pool.py); the layout that attention reads
is the same whatever a cache holds."""
from __future__ import annotations

import ctypes
import math
import mmap

import numpy as np

from edge.model.config import ModelConfig

BLOCK_TOKENS = 128      # the smallest unit of KV committed or given back (rounded up to whole pages)


class ContextFull(ValueError):
    """The sequence would not fit in the cache: `needed` tokens against a context of `max_ctx`."""

    def __init__(self, needed: int, max_ctx: int, message: str | None = None):
        self.needed, self.max_ctx = needed, max_ctx
        super().__init__(message or f"{needed} tokens do not fit in the context of {max_ctx} "
                                    "(at least one more is needed to answer)")


def block_tokens(cfg: ModelConfig, dtype=np.float32, page: int = mmap.PAGESIZE) -> int:
    """Tokens per block: a multiple of BLOCK_TOKENS whose rows (head_dim values each) fill
    whole memory pages, so a block can be given back to the system alone (4 KB pages on
    x86, 16 KB on a Raspberry Pi 5 kernel, 64 KB on some arm64 kernels)."""
    row = cfg.head_dim * np.dtype(dtype).itemsize
    per_page = page // math.gcd(page, row)
    return BLOCK_TOKENS * per_page // math.gcd(BLOCK_TOKENS, per_page)


def _anonymous(shape, dtype) -> tuple[np.ndarray, mmap.mmap]:
    """Zeros of `shape`, in a private anonymous mapping: nothing is committed until written."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape), buf


class KVCache:
    """K and V as [layers, kv_heads, capacity, head_dim] (capacity: max_ctx rounded up to a
    block): one step's attention reads one contiguous [kv_heads, length, head_dim] slice per
    layer, shared by the grouped heads. Rows past `committed` hold nothing: their memory
    belongs to the system until a pool grants them (engine/kv_pool.py)."""

    def __init__(self, cfg: ModelConfig, max_ctx: int, dtype=np.float32):
        self.block = block_tokens(cfg, dtype)
        capacity = -(-max_ctx // self.block) * self.block
        shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k, self._kbuf = _anonymous(shape, dtype)
        self.v, self._vbuf = _anonymous(shape, dtype)
        self.max_ctx = max_ctx
        self.committed = capacity       # rows granted by a pool (all of them for a cache of its own)
        self.tokens: list[int] = []     # the token ids whose K/V are stored, in order
        # Leading rows computed exactly as a prefill from an empty cache computes them (whole
        # chunks at chunk-aligned positions); only these may be reused: see CausalLM.reusable
        self.canonical = 0

    @property
    def length(self) -> int:
        return len(self.tokens)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype=np.float32) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize   # K and V

    @property
    def token_bytes(self) -> int:
        return 2 * self.k.shape[0] * self.k.shape[1] * self.k.shape[3] * self.k.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the rows this cache may hold now (what a pool has granted it)."""
        return self.committed * self.token_bytes

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_ctx:
            raise ContextFull(self.length + n_new, self.max_ctx,
                              f"{self.length} cached + {n_new} new tokens exceed the context of {self.max_ctx}")
        if self.length + n_new > self.committed:
            raise ContextFull(self.length + n_new, self.committed,
                              f"{self.length} cached + {n_new} new tokens exceed the {self.committed} rows "
                              "of KV memory granted to this sequence")

    def append(self, tokens) -> None:
        """Record tokens whose K/V the layers have just written at the next positions."""
        self.tokens.extend(int(t) for t in tokens)

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (their slots get overwritten later)."""
        del self.tokens[n:]
        self.canonical = min(self.canonical, n)

    def erase(self, start: int, end: int) -> None:
        """Zero the K/V rows [start, end) past the recorded tokens (a rejected draft's), so
        the arrays hold exactly what a run that never wrote them holds."""
        if start < self.length:
            raise ValueError(f"erase: row {start} holds a recorded token")
        self.k[:, :, start:end] = 0
        self.v[:, :, start:end] = 0

    def release_from(self, n: int) -> None:
        """Give the memory of every row from `n` (rounded up to a block) back to the system;
        those rows read as zeros again, as in a cache never written. `committed` becomes that
        bound: the caller (the pool) grants rows past it again before they are written."""
        if n < self.length:
            raise ValueError(f"release_from: row {n} holds a recorded token")
        start = -(-n // self.block) * self.block
        capacity = self.k.shape[2]
        if start < capacity and hasattr(mmap.mmap, "madvise"):
            row = self.k.shape[3] * self.k.itemsize            # bytes per token in one (layer, head)
            span = capacity * row
            for buf in (self._kbuf, self._vbuf):
                if start == 0:
                    buf.madvise(mmap.MADV_DONTNEED)
                    continue
                for i in range(self.k.shape[0] * self.k.shape[1]):
                    buf.madvise(mmap.MADV_DONTNEED, i * span + start * row, span - start * row)
        elif start < capacity:              # no madvise here: zeros at least keep the contents right
            self.k[:, :, start:] = 0
            self.v[:, :, start:] = 0
        self.committed = min(self.committed, start)

    def resident_bytes(self) -> int | None:
        """Bytes of K and V the system holds in memory now (mincore); None where unknown."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            total = 0
            for a in (self.k, self.v):
                pages = -(-a.nbytes // mmap.PAGESIZE)
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.nbytes), vec) != 0:
                    return None
                total += sum(b & 1 for b in bytes(vec)) * mmap.PAGESIZE
            return total
        except (OSError, AttributeError):
            return None

    def common_prefix(self, ids) -> int:
        """How many leading ids are already cached (prefix reuse)."""
        return common_prefix(self.tokens, ids)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
