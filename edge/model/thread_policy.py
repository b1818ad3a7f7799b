"""How many threads the next piece of work gets, chosen by timing the work as it runs
(`--threads auto`, the default).

Why not simply "all cores": every parallel op of XNNPACK's thread pool (and of OpenBLAS)
ends in a barrier, so an op is as slow as its slowest thread. Beside busy processes the
kernel deschedules one of our threads for a whole time slice (milliseconds) while the others
spin at the barrier, and an op of tens of microseconds takes milliseconds; one thread has no
barrier and loses only its share of the CPU. On a quiet machine N threads are faster. The
load on a Pi next to speech-to-text and text-to-speech changes from second to second, so
both are kept ready and timed (docs/SPEED.md has the measurements):

- per key (a kind of work of about constant cost per unit: a decode step, a prefill row of a
  chunk size, one layer of a conversion), each candidate first gets `warmup` units in turn;
- then the candidate with the lowest recent cost (median of its last `window` samples; a probe's
  one fresh sample for a candidate not in use) runs;
- after `interval` units one unit runs on the best other candidate (a probe). The interval
  grows while probes confirm the choice (so that a probe of a candidate r times slower costs
  at most `probe_budget` of the time) and drops back to `min_interval` when the choice
  changes, or when the chosen candidate suddenly runs `surprise` times slower than its recent
  median (the load changed: look again at once).

The logic is pure: `choose` and `record` depend only on what was recorded, so tests inject
times. Callers time the work with `timed` (or their own clock).
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from statistics import median
from typing import Hashable, Iterator, Sequence

AUTO = "auto"


def available_cores() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_threads(value: str | int | None) -> int | str | None:
    """A --threads value: "auto" or a positive count (None: not given)."""
    if value is None or value == AUTO:
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--threads takes a positive number or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"--threads takes a positive number or 'auto', got {value!r}")
    return n


def thread_choices(threads: int | str | None, cores: int | None = None) -> tuple[int, ...]:
    """The thread counts to keep ready: (n,) for a fixed count; for "auto" (or None) one thread
    and all cores, or just (1,) on a single core."""
    threads = parse_threads(threads)
    if isinstance(threads, int):
        return (threads,)
    cores = cores or available_cores()
    return (1, cores) if cores > 1 else (1,)


def rows_key(rows: int) -> int:
    """A key for a forward pass of `rows` rows: its power-of-two bucket (1, 2, 4, 8, ...), so
    decode steps, speculative verification and prefill chunks are timed apart."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass
class _KeyState:
    samples: dict[int, deque] = field(default_factory=dict)
    best: int | None = None
    since_probe: int = 0
    interval: int = 0
    probe: int | None = None        # the candidate a probe is running on


class ThreadPolicy:
    def __init__(self, candidates: Sequence[int], warmup: int = 2, window: int = 3,
                 min_interval: int = 8, max_interval: int = 128, probe_budget: float = 0.05,
                 surprise: float = 2.0):
        if not candidates:
            raise ValueError("ThreadPolicy needs at least one candidate")
        self.candidates = tuple(dict.fromkeys(candidates))
        self.warmup, self.window = warmup, window
        self.min_interval, self.max_interval = min_interval, max_interval
        self.probe_budget, self.surprise = probe_budget, surprise
        self._keys: dict[Hashable, _KeyState] = {}

    def _state(self, key: Hashable) -> _KeyState:
        s = self._keys.get(key)
        if s is None:
            s = self._keys[key] = _KeyState({c: deque(maxlen=self.window) for c in self.candidates},
                                            interval=self.min_interval)
        return s

    def cost(self, key: Hashable, threads: int) -> float | None:
        """The recent cost per unit of `threads` on `key` (None: not measured yet)."""
        samples = self._state(key).samples[threads]
        return median(samples) if samples else None

    def choose(self, key: Hashable) -> int:
        """The thread count the next unit of `key` should run with."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        s = self._state(key)
        unmeasured = [c for c in self.candidates if len(s.samples[c]) < self.warmup]
        if s.best is None and unmeasured:          # warm-up: the least measured first, in the candidates' order
            return min(unmeasured, key=lambda c: len(s.samples[c]))
        if s.since_probe >= s.interval:
            s.probe = min((c for c in self.candidates if c != s.best), key=lambda c: self.cost(key, c))
            return s.probe
        return s.best

    def record(self, key: Hashable, threads: int, seconds: float, units: float = 1.0) -> None:
        """`units` units of `key` took `seconds` on `threads` threads."""
        if len(self.candidates) == 1:
            return
        s = self._state(key)
        cost = seconds / max(units, 1e-9)
        was_probe = s.probe is not None and threads == s.probe
        if threads == s.best and not was_probe:
            before = self.cost(key, threads)
            s.since_probe += 1
            if before is not None and cost > self.surprise * before and s.since_probe < s.interval:
                s.interval = s.since_probe          # probe the others next time
        if was_probe:       # a candidate not in use: its older samples are out of date
            s.samples[threads].clear()
        s.samples[threads].append(cost)
        if s.best is None and any(len(s.samples[c]) < self.warmup for c in self.candidates):
            return
        old = s.best
        s.best = min(self.candidates, key=lambda c: (self.cost(key, c), self.candidates.index(c)))
        others = [self.cost(key, c) for c in self.candidates if c != s.best]
        ratio = min(others) / max(self.cost(key, s.best), 1e-12)
        need = min(math.ceil((ratio - 1) / self.probe_budget), 16 * self.max_interval)  # probes cost <= budget
        if old is None or s.best != old:        # a new choice: check it again soon
            s.since_probe, s.interval = 0, max(self.min_interval, min(need, self.max_interval))
        elif was_probe:                         # confirmed: look less often
            s.since_probe, s.interval = 0, max(need, self.min_interval, min(self.max_interval, 2 * s.interval))
        if was_probe:
            s.probe = None

    @contextmanager
    def timed(self, key: Hashable, units: float = 1.0) -> Iterator[int]:
        """`with policy.timed(key) as threads:` run one unit with `threads`; its time is recorded."""
        threads = self.choose(key)
        t0 = time.perf_counter()
        yield threads
        self.record(key, threads, time.perf_counter() - t0, units)

    def summary(self) -> dict:
        """{key: {"best": threads, "cost": {threads: seconds per unit}}} for logs and benchmarks."""
        return {k: {"best": s.best, "cost": {c: self.cost(k, c) for c in self.candidates}}
                for k, s in self._keys.items()}

