"""`edge-llm bench`: like llama-bench. Prompt processing (pp) and generation (tg) tokens/s,
time to first token, load time and peak RSS, over repetitions and thread counts."""
from __future__ import annotations

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
              grammar: Grammar | None = None, grammars: Grammars | None = None) -> dict:
    t0 = time.perf_counter()
    model = load_backend(bundle, backend, max(n_prompt, n_gen) + 8, threads, weight_cache_dir(bundle))
    load_s = time.perf_counter() - t0
    cache = model.new_cache()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, bundle.config.vocab_size, n_prompt)

    def prefill():
        cache.truncate(0)
        int(np.argmax(model.prefill(prompt, cache)))      # the first token, as a user would get it

    if grammar is not None and grammars is None:
        grammars = grammars_of(bundle)
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

    prefill()                       # warm-up: buffers, T-resizes, caches
    pp = [_timed(prefill) for _ in range(reps)]
    tg = [_timed(generate) for _ in range(reps)]
    mask = {}
    if grammar is not None:
        step = statistics.median(tg) / n_gen
        mask = {"mask_ms_per_token": 1e3 * statistics.median(mask_s), "mask_ms_p90": 1e3 * float(np.quantile(mask_s, 0.9)),
                "decode_ms_per_token": 1e3 * step, "mask_share_of_step": statistics.median(mask_s) / step}
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
        **mask,
    }


def grammars_of(bundle: Bundle) -> Grammars:
    return Grammars((bundle.path / bundle.manifest["tokenizer"]).read_text(), bundle.config.vocab_size,
                    bundle.config.eos_token_ids)


def markdown(rows: list[dict]) -> str:
    head = "| model | quant | backend | threads | pp{p} t/s | tg{n} t/s | ttft s | load s | peak RSS MB |"
    lines = [head.format(p=rows[0]["n_prompt"], n=rows[0]["n_gen"]), "|---" * 9 + "|"]
    if "mask_ms_per_token" in rows[0]:
        lines[0] += " mask ms/token (share of a step) |"
        lines[1] += "---|"
    for r in rows:
        lines.append(f"| {r['model']} | {r['quant']} | {r['backend']} | {r['threads']} | "
                     f"{r['pp_tokens_per_s']:.1f} ± {r['pp_std']:.1f} | {r['tg_tokens_per_s']:.1f} ± {r['tg_std']:.1f} | "
                     f"{r['ttft_s']:.3f} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} |"
                     + (f" {r['mask_ms_per_token']:.3f} ({100 * r['mask_share_of_step']:.1f} %) |"
                        if "mask_ms_per_token" in r else ""))
    return "\n".join(lines)


def run(args) -> int:
    bundle_path = resolve(args.model, log=lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_path)
    verify_s = time.perf_counter() - t0
    grammar = grammars = None
    if args.json_schema:        # checked before any model loads: a bad schema fails at once
        grammar = Grammar.json_schema(json.loads(Path(args.json_schema).read_text()), origin=args.json_schema)
        grammars = grammars_of(bundle)
        grammars.check(grammar)
    rows = []
    for threads in args.threads or [default_threads()]:
        r = bench_one(bundle, args.backend, threads, args.n_prompt, args.n_gen, args.reps, grammar, grammars)
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
    b.add_argument("--json", action="store_true", help="JSON instead of a markdown table")
    b.add_argument("--json-schema", metavar="FILE", default=None,
                   help="generate under this JSON schema and report the token mask's cost per token")
    b.set_defaults(func=run)
