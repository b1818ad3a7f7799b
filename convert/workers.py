"""The conversion's worker threads.

The rounding of a layer splits into pieces that do not depend on each other: the chunks of
rows of GPTQ's column loop (rows are independent given the Hessian's factor), the chunks of
rows of the clip search, a group's Hessian factorisation beside the rounding of the group
before it, smoothing's candidate scales. They run on a small pool of threads; NumPy releases
the GIL in its matmuls and ufuncs, where they spend their time.

Each piece is computed by exactly the calls, on exactly the shapes, that running the pieces
one after another makes, and its result lands by its index, not by when it finishes. The
pieces are never re-cut to fit the pool: OpenBLAS's results depend on a call's shapes (a
matmul's columns split in two round differently from the whole), and each call runs on one
BLAS thread (convert.CONVERT_THREADS). So the bundle is bit for bit the same with any number
of workers. There is no barrier: a worker descheduled by another process holds up only its
own piece, not every step, as a multi-threaded BLAS's does.

One worker runs every piece in the caller's thread, in order: the sequential conversion.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_size: int | None = None             # None: default_workers()
_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def default_workers() -> int:
    """One worker per core this process may use (the runtime's `auto` takes all cores too)."""
    from edge.model.backends import default_threads
    return default_threads()


def count() -> int:
    """The number of workers pieces run on now."""
    return _size if _size is not None else default_workers()


@contextmanager
def limited(n: int | None) -> Iterator[int]:
    """Run pieces on n workers (None: `default_workers`) inside the block; the pool is shut
    down when the block ends."""
    global _size
    if n is not None and n < 1:
        raise ValueError(f"workers must be at least 1, got {n}")
    with _lock:
        old, _size = _size, n
        _shutdown()
    try:
        yield count()
    finally:
        with _lock:
            _size = old
            _shutdown()


def _shutdown() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None


def _mark_worker() -> None:
    _local.worker = True


def _executor() -> ThreadPoolExecutor | None:
    """The pool, or None when pieces run in the caller: one worker, or a piece submitting
    pieces of its own (waiting for them on a bounded pool could leave no worker free)."""
    global _pool
    if getattr(_local, "worker", False):
        return None
    with _lock:
        n = count()
        if n <= 1:
            return None
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="edge-llm-convert",
                                       initializer=_mark_worker)
        return _pool


def submit(fn: Callable[..., R], *args) -> Future:
    """fn(*args) on a worker (or here and now, see `_executor`); its Future."""
    pool = _executor()
    if pool is not None:
        return pool.submit(fn, *args)
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as e:
        done.set_exception(e)
    return done


def map_ordered(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """[fn(item) for item in items], the items spread over the workers; results in order.
    Every piece is finished when this returns, also when one of them raised."""
    futures = [submit(fn, item) for item in items]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            if not f.cancel():
                f.exception()            # wait for it: no piece outlives the call
