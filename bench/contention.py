"""Prefill speed with busy processes beside it, as a ratio to the quiet run (issue 12, item 9:
NumPy's BLAS pool was unbounded and prefill collapsed from ~540 to 32 tokens/s next to two
busy processes; the README's own case is the service at Nice=5 beside a voice assistant).

    python -m bench.contention [--model BUNDLE] [--threads N] [--prompt 512] [--busy 2]

Runs `CausalLM.prefill` of a random prompt from an empty cache: quiet, then with `--busy`
processes spinning on the CPU, and prints tokens/s for both and busy/quiet.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import numpy as np


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def prefill_tps(model, vocab: int, n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    best = 0.0
    for _ in range(repeats):
        ids = rng.integers(3, vocab, n).tolist()
        cache = model.new_cache()
        t0 = time.perf_counter()
        model.prefill(ids, cache)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main(argv=None) -> int:
    from edge.launch import load_engine
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--busy", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    engine = load_engine(a.model, ctx=a.prompt + 16, threads=a.threads, log=lambda m: None)
    model, vocab = engine.model, engine.config.vocab_size
    prefill_tps(model, vocab, min(a.prompt, 64), 1)                   # warm-up
    quiet = prefill_tps(model, vocab, a.prompt, a.repeats)
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(a.busy)]
    for proc in procs:
        proc.start()
    try:
        time.sleep(0.5)
        busy = prefill_tps(model, vocab, a.prompt, a.repeats)
    finally:
        stop.set()
        for proc in procs:
            proc.join(5)
    print(json.dumps({"model": engine.name, "prompt_tokens": a.prompt, "threads": a.threads,
                      "busy_processes": a.busy, "quiet_tokens_per_s": round(quiet, 1),
                      "busy_tokens_per_s": round(busy, 1), "busy_over_quiet": round(busy / quiet, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
