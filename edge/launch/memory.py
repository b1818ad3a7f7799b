"""Giving memory back after a big request, for every interface."""
from __future__ import annotations

BIG_REQUEST = 1 << 16        # bytes: after reading or tokenizing this much, give the memory back


def release_free_memory() -> None:
    """glibc keeps what a big request freed (the tokenizer peaked at ~600 MB for a 1 MB prompt)
    in its arenas; malloc_trim hands it back to the system, so RSS falls back afterwards."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
