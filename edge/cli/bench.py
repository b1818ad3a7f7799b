"""`edge-llm bench`: like llama-bench. Prompt processing (pp) and generation (tg) tokens/s,
time to first token, load time and peak RSS, over repetitions and thread counts."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edge.engine.constraint import Grammar, Grammars
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


def bench_one(bundle: Bundle, backend: str, threads: int, n_prompt: int, n_gen: int, reps: int,
              progress=None, grammar: Grammar | None = None, grammars: Grammars | None = None) -> dict:
    """One load, then `reps` prefills of n_prompt tokens and `reps` generations of n_gen
    tokens; either count may be 0 (that test is skipped, its figures are None)."""
    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0 or reps < 1:
        raise ValueError(f"nothing to measure: -p {n_prompt} -n {n_gen} -r {reps}")
    say = progress or (lambda msg: None)
    say(f"loading ({threads} threads)")
    t0 = time.perf_counter()
    model = load_backend(bundle, backend, max(n_prompt, n_gen) + 8, threads, weight_cache_dir(bundle))
    load_s = time.perf_counter() - t0
    cache = model.new_cache()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, bundle.config.vocab_size, max(n_prompt, 1))

    def prefill():
        cache.truncate(0)
        int(np.argmax(model.prefill(prompt, cache)))      # the first token, as a user would get it

    if grammar is not None and grammars is None:
        grammars = Grammars.of_bundle(bundle)
    mask_s: list[float] = []

    def generate():
        cache.truncate(0)
        token = 1
        matcher = grammars.matcher(grammar) if grammar is not None else None
        for _ in range(n_gen):
            logits = model.forward([token], cache)
            if matcher is None:
                token = int(np.argmax(logits))
                continue
            t = time.perf_counter()     # the mask's cost per token: compute it, apply it, advance
            allowed = matcher.apply(logits)
            token = int(np.argmax(allowed))
            matcher.advance(token)
            mask_s.append(time.perf_counter() - t)
            if matcher.stopped:         # one document done: start the next
                matcher = grammars.matcher(grammar)

    def timed(fn, label):
        samples = []
        for i in range(reps):
            say(f"{label}, {threads} threads: run {i + 1}/{reps}")
            samples.append(_timed(fn))
        return samples

    say(f"warm-up ({threads} threads)")
    prefill()                       # warm-up: buffers, T-resizes, caches
    pp = timed(prefill, f"pp{n_prompt}") if n_prompt else []
    tg = timed(generate, f"tg{n_gen}") if n_gen else []
    mask = {}
    if grammar is not None and tg:
        step = statistics.median(tg) / n_gen
        mask = {"mask_ms_per_token": 1e3 * statistics.median(mask_s),
                "mask_ms_p90": 1e3 * float(np.quantile(mask_s, 0.9)),
                "decode_ms_per_token": 1e3 * step, "mask_share_of_step": statistics.median(mask_s) / step}
    return {
        "model": bundle.name, "quant": bundle.quant, "threads": threads,
        "backend": model.backend,
        "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "load_s": load_s,
        "ttft_s": statistics.median(pp) if pp else None,
        "pp_tokens_per_s": n_prompt / statistics.median(pp) if pp else None,
        "pp_std": statistics.pstdev([n_prompt / t for t in pp]) if pp else None,
        "tg_tokens_per_s": n_gen / statistics.median(tg) if tg else None,
        "tg_std": statistics.pstdev([n_gen / t for t in tg]) if tg else None,
        "pp_samples_s": pp, "tg_samples_s": tg,
        "kv_cache_mb": cache.nbytes / 2**20,
        "bundle_mb": sum(f["size"] for f in bundle.manifest["files"].values()) / 2**20,
        "params": bundle.config.parameter_count,
        "peak_rss_mb": peak_rss_mb(),
        **mask,
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


def _size(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.2f} K"


TABLE = (("model", 30, "<"), ("size", 10, ">"), ("params", 10, ">"), ("backend", 10, "<"),
         ("threads", 7, ">"), ("test", 13, ">"), ("t/s", 20, ">"))


def table(rows: list[dict]) -> str:
    """llama-bench's layout: one line per test (ppN: prompt processing, tgN: generation)."""
    def line(cells):
        return "| " + " | ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, TABLE)) + " |"
    out = [line([name for name, _, _ in TABLE]),
           "| " + " | ".join(("-" * (w - 1) + ":") if a == ">" else "-" * w for _, w, a in TABLE) + " |"]
    for r in rows:
        first = [f"{r['model']} {r['quant']}", _size(r["bundle_mb"]), _params(r["params"]), r["backend"],
                 r["threads"]]
        for kind, n in (("pp", r["n_prompt"]), ("tg", r["n_gen"])):
            if n:
                out.append(line(first + [f"{kind}{n}", f"{r[kind + '_tokens_per_s']:.2f} ± {r[kind + '_std']:.2f}"]))
    return "\n".join(out)


