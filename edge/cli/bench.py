"""`edge-llm bench`: like llama-bench. Prompt processing (pp) and generation (tg) tokens/s,
time to first token, load time and peak RSS, over repetitions and thread counts."""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np

from edge.launch.args import add_model_choice
from edge.launch.model_store import resolve, weight_cache_dir
from edge.model.backends import default_threads, load_backend
from edge.model.bundle import Bundle


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_one(bundle: Bundle, backend: str, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict:
    t0 = time.perf_counter()
    model = load_backend(bundle, backend, max(n_prompt, n_gen) + 8, threads, weight_cache_dir(bundle))
    load_s = time.perf_counter() - t0
    cache = model.new_cache()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, bundle.config.vocab_size, n_prompt)

    def prefill():
        cache.truncate(0)
        int(np.argmax(model.prefill(prompt, cache)))      # the first token, as a user would get it

    def generate():
        cache.truncate(0)
        token = 1
        for _ in range(n_gen):
            token = int(np.argmax(model.forward([token], cache)))

    prefill()                       # warm-up: buffers, T-resizes, caches
    pp = [_timed(prefill) for _ in range(reps)]
    tg = [_timed(generate) for _ in range(reps)]
    return {
        "model": bundle.name, "quant": bundle.quant, "threads": threads,
        "backend": model.backend,
        "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "load_s": load_s,
        "ttft_s": statistics.median(pp),
        "pp_tokens_per_s": n_prompt / statistics.median(pp),
        "pp_std": statistics.pstdev([n_prompt / t for t in pp]),
        "tg_tokens_per_s": n_gen / statistics.median(tg),
        "tg_std": statistics.pstdev([n_gen / t for t in tg]),
        "pp_samples_s": pp, "tg_samples_s": tg,
        "kv_cache_mb": cache.nbytes / 2**20,
        "bundle_mb": sum(f["size"] for f in bundle.manifest["files"].values()) / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }


def bench_parallel(bundle: Bundle, backend: str, threads: int, n_prompt: int, n_gen: int, reps: int,
                   parallel: list[int]) -> list[dict]:
    """Aggregate decode speed with B sequences decoded together (one stacked pass per step,
    like llama-batched-bench's S_TG): each sequence has its own cache holding an n_prompt
    prompt, and each step gives every sequence one token."""
    model = load_backend(bundle, backend, n_prompt + n_gen + 8, threads, weight_cache_dir(bundle))
    rng = np.random.default_rng(0)
    caches = [model.new_cache() for _ in range(max(parallel))]
    prompts = [rng.integers(0, bundle.config.vocab_size, n_prompt) for _ in caches]
    rows = []
    for b in parallel:
        def generate():
            tokens = []
            for cache, prompt in zip(caches[:b], prompts):
                cache.truncate(0)
                if n_prompt:
                    cache.append(prompt)        # positions to attend over; their K/V values do not matter here
                tokens.append([1])
            for _ in range(n_gen):
                tokens = [[int(np.argmax(lg))] for lg in model.forward_batch(list(zip(tokens, caches[:b])))]
        generate()                  # warm-up: the B-row buffers
        tg = [_timed(generate) for _ in range(reps)]
        agg = b * n_gen / statistics.median(tg)
        rows.append({"model": bundle.name, "quant": bundle.quant, "backend": model.backend, "threads": threads,
                     "np": b, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps,
                     "tg_aggregate_tokens_per_s": agg, "tg_per_stream_tokens_per_s": agg / b,
                     "tg_samples_s": tg})
    base = rows[0]["tg_aggregate_tokens_per_s"] / rows[0]["np"]
    for r in rows:
        r["aggregate_vs_one_stream"] = r["tg_aggregate_tokens_per_s"] / base
    return rows


def markdown_parallel(rows: list[dict]) -> str:
    lines = [f"| model | quant | backend | threads | np | tg{rows[0]['n_gen']} aggregate t/s | per stream t/s "
             f"| aggregate ÷ one stream |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quant']} | {r['backend']} | {r['threads']} | {r['np']} | "
                     f"{r['tg_aggregate_tokens_per_s']:.1f} | {r['tg_per_stream_tokens_per_s']:.1f} | "
                     f"{r['aggregate_vs_one_stream']:.2f}x |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    head = "| model | quant | backend | threads | pp{p} t/s | tg{n} t/s | ttft s | load s | peak RSS MB |"
    lines = [head.format(p=rows[0]["n_prompt"], n=rows[0]["n_gen"]), "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quant']} | {r['backend']} | {r['threads']} | "
                     f"{r['pp_tokens_per_s']:.1f} ± {r['pp_std']:.1f} | {r['tg_tokens_per_s']:.1f} ± {r['tg_std']:.1f} | "
                     f"{r['ttft_s']:.3f} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def run(args) -> int:
    bundle_path = resolve(args.model, log=lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_path)
    verify_s = time.perf_counter() - t0
    rows = []
    if args.parallel:
        for threads in args.threads or [default_threads()]:
            rows += bench_parallel(bundle, args.backend, threads, args.n_prompt, args.n_gen, args.reps, args.parallel)
        print(json.dumps(rows, indent=1) if args.json else markdown_parallel(rows))
        return 0
    for threads in args.threads or [default_threads()]:
        r = bench_one(bundle, args.backend, threads, args.n_prompt, args.n_gen, args.reps)
        r["load_s"] += verify_s           # opening includes checking every file's hash
        rows.append(r)
    print(json.dumps(rows if len(rows) > 1 else rows[0], indent=1) if args.json else markdown(rows))
    return 0


def register(sub) -> None:
    b = sub.add_parser("bench", help="measure prompt/generation speed, like llama-bench")
    add_model_choice(b)
    b.add_argument("-p", "--n-prompt", type=int, default=128)
    b.add_argument("-n", "--n-gen", type=int, default=64)
    b.add_argument("-t", "--threads", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="thread counts, comma separated (e.g. 1,2,4); default: all cores")
    b.add_argument("-r", "--reps", type=int, default=3)
    b.add_argument("-np", "--parallel", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="sequences decoded together, comma separated (e.g. 1,2,4,8): aggregate decode speed, "
                        "like llama-batched-bench (default: off)")
    b.add_argument("--json", action="store_true", help="JSON instead of a markdown table")
    b.set_defaults(func=run)
