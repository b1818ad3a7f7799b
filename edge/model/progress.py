"""Progress of a long phase on stderr, with its rate and time left.

On a terminal one line is redrawn: `label [####......] 12/30 2.1/s ETA 9s  what`. When stderr is
not a terminal nothing is drawn unless `verbose` (or EDGE_LLM_PROGRESS=1), then a plain line
every `every` seconds. The closing line (`label: 30/30 done in 14.2s (2.1/s)`) is always
written: it is what a log keeps of the phase.

`watch_file` reports the growth of a file another library writes (XNNPACK's weight cache) on
the same kind of line, from a thread, until the block it guards ends.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PROGRESS_ENV = "EDGE_LLM_PROGRESS"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, total: float, label: str, stream=None, unit: str = "", scale: float = 1.0,
                 verbose: bool | None = None, every: float = 10.0, clock=time.monotonic):
        """total in units of `unit` (shown divided by `scale`: bytes as MB with unit "MB",
        scale 2**20)."""
        self.stream = sys.stderr if stream is None else stream
        self.total, self.label, self.unit, self.scale = total, label, unit, scale
        self.clock, self.every = clock, every
        self.done, self.t0 = 0.0, clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.verbose = os.environ.get(PROGRESS_ENV) == "1" if verbose is None else verbose
        self._last_line = self.t0

    def rate(self) -> float | None:
        """Units per second so far (None before the first unit)."""
        elapsed = self.clock() - self.t0
        return self.done / elapsed if self.done and elapsed > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate and self.total else None

    def status(self) -> str:
        """`12/30 2.1/s ETA 9s` (in the unit and scale given)."""
        fmt = (lambda v: f"{v / self.scale:.0f}") if self.scale != 1 else (lambda v: f"{v:g}")
        rate, eta = self.rate(), self.eta()
        text = f"{fmt(self.done)}/{fmt(self.total)}{' ' + self.unit if self.unit else ''}"
        text += f" {rate / self.scale:.1f}{' ' + self.unit if self.unit else ''}/s" if rate else " -/s"
        return text + (f" ETA {_duration(eta)}" if eta is not None else " ETA ?")

    def step(self, what: str = "", n: float = 1) -> None:
        self.update(self.done + n, what)

    def update(self, done: float, what: str = "") -> None:
        self.done = done
        if self.tty:
            width = 30
            filled = int(width * min(self.done / self.total, 1)) if self.total else 0
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.status()} {what[:30]:<30}")
            self.stream.flush()
        elif self.verbose and self.clock() - self._last_line >= self.every:
            self._last_line = self.clock()
            self.stream.write(f"{self.label}: {self.status()}\n")
            self.stream.flush()

    def close(self) -> None:
        elapsed = self.clock() - self.t0
        fmt = (lambda v: f"{v / self.scale:.0f}") if self.scale != 1 else (lambda v: f"{v:g}")
        rate = f" ({self.done / elapsed / self.scale:.1f}{' ' + self.unit if self.unit else ''}/s)" \
            if elapsed > 0 and self.done else ""
        msg = (f"{self.label}: {fmt(self.done)}/{fmt(self.total)}{' ' + self.unit if self.unit else ''}"
               f" done in {elapsed:.1f}s{rate}")
        self.stream.write(("\r" + msg + " " * 40 + "\n") if self.tty else msg + "\n")
        self.stream.flush()


@contextmanager
def watch_file(path_glob: tuple[Path, str], total: int, label: str, stream=None,
               interval: float = 0.5) -> Iterator[Progress]:
    """While the block runs, show the size of the newest file matching `path_glob`
    (directory, pattern) against `total` bytes. The closing line is written when it ends."""
    bar = Progress(total, label, stream, unit="MB", scale=2**20)
    stop = threading.Event()
    directory, pattern = path_glob

    def measure() -> None:
        sizes = []
        for p in Path(directory).glob(pattern):
            try:
                sizes.append(p.stat().st_size)
            except FileNotFoundError:       # renamed away meanwhile
                pass
        if sizes:
            bar.update(max(sizes))

    def poll() -> None:
        while not stop.wait(interval):
            measure()

    thread = threading.Thread(target=poll, name="progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        measure()
        bar.close()