def markdown(rows: list[dict]) -> str:
    """The figures llama-bench does not print: time to first token, load time, peak RSS."""
    masked = "mask_ms_per_token" in rows[0]
    lines = ["| model | threads | n_prompt | ttft s | load s | KV cache MiB | peak RSS MB |"
             + (" mask ms/token (share of a step) |" if masked else ""), "|---" * (7 + masked) + "|"]
    for r in rows:
        ttft = f"{r['ttft_s']:.3f}" if r["ttft_s"] is not None else "–"
        lines.append(f"| {r['model']} {r['quant']} | {r['threads']} | {r['n_prompt']} | {ttft} | {r['load_s']:.2f} | "
                     f"{r['kv_cache_mb']:.1f} | {r['peak_rss_mb']:.0f} |"
                     + (f" {r['mask_ms_per_token']:.3f} ({100 * r['mask_share_of_step']:.1f} %) |" if masked else ""))
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    """"64,512" -> [64, 512] (llama-bench's lists)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list of numbers, got {text!r}")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def plan(n_prompts: list[int], n_gens: list[int]) -> list[tuple[int, int]]:
    """(n_prompt, n_gen) per load: -p and -n paired in order; the shorter list is padded with
    0 (= that test skipped), so -p 64,512 -n 128 runs pp64 + tg128, then pp512."""
    from itertools import zip_longest
    pairs = [(p, n) for p, n in zip_longest(n_prompts, n_gens, fillvalue=0) if p or n]
    if not pairs:
        raise ValueError("nothing to measure: -p and -n are both 0")
    return pairs


def run(args) -> int:
    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)
    bundle_path = resolve(args.model, log=progress)
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_path)
    verify_s = time.perf_counter() - t0
    pairs = plan(args.n_prompt, args.n_gen)
    grammar = grammars = None
    if args.json_schema:        # checked before any model loads: a bad schema fails at once
        grammar = Grammar.json_schema(json.loads(Path(args.json_schema).read_text()), origin=args.json_schema)
        grammars = Grammars.of_bundle(bundle)
        grammars.check(grammar)
    rows = []
    if args.parallel:
        for threads in args.threads or [default_threads()]:
            rows += bench_parallel(bundle, args.backend, threads, args.n_prompt[0], args.n_gen[0] or 64, args.reps,
                                   args.parallel)
        print(json.dumps(rows, indent=1) if args.json else markdown_parallel(rows))
        return 0
    for threads in args.threads or [default_threads()]:
        for n_prompt, n_gen in pairs:
            r = bench_one(bundle, args.backend, threads, n_prompt, n_gen, args.reps, progress, grammar, grammars)
            r["load_s"] += verify_s           # opening includes checking every file's hash
            rows.append(r)
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=1))
    else:
        print(table(rows))
        if args.verbose or grammar is not None:
            print()
            print(markdown(rows))
    return 0


def register(sub) -> None:
    b = sub.add_parser("bench", help="measure prompt/generation speed, like llama-bench",
                       description="Prompt processing (ppN) and generation (tgN) speed in llama-bench's "
                       "table; progress goes to stderr. -p, -n and -t take comma-separated lists.")
    add_model_choice(b)
    b.add_argument("-p", "--n-prompt", type=int_list, default=[128],
                   help="prompt tokens per pp test, list allowed; 0 = no pp test (default 128)")
    b.add_argument("-n", "--n-gen", type=int_list, default=[64],
                   help="generated tokens per tg test, list allowed; 0 = no tg test (default 64)")
    b.add_argument("-t", "--threads", type=int_list, default=None,
                   help="thread counts, comma separated (e.g. 1,2,4); default: all cores")
    b.add_argument("-r", "--reps", type=int, default=3, help="repetitions of each test (default 3)")
    b.add_argument("--json", action="store_true", help="JSON (every figure and sample) instead of the table")
    b.add_argument("-v", "--verbose", action="store_true",
                   help="also print time to first token, load time, KV cache size and peak RSS")
    b.add_argument("-np", "--parallel", type=int_list, default=None,
                   help="sequences decoded together, comma separated (e.g. 1,2,4,8): aggregate decode speed, "
                        "like llama-batched-bench (default: off)")
    b.add_argument("--json-schema", metavar="FILE", default=None,
                   help="generate under this JSON schema and report the token mask's cost per token "
                        "(shown with the -v table)")
    b.set_defaults(func=run)
