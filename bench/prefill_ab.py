"""Prefill variants side by side in one process: XNNPACK delegate flags × chunk rows.

    python bench/prefill_ab.py --model BUNDLE [-p 256] [--reps 3] [--flags none,0x43] [--chunks 64,128]

Each flags value loads the bundle's graph once (packed in memory, no weight cache; `none` =
LiteRT's defaults, otherwise the value replaces them, so keep QS8|QU8 = 0x3 in it), then every
repetition prefills the same random prompt with each (flags, chunk) in turn, so load from other
jobs falls on all variants alike. Prints the median t/s per variant and the largest difference
of its last-row logits from the first variant's (0: bit for bit the same). Run it in a quiet
window for figures that count (docs/SPEED.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edge.model.litert_runner as litert_runner  # noqa: E402
from edge.model.backends import limit_thread_pools  # noqa: E402
from edge.model.bundle import Bundle  # noqa: E402
from edge.model.litert_model import LiteRTModel  # noqa: E402


def load(bundle: Bundle, threads: int, flags: int | None) -> LiteRTModel:
    base = litert_runner.CpuOptions
    litert_runner.CpuOptions = lambda **kw: base(xnnpack_flags=flags, **kw)
    try:
        return LiteRTModel(bundle, 8192, threads)
    finally:
        litert_runner.CpuOptions = base


def prefill(model: LiteRTModel, ids: np.ndarray, chunk: int) -> np.ndarray:
    cache, out = model.new_cache(), None
    for i in range(0, len(ids), chunk):
        out = model.forward(ids[i:i + chunk], cache)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="bundle directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--flags", default="none", help="comma list of XNNPACK delegate flags (none = LiteRT's defaults)")
    ap.add_argument("--chunks", default="64", help="comma list of rows per graph call")
    a = ap.parse_args(argv)
    limit_thread_pools(1)                 # NumPy's pool beside the graph, as load_backend sets it
    bundle = Bundle.open(Path(a.model))
    models = {f: load(bundle, a.threads, None if f == "none" else int(f, 0)) for f in a.flags.split(",")}
    chunks = [int(c) for c in a.chunks.split(",")]
    ids = np.random.default_rng(0).integers(0, bundle.config.vocab_size, a.n_prompt)
    speeds: dict[tuple[str, int], list[float]] = {}
    logits: dict[tuple[str, int], np.ndarray] = {}
    for rep in range(a.reps + 1):             # the first pass warms up and is not counted
        for f, model in models.items():
            for chunk in chunks:
                t = time.perf_counter()
                logits[(f, chunk)] = prefill(model, ids, chunk)
                if rep:
                    speeds.setdefault((f, chunk), []).append(a.n_prompt / (time.perf_counter() - t))
    first = next(iter(logits.values()))
    print(f"load average {open('/proc/loadavg').read().split()[0]}; pp{a.n_prompt}, {a.threads} threads")
    for (f, chunk), v in speeds.items():
        d = float(np.abs(logits[(f, chunk)] - first).max())
        print(f"flags {f:>6} chunk {chunk:4d}: median {statistics.median(v):6.1f} t/s "
              f"{[round(x, 1) for x in v]}  max |Δlogit| {d:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
