"""A one-line progress bar on stderr (quiet when stderr is not a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.done, self.t0 = 0, time.monotonic()
        self.tty = stream.isatty()

    def step(self, what: str = "") -> None:
        self.done += 1
        if self.tty:
            width = 30
            filled = width * self.done // max(self.total, 1)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} {what[:40]:<40}")
            self.stream.flush()

    def close(self) -> None:
        msg = f"{self.label}: {self.done}/{self.total} done in {time.monotonic() - self.t0:.1f}s"
        self.stream.write(("\r" + msg + " " * 40 + "\n") if self.tty else msg + "\n")
        self.stream.flush()
