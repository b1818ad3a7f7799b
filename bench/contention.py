"""Prefill and decode speed beside busy processes, each engine as a ratio to its own quiet run.

    python bench/contention.py --model BUNDLE --gguf GGUF [--threads 2] [--ours auto,2,1]
                               [--busy 0,1,2] [-p 128] [-n 64] [-r 3] [--json]

For each count of busy processes (pure-Python spinning loops, one core each, started before
and stopped after each level), in one run:
  * ours:      `edge-llm bench --model BUNDLE -p P -n N -t T -r R --json` for each T of --ours
               ("auto" is the default thread policy, edge/model/thread_policy.py)
  * llama.cpp: `llama-bench -m GGUF -p P -n N -t THREADS -r R -o json` (bench/compare_llamacpp.py
               builds it; --llama-bench PATH or the workdir's build; none: ours only)
Each figure is divided by the same engine's and thread setting's quiet figure (busy 0), so a
model or quantization difference between the two engines cancels; the load average at the
start of each run is printed beside it. The engines run one after the other, never together.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.compare_llamacpp import DEFAULT_WORKDIR, run_edge_bench, run_llama_bench  # noqa: E402


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


class Busy:
    """`n` processes spinning on the CPU while the block runs."""

    def __init__(self, n: int):
        self.n, self.stop, self.procs = n, mp.Event(), []

    def __enter__(self) -> "Busy":
        self.procs = [mp.Process(target=_spin, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        if self.n:
            time.sleep(1.0)           # let the scheduler see them
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def _say(row: dict) -> None:
    print(f"[contention]   pp {row['pp']:.1f} t/s, tg {row['tg']:.1f} t/s", file=sys.stderr, flush=True)


def run_all(a) -> list[dict]:
    rows = []
    for busy in a.busy:
        with Busy(busy):
            for t in a.ours:
                load = os.getloadavg()[0]
                print(f"[contention] busy {busy}: edge-llm -t {t} (load {load:.2f}) ...", file=sys.stderr, flush=True)
                r = run_edge_bench(a.model, t, a.reps, a.n_prompt, a.n_gen)
                rows.append({"busy": busy, "engine": "edge-llm", "threads": t, "load": load,
                             "pp": r["pp_tokens_per_s"], "tg": r["tg_tokens_per_s"],
                             "policy": r["raw"].get("thread_policy")})
                _say(rows[-1])
            if a.llama_bench:
                load = os.getloadavg()[0]
                print(f"[contention] busy {busy}: llama.cpp -t {a.threads} (load {load:.2f}) ...",
                      file=sys.stderr, flush=True)
                r = run_llama_bench(a.gguf, a.threads, a.reps, a.n_prompt, a.n_gen, a.workdir,
                                    binary=a.llama_bench)
                rows.append({"busy": busy, "engine": "llama.cpp", "threads": a.threads, "load": load,
                             "pp": r["pp_tokens_per_s"], "tg": r["tg_tokens_per_s"]})
                _say(rows[-1])
    quiet = {(r["engine"], r["threads"]): r for r in rows if r["busy"] == 0}
    for r in rows:
        q = quiet.get((r["engine"], r["threads"]))
        r["pp_ratio"] = r["pp"] / q["pp"] if q and r["pp"] else None
        r["tg_ratio"] = r["tg"] / q["tg"] if q and r["tg"] else None
    return rows


def markdown(rows: list[dict], a) -> str:
    p, n = a.n_prompt, a.n_gen
    lines = [f"{a.model.name} vs {a.gguf.name if a.gguf else '-'}; -p {p} -n {n} -r {a.reps}; "
             f"{os.cpu_count()} cpus; ratio = busy / the same engine's quiet figure", "",
             f"| engine | -t | busy | load at start | pp{p} t/s | × quiet | tg{n} t/s | × quiet |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["engine"] != "edge-llm", str(r["threads"]), r["busy"])):
        lines.append(f"| {r['engine']} | {r['threads']} | {r['busy']} | {r['load']:.2f} | {f(r['pp'])} | "
                     f"{f(r['pp_ratio'], 2)} | {f(r['tg'])} | {f(r['tg_ratio'], 2)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="our bundle")
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF llama-bench runs")
    p.add_argument("--threads", "-t", type=int, default=os.cpu_count(), help="llama.cpp's threads (default: all cores)")
    p.add_argument("--ours", type=lambda s: [x if x == "auto" else int(x) for x in s.split(",")], default=None,
                   help="our thread settings, comma separated (default: auto and --threads)")
    p.add_argument("--busy", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                   help="busy process counts (default 0,1,2; 0 = quiet, the reference)")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=64)
    p.add_argument("-r", "--reps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="compare_llamacpp.py's workdir (its build)")
    p.add_argument("--llama-bench", type=Path, default=None, help="a llama-bench binary (default: the workdir's)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.ours = a.ours or ["auto", a.threads]
    if 0 not in a.busy:
        a.busy = [0, *a.busy]
    a.llama_bench = a.llama_bench or (a.workdir / "llama.cpp" / "build" / "bin" / "llama-bench")
    if a.gguf is None or not a.llama_bench.exists():
        print(f"[contention] no GGUF or no {a.llama_bench}: edge-llm only", file=sys.stderr)
        a.llama_bench = None
    t0 = time.time()
    rows = run_all(a)
    result = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": time.time() - t0, "rows": rows,
              "args": {k: str(v) for k, v in vars(a).items()}}
    print(json.dumps(result, indent=1) if a.json else markdown(rows, a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
