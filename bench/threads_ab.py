"""Thread settings side by side in one process, interleaved round by round, so that a load
that drifts (a shared machine) hits every setting alike.

    python bench/threads_ab.py --model BUNDLE [--settings 1,2,auto] [--rounds 5] [-p 128] [-n 32]
                               [--busy 0]

Loads the bundle once per setting (one XNNPACK weight cache), then for each round runs, for
each setting in turn, a prefill of -p random tokens and -n decode steps; prints per setting
the median over rounds of pp and tg t/s, each round's figures, the load average per round,
and, for auto, which thread count each row bucket chose.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.contention import Busy  # noqa: E402


def main(argv=None) -> int:
    from edge.launch.model_store import resolve, weight_cache_dir
    from edge.model.backends import load_backend
    from edge.model.bundle import Bundle
    from edge.model.thread_policy import parse_threads
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--settings", type=lambda s: [parse_threads(x) for x in s.split(",")], default=[1, 2, "auto"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("--busy", type=int, default=0, help="spinning processes beside it (default 0)")
    a = p.parse_args(argv)
    bundle = Bundle.open(resolve(a.model, log=lambda m: print(m, file=sys.stderr)))
    models = {str(s): load_backend(bundle, "litert", a.n_prompt + a.n_gen + 8, s, weight_cache_dir(bundle))
              for s in a.settings}
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, bundle.config.vocab_size, a.n_prompt).tolist()
    rounds = []
    with Busy(a.busy):
        for name, m in models.items():           # warm-up: buffers, and auto's first choices
            c = m.new_cache()
            m.prefill(prompt, c)
            for _ in range(8):
                m.forward([5], c)
        for r in range(a.rounds):
            row = {"round": r + 1, "load": os.getloadavg()[0]}
            for name, m in models.items():
                c = m.new_cache()
                t0 = time.perf_counter()
                m.prefill(prompt, c)
                t1 = time.perf_counter()
                for _ in range(a.n_gen):
                    m.forward([5], c)
                t2 = time.perf_counter()
                row[name] = {"pp": a.n_prompt / (t1 - t0), "tg": a.n_gen / (t2 - t1)}
            rounds.append(row)
            print(json.dumps({k: (v if not isinstance(v, dict) else {kk: round(vv, 1) for kk, vv in v.items()})
                              for k, v in row.items()}), file=sys.stderr, flush=True)
    print(f"{bundle.name} {bundle.quant}; busy {a.busy}; {a.rounds} rounds; load {rounds[0]['load']:.2f} .. "
          f"{rounds[-1]['load']:.2f}\n")
    print(f"| setting | pp{a.n_prompt} t/s median | rounds | tg{a.n_gen} t/s median | rounds |")
    print("|---|---:|---|---:|---|")
    for name in models:
        pp = [r[name]["pp"] for r in rounds]
        tg = [r[name]["tg"] for r in rounds]
        print(f"| {name} | {statistics.median(pp):.1f} | {', '.join(f'{x:.0f}' for x in pp)} | "
              f"{statistics.median(tg):.1f} | {', '.join(f'{x:.0f}' for x in tg)} |")
    for name, m in models.items():
        if getattr(m, "policy", None):
            print(f"\n{name}: " + json.dumps({str(k): v for k, v in m.policy.summary().items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
