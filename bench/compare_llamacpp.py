#!/usr/bin/env python3
"""Side-by-side speed of edge-llm and llama.cpp on a Llama-3.2-1B- or 3B-shaped model.

Steps (each one function, cached under --workdir and skipped when its output exists; 1-3 in
bench/random_llama.py, 5 in bench/llamacpp_build.py, the rest here):

  1. fetch_tokenizer_json   Meta's Llama 3 tokenizer.model from the pinned llama-models wheel
                            on PyPI, rebuilt as a Hugging Face tokenizer.json.
  2. write_hf_checkpoint    A Llama-3.2-1B- or 3B-shaped (--shape) Hugging Face directory with random weights
                            (normal, std 0.02; norms 1), f16 safetensors written one shard per
                            layer so RAM stays modest.
  3. write_f16_gguf         The same tensors as an F16 GGUF with the metadata llama.cpp's
                            convert_hf_to_gguf.py writes for Llama 3.2 (rope_freqs.weight,
                            llama-bpe vocabulary, Q/K rows permuted the llama.cpp way).
  4. convert_bundle         `edge-llm convert HF_DIR -o BUNDLE --quant int8|int4`.
  5. build_llamacpp         llama.cpp from the llama-cpp-python sdist on PyPI (it vendors
                            llama.cpp), built with cmake: llama-bench, llama-quantize,
                            llama-perplexity. No prebuilt binaries are downloaded.
  6. quantize_gguf          llama-quantize F16 -> Q8_0 and Q4_0.
  7. run_edge_bench /       `edge-llm bench ... --json` and `llama-bench ... -o json`, interleaved
     run_llama_bench        pair by pair at the same thread count; peak RSS of each process
                            is taken from wait4().

Prints a markdown table (or JSON with --json) and saves the JSON under WORKDIR/results/.

Other scripts get a built llama.cpp tool with `bench.llamacpp_build.llamacpp_bin`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.llamacpp_build import (DEFAULT_WORKDIR, LLAMACPP_TARGETS, _llamacpp_dir, build_llamacpp,  # noqa: E402
                                  llamacpp_bin, llamacpp_commit)
from bench.random_llama import SHAPES, _mb, fetch_tokenizer_json, log, write_f16_gguf, write_hf_checkpoint  # noqa: E402

# our --quant -> the llama.cpp type it is compared with (int4-b32, blocks of 32 like Q4_0: opt-in)
PAIRS = {"int8": "Q8_0", "int4": "Q4_0", "int4-b32": "Q4_0"}
DEFAULT_QUANTS = ["int8", "int4"]


# ---------------------------------------------------------------- 4. our bundles

def _edge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", *args]


def _edge_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def convert_bundle(hf_dir: Path, bundle: Path, quant: str) -> Path:
    """`edge-llm convert HF_DIR -o BUNDLE --quant QUANT` (skipped when a bundle in this
    edge-llm's format exists)."""
    from edge.model.bundle import is_current
    if is_current(bundle):
        return bundle
    log(f"edge-llm convert {hf_dir} -o {bundle} --quant {quant} ...")
    t0 = time.perf_counter()
    subprocess.run(_edge_cmd("convert", str(hf_dir), "-o", str(bundle), "--quant", quant, "--force"),
                   check=True, env=_edge_env(), cwd=REPO)
    log(f"  {_mb(bundle):.0f} MB in {time.perf_counter() - t0:.0f} s")
    return bundle


def quantize_gguf(f16: Path, qtype: str, workdir: Path) -> Path:
    """llama-quantize F16 -> QTYPE (Q8_0, Q4_0, ...)."""
    out = f16.with_name(f16.name.replace("-F16", f"-{qtype}"))
    if out.exists():
        return out
    log(f"llama-quantize {f16.name} {qtype} ...")
    part = out.with_name(out.name + ".part")
    run_measured([str(llamacpp_bin("llama-quantize", workdir)), str(f16), str(part), qtype])
    os.replace(part, out)
    return out


# ---------------------------------------------------------------- 6. runs

def run_measured(cmd: list[str], **kw) -> tuple[str, float, float]:
    """Run cmd; return (stdout, peak RSS in MB of that process, wall seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, **kw)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{stderr[-3000:]}")
    return stdout, usage.ru_maxrss / 1024, wall


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over the next `seconds` (other processes, as we are asleep)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_idle(max_busy: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until the CPUs are less than `max_busy` busy; return the last reading.
    Other jobs on a shared machine wreck spin-waiting thread pools (llama.cpp's OpenMP above all)."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        log(f"  machine {busy:.0%} busy; waiting for it to be under {max_busy:.0%} ...")
        time.sleep(8)
        busy = cpu_busy()
    return busy


def run_edge_bench(bundle: Path, threads: int, reps: int, n_prompt: int, n_gen: int) -> dict:
    """`edge-llm bench --model BUNDLE -p N -n N -t T -r R --json`."""
    out, rss, wall = run_measured(_edge_cmd("bench", "--model", str(bundle), "-p", str(n_prompt),
                                            "-n", str(n_gen), "-t", str(threads), "-r", str(reps), "--json"),
                                  env=_edge_env(), cwd=REPO)
    r = json.loads(out)
    r = r[0] if isinstance(r, list) else r
    return {"engine": "edge-llm", "format": r.get("quant", bundle.name), "threads": threads,
            "pp_tokens_per_s": r["pp_tokens_per_s"], "pp_std": r.get("pp_std"),
            "tg_tokens_per_s": r["tg_tokens_per_s"], "tg_std": r.get("tg_std"),
            "ttft_s": r.get("ttft_s"), "load_s": r.get("load_s"), "peak_rss_mb": rss,
            "reported_peak_rss_mb": r.get("peak_rss_mb"), "size_mb": _mb(bundle), "wall_s": wall,
            # each repetition in t/s, as llama-bench's samples_ts (edge-llm bench reports seconds)
            "pp_samples": [r["n_prompt"] / t for t in r["pp_samples_s"]],
            "tg_samples": [r["n_gen"] / t for t in r["tg_samples_s"]],
            "backend": r.get("backend"), "path": str(bundle), "raw": r}


def _median_ts(record: dict) -> float:
    return statistics.median(record["samples_ts"]) if record.get("samples_ts") else record["avg_ts"]


def run_llama_bench(gguf_path: Path, threads: int, reps: int, n_prompt: int, n_gen: int, workdir: Path,
                    binary: Path | None = None) -> dict:
    """`llama-bench -m GGUF -p N -n N -t T -r R -o json` (one pp and one tg record); binary:
    a llama-bench to use instead of the workdir's build."""
    out, rss, wall = run_measured([str(binary or llamacpp_bin("llama-bench", workdir)), "-m", str(gguf_path),
                                   "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads), "-r", str(reps),
                                   "-o", "json"])
    records = json.loads(out)
    pp = next(r for r in records if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in records if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"engine": "llama.cpp", "format": gguf_path.stem.rsplit("-", 1)[-1], "threads": threads,
            # the median repetition, as edge-llm bench reports it (llama-bench's avg_ts is the mean)
            "pp_tokens_per_s": _median_ts(pp), "pp_std": pp["stddev_ts"], "pp_mean": pp["avg_ts"],
            "tg_tokens_per_s": _median_ts(tg), "tg_std": tg["stddev_ts"], "tg_mean": tg["avg_ts"],
            "ttft_s": n_prompt / _median_ts(pp), "load_s": None, "peak_rss_mb": rss,
            "size_mb": _mb(gguf_path), "wall_s": wall, "backend": pp.get("backends", "CPU"),
            "pp_samples": pp.get("samples_ts"), "tg_samples": tg.get("samples_ts"),
            "path": str(gguf_path), "build_commit": pp.get("build_commit"), "raw": records}


def _median_row(rows: list[dict]) -> dict:
    """Several rounds of one (engine, format) -> one row with median speeds and max RSS."""
    if len(rows) == 1:
        return rows[0]
    m = dict(rows[-1])
    for k in ("pp_tokens_per_s", "tg_tokens_per_s", "ttft_s"):
        m[k] = statistics.median(r[k] for r in rows)
    for k in ("pp", "tg"):      # ± becomes the spread of the rounds
        m[f"{k}_std"] = statistics.pstdev(r[f"{k}_tokens_per_s"] for r in rows)
        m[f"{k}_samples"] = [x for r in rows for x in (r.get(f"{k}_samples") or [])] or None
    m["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rows)
    m["rounds"] = [{k: r[k] for k in ("pp_tokens_per_s", "tg_tokens_per_s", "peak_rss_mb")} for r in rows]
    return m


# ---------------------------------------------------------------- 7. report

def markdown(result: dict) -> str:
    p, n = result["n_prompt"], result["n_gen"]
    lines = [f"threads {result['threads']}, reps {result['reps']}, rounds {result['rounds']}; "
             f"load average {result['loadavg_before'][0]:.2f} before, {result['loadavg_after'][0]:.2f} after; "
             f"{result['cpu']}; llama.cpp {result.get('llama_cpp_commit', '?')}", "",
             "t/s: median ± spread of the repetitions (of the rounds' medians with --rounds > 1); "
             "max: the best single repetition, where the tool reports them", "",
             f"| weights | engine | file MB | pp{p} t/s | tg{n} t/s | TTFT s | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def speed(r, k):
        std, samples = r.get(k.replace("tokens_per_s", "std")), r.get(k.replace("tokens_per_s", "samples"))
        return (f"{r[k]:.1f}" + (f" ± {std:.1f}" if std is not None else "")
                + (f" (max {max(samples):.1f})" if samples else ""))

    for pair in result["pairs"]:
        ours, theirs = pair.get("edge"), pair.get("llamacpp")
        for r in (ours, theirs):
            if r:
                lines.append(f"| {r['format']} | {r['engine']} | {r['size_mb']:.0f} | {speed(r, 'pp_tokens_per_s')} | "
                             f"{speed(r, 'tg_tokens_per_s')} | {r['ttft_s']:.2f} | {r['peak_rss_mb']:.0f} |")
        if ours and theirs:
            q = lambda k: ours[k] / theirs[k]  # noqa: E731
            lines.append(f"| **{ours['format']} / {theirs['format']}** | ours ÷ llama.cpp | {q('size_mb'):.2f}× | "
                         f"**{q('pp_tokens_per_s'):.2f}×** | **{q('tg_tokens_per_s'):.2f}×** | "
                         f"{q('ttft_s'):.2f}× | {q('peak_rss_mb'):.2f}× |")
    return "\n".join(lines)


def prepare(args) -> dict:
    """Steps 1-6: every file the runs need, built or reused. Returns their paths."""
    wd = args.workdir
    config, model, gguf_name, size_label = SHAPES[args.shape]
    tok = fetch_tokenizer_json(wd)
    hf = write_hf_checkpoint(wd / model, tok, seed=args.seed, config=config)
    f16 = write_f16_gguf(hf, wd / "gguf" / f"{model}-F16.gguf", tok, gguf_name, size_label)
    if args.only_checkpoint:
        return {"hf": hf, "f16_gguf": f16, "bundles": {}, "ggufs": {}}
    bundles = {q: convert_bundle(hf, wd / "bundles" / f"{model}-{q}", q) for q in args.quants}
    ggufs = {}
    if args.skip_build and not all((_llamacpp_dir(wd) / "build" / "bin" / t).exists() for t in LLAMACPP_TARGETS):
        log("--skip-build and no llama.cpp build in the workdir: running edge-llm only")
    else:
        build_llamacpp(wd, args.jobs)
        ggufs = {q: quantize_gguf(f16, PAIRS[q], wd) for q in args.quants}
    return {"hf": hf, "f16_gguf": f16, "bundles": bundles, "ggufs": ggufs}


def compare(args, files: dict) -> dict:
    """Interleaved runs: for each round, for each pair, ours then llama.cpp."""
    runs: dict[tuple[str, str], list[dict]] = {}
    rounds: list[dict] = []
    before = os.getloadavg()
    for rnd in range(args.rounds):
        for q in args.quants:
            jobs = [("edge", lambda: run_edge_bench(files["bundles"][q], args.threads, args.reps, args.n_prompt, args.n_gen))]
            if q in files["ggufs"]:
                jobs.append(("llamacpp", lambda: run_llama_bench(files["ggufs"][q], args.threads, args.reps,
                                                                 args.n_prompt, args.n_gen, args.workdir)))
            for engine, job in jobs:
                busy = wait_for_idle(args.max_busy, args.idle_wait) if args.idle_wait > 0 else cpu_busy(1)
                log(f"round {rnd + 1}/{args.rounds}: {engine} {q if engine == 'edge' else PAIRS[q]} "
                    f"(load {os.getloadavg()[0]:.2f}, cpu {busy:.0%} busy) ...")
                load = os.getloadavg()
                r = job()
                r["loadavg_at_start"], r["cpu_busy_at_start"] = load, busy
                runs.setdefault((q, engine), []).append(r)
                log(f"  pp {r['pp_tokens_per_s']:.1f} t/s, tg {r['tg_tokens_per_s']:.1f} t/s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB")
            if len(jobs) == 2:
                ours, theirs = runs[(q, "edge")][-1], runs[(q, "llamacpp")][-1]
                rounds.append(round_ratio(rnd + 1, q, ours, theirs))
                log(round_line(rounds[-1]))
    pairs = []
    for q in args.quants:
        pair = {"quant": q, "llamacpp_type": PAIRS[q]}
        for engine in ("edge", "llamacpp"):
            if (q, engine) in runs:
                pair[engine] = _median_row(runs[(q, engine)])
        if "edge" in pair and "llamacpp" in pair:
            pair["ratio"] = {k: pair["edge"][k] / pair["llamacpp"][k]
                             for k in ("pp_tokens_per_s", "tg_tokens_per_s", "peak_rss_mb", "size_mb")}
        pairs.append(pair)
    info_path = _llamacpp_dir(args.workdir) / "build-info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return {"model": SHAPES[args.shape][1], "shape": args.shape, "threads": args.threads, "reps": args.reps, "rounds": args.rounds,
            "n_prompt": args.n_prompt, "n_gen": args.n_gen, "loadavg_before": before, "loadavg_after": os.getloadavg(),
            "cpu": _cpu_name(), "machine": platform.machine(), "llama_cpp_commit": llamacpp_commit(args.workdir),
            "llama_cpp_build": info, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "files": {k: str(v) if isinstance(v, Path) else {q: str(p) for q, p in v.items()} for k, v in files.items()},
            "pairs": pairs, "round_ratios": rounds}


def round_ratio(rnd: int, quant: str, ours: dict, theirs: dict) -> dict:
    """One round's ours ÷ llama.cpp, with the load average (1 min) at the start of each run."""
    return {"round": rnd, "quant": quant, "llamacpp_type": PAIRS[quant],
            "load_ours": ours["loadavg_at_start"][0], "load_llamacpp": theirs["loadavg_at_start"][0],
            "pp_ours": ours["pp_tokens_per_s"], "pp_llamacpp": theirs["pp_tokens_per_s"],
            "tg_ours": ours["tg_tokens_per_s"], "tg_llamacpp": theirs["tg_tokens_per_s"],
            "pp_ratio": ours["pp_tokens_per_s"] / theirs["pp_tokens_per_s"],
            "tg_ratio": ours["tg_tokens_per_s"] / theirs["tg_tokens_per_s"]}


def round_line(r: dict) -> str:
    return (f"round {r['round']} {r['quant']}/{r['llamacpp_type']}: pp {r['pp_ratio']:.2f}x, "
            f"tg {r['tg_ratio']:.2f}x (load {r['load_ours']:.2f} / {r['load_llamacpp']:.2f})")


def markdown_rounds(rounds: list[dict]) -> str:
    """Each round's ratio with the load average at that round."""
    lines = ["| round | weights | load (ours / llama.cpp) | pp ours | pp llama.cpp | **pp ×** | "
             "tg ours | tg llama.cpp | **tg ×** |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rounds:
        lines.append(f"| {r['round']} | {r['quant']} / {r['llamacpp_type']} | {r['load_ours']:.2f} / "
                     f"{r['load_llamacpp']:.2f} | {r['pp_ours']:.1f} | {r['pp_llamacpp']:.1f} | "
                     f"**{r['pp_ratio']:.2f}** | {r['tg_ours']:.1f} | {r['tg_llamacpp']:.1f} | **{r['tg_ratio']:.2f}** |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\nOther scripts")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Everything is cached under --workdir; delete a file or folder there to redo its step.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b",
                   help="Llama 3.2 shape of the random model: 1b (default) or 3b (hidden 3072, 28 layers, "
                        "24 heads / 8 KV heads, head_dim 128)")
    p.add_argument("--threads", "-t", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--reps", "-r", type=int, default=3, help="repetitions inside each tool's run (default 3)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of all runs; each round's ratio is printed with the load average "
                        "at that round, and medians are reported (default 5)")
    p.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--quants", type=lambda s: [q for q in s.split(",") if q], default=DEFAULT_QUANTS,
                   help=f"our quantizations to compare, comma separated (default {','.join(DEFAULT_QUANTS)}; "
                        f"pairs {PAIRS})")
    p.add_argument("--workdir", type=lambda s: Path(s).expanduser(), default=DEFAULT_WORKDIR,
                   help=f"cache for checkpoint, GGUFs, bundles and the llama.cpp build (default {DEFAULT_WORKDIR})")
    p.add_argument("--skip-build", action="store_true",
                   help="do not build llama.cpp; use an existing build in the workdir or run edge-llm alone")
    p.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs for llama.cpp (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--prepare-only", action="store_true", help="make every file, run no benchmark")
    p.add_argument("--only-checkpoint", action="store_true",
                   help="make only the random HF checkpoint and its F16 GGUF, then stop")
    p.add_argument("--idle-wait", type=float, default=300,
                   help="before each run wait up to this many seconds for other jobs to leave the CPUs "
                        "(0: don't wait; default 300)")
    p.add_argument("--max-busy", type=float, default=0.15,
                   help="CPU share other processes may use when a run starts (default 0.15)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [q for q in args.quants if q not in PAIRS]
    if bad:
        raise SystemExit(f"--quants: {bad} not among {list(PAIRS)}")
    files = prepare(args)
    if args.prepare_only or args.only_checkpoint:
        print(json.dumps({k: str(v) if isinstance(v, Path) else {q: str(p) for q, p in v.items()}
                          for k, v in files.items()}, indent=1))
        return 0
    result = compare(args, files)
    out = args.workdir / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"results saved to {out}")
    if args.json:
        print(json.dumps({**result, "pairs": [{k: ({kk: vv for kk, vv in v.items() if kk != "raw"}
                                                   if isinstance(v, dict) and "raw" in v else v)
                                               for k, v in pr.items()} for pr in result["pairs"]]}, indent=1))
    else:
        print(markdown(result))
        if result["round_ratios"]:
            print()
            print(markdown_rounds(result["round_ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
