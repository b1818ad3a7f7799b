"""An iterator run on a thread of its own, a bounded number of items ahead of its consumer.

The calibration pass (a float forward pass in NumPy, layer by layer: convert/sweep.py) and
the rounding of the weights it feeds (Hessian factorisation, GPTQ's column loop, the writer)
take turns when run on one thread. They depend on each other only through the pass's outputs, so the pass
can run one layer ahead on a second thread while the writer works on the layer before.

Each side runs its NumPy calls on its own thread with one BLAS thread (the conversion's
fixed BLAS pool): no barrier ties the two together, so beside busy processes each loses only
its share of the CPU, and every array is computed by exactly the operations the sequential
order would use, so the bundle is bit for bit the same. NumPy releases the GIL in its
matmuls and ufuncs, which is where both sides spend their time.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_ITEM, _END, _ERROR = range(3)


class Prefetch(Iterator[T]):
    """Iterates `source` on a daemon thread, holding at most `ahead` finished items (plus the
    one being made). Exceptions in the source are raised to the consumer. `close` stops the
    thread and closes the source (a generator's `finally` blocks run)."""

    def __init__(self, source: Iterator[T], ahead: int = 1, name: str = "edge-llm-prefetch"):
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as e:          # handed to the consumer, raised there
            self._put((_ERROR, e))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _put(self, entry) -> bool:
        """Queue an entry, waiting for room; False when the consumer has closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._done = True
        self._thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (it finishes the item it is making) and close the source."""
        self._done = True
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.5)         # make room for an entry it is putting
            except queue.Empty:
                pass
        self._thread.join()
