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
from edge.engine.engine import Engine, GenerationParams
from edge.engine.sampler import SamplingParams
from edge.launch.args import add_model_choice, non_negative, positive
from edge.launch.model_store import resolve, weight_cache_dir
from edge.launch.request import DEFAULT_THREADS
from edge.model.backends import load_backend
from edge.model.thread_policy import parse_threads
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
        **({"thread_policy": {str(k): v for k, v in model.policy.summary().items()}}
           if getattr(model, "policy", None) else {}),
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


GROUNDED = Path(__file__).resolve().parent.parent / "data" / "grounded" / "prompts.json"


def bench_speculation(bundle: Bundle, backend: str, threads: int, n_gen: int, reps: int, progress=None,
                      prompts: Path = GROUNDED) -> list[dict]:
    """Greedy replies to the shipped prompts (grounded: summaries, tool calls quoting the
    prompt, corrections; and novel text), with speculation off and on, interleaved: effective
    decode tokens/s of each, the draft acceptance, and the outputs asserted identical."""
    say = progress or (lambda msg: None)
    engine = Engine(bundle, max_ctx=2048, backend=backend, threads=threads, weight_cache=weight_cache_dir(bundle))
    greedy = SamplingParams(temperature=0.0)

    def reply(ids, speculate):
        engine.reset()
        seq = engine.start(ids, GenerationParams(max_tokens=n_gen, sampling=greedy, speculate=speculate))
        tokens = []
        while not seq.done:
            for _, events in engine.step([seq]):
                tokens += [e.token_id for e in events if e.token_id is not None]
        u = seq.usage
        return tokens, u.completion_tokens - 1, u.decode_seconds, seq.spec.stats if seq.spec else None

    rows = []
    cases = json.loads(Path(prompts).read_text())
    reply(engine.encode_chat(cases[0]["messages"]), True)           # warm-up: buffers of every row count
    for j, case in enumerate(cases):
        ids = engine.encode_chat(case["messages"])
        plain_s, spec_s = [], []
        for r in range(reps):
            say(f"speculation: prompt {j + 1}/{len(cases)} ({case['kind']}), run {r + 1}/{reps}")
            want, n, t, _ = reply(ids, False)
            got, n2, t2, stats = reply(ids, True)
            if got != want:
                raise AssertionError(f"prompt {j + 1}: speculation changed the greedy output")
            plain_s.append(t)
            spec_s.append(t2)
        rows.append({"kind": case["kind"], "prompt": j + 1, "prompt_tokens": len(ids), "decode_tokens": n,
                     "plain_tokens_per_s": n / statistics.median(plain_s),
                     "spec_tokens_per_s": n / statistics.median(spec_s),
                     "speedup": statistics.median(plain_s) / statistics.median(spec_s),
                     "drafted": stats.drafted, "accepted": stats.accepted, "verify_steps": stats.steps,
                     "acceptance": stats.acceptance, "steps": n - stats.accepted,
                     "tokens_per_step": n / max(1, n - stats.accepted),
                     "plain_samples_s": plain_s, "spec_samples_s": spec_s, "identical": True,
                     "verify_steps_drafted_accepted": stats.per_step, "plain_steps": stats.plain_steps})
    return rows


def speculation_summary(rows: list[dict]) -> list[dict]:
    """Per kind of prompt: tokens and times summed over its prompts."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = [r for r in rows if r["kind"] == kind]
        n = sum(r["decode_tokens"] for r in rs)
        plain = sum(r["decode_tokens"] / r["plain_tokens_per_s"] for r in rs)
        spec = sum(r["decode_tokens"] / r["spec_tokens_per_s"] for r in rs)
        drafted, accepted = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
        out.append({"kind": kind, "prompts": len(rs), "decode_tokens": n, "plain_tokens_per_s": n / plain,
                    "spec_tokens_per_s": n / spec, "speedup": plain / spec, "drafted": drafted,
                    "accepted": accepted, "acceptance": accepted / drafted if drafted else 0.0,
                    "tokens_per_step": n / max(1, n - accepted)})
    return out


def markdown_speculation(rows: list[dict]) -> str:
    lines = ["| prompts | n | decode tokens | plain t/s | speculative t/s | speedup | drafted | accepted "
             "| acceptance | tokens per step | identical |", "|---" * 11 + "|"]
    for r in speculation_summary(rows):
        lines.append(f"| {r['kind']} | {r['prompts']} | {r['decode_tokens']} | {r['plain_tokens_per_s']:.1f} | "
                     f"{r['spec_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['drafted']} | {r['accepted']} | "
                     f"{100 * r['acceptance']:.0f} % | {r['tokens_per_step']:.2f} | yes |")
    return "\n".join(lines)


def bench_verify_curve(bundle: Bundle, backend: str, threads: int, n_ctx: int, k_max: int, reps: int,
                       progress=None) -> list[dict]:
    """Time of one decode step of k+1 rows (a draft of k checked) at n_ctx cached tokens,
    for k = 0..k_max: blocks of steps per k, the k order rotated each round, medians."""
    say = progress or (lambda msg: None)
    model = load_backend(bundle, backend, n_ctx + k_max + 8, threads, weight_cache_dir(bundle))
    cache = model.new_cache()
    rng = np.random.default_rng(0)
    cache.append(rng.integers(0, bundle.config.vocab_size, n_ctx))   # positions to attend over
    ks = list(range(k_max + 1))
    samples: dict[int, list[float]] = {k: [] for k in ks}
    block = 4
    for r in range(reps + 1):
        say(f"verify curve, {threads} threads: round {r + 1}/{reps + 1}")
        for k in ks[r % len(ks):] + ks[:r % len(ks)]:
            tokens = rng.integers(0, bundle.config.vocab_size, k + 1)
            verify = [(tokens, cache)]
            model.forward_batch(verify, all_logits=True, stepwise=[True])   # this row count's buffers
            cache.truncate(n_ctx)
            for _ in range(block):
                t = time.perf_counter()
                model.forward_batch(verify, all_logits=True, stepwise=[True])
                dt = time.perf_counter() - t
                cache.truncate(n_ctx)
                if r:                                                      # round 0 warms up
                    samples[k].append(dt)
    base = statistics.median(samples[0])
    return [{"model": bundle.name, "quant": bundle.quant, "backend": model.backend, "threads": threads,
             "n_ctx": n_ctx, "k": k, "rows": k + 1, "step_ms": 1e3 * statistics.median(samples[k]),
             "vs_one_row": statistics.median(samples[k]) / base, "samples_s": samples[k]} for k in ks]


def markdown_verify_curve(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"{r0['model']} {r0['quant']}, {r0['backend']}, {r0['threads']} threads, {r0['n_ctx']} tokens cached",
             "", "| k (draft) | rows | step ms | ÷ one row |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['rows']} | {r['step_ms']:.2f} | {r['vs_one_row']:.2f}x |")
    return "\n".join(lines)


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


def threads_list(text: str) -> list[int | str]:
    """"1,2,auto" -> [1, 2, "auto"]."""
    try:
        return [parse_threads(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    if args.speculate or args.verify_curve is not None:
        for threads in args.threads or [DEFAULT_THREADS]:
            runs = []          # (rows, their markdown)
            if args.verify_curve is not None:
                runs.append((bench_verify_curve(bundle, args.backend, threads, args.n_prompt[0], args.verify_curve,
                                                args.reps, progress), markdown_verify_curve))
            if args.speculate:
                runs.append((bench_speculation(bundle, args.backend, threads, args.n_gen[0] or 128, args.reps,
                                               progress, args.prompts or GROUNDED), markdown_speculation))
            for part, markdown_of in runs:
                rows += part
                if not args.json:
                    print(markdown_of(part))
        if args.json:
            print(json.dumps(rows, indent=1))
        return 0
    if args.parallel:
        for threads in args.threads or [DEFAULT_THREADS]:
            rows += bench_parallel(bundle, args.backend, threads, args.n_prompt[0], args.n_gen[0] or 64, args.reps,
                                   args.parallel)
        print(json.dumps(rows, indent=1) if args.json else markdown_parallel(rows))
        return 0
    for threads in args.threads or [DEFAULT_THREADS]:
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
    b.add_argument("-t", "--threads", type=threads_list, default=None,
                   help="thread counts or auto, comma separated (e.g. 1,2,auto); "
                        f"default {DEFAULT_THREADS}: one thread or all cores, whichever is faster as it runs")
    b.add_argument("-r", "--reps", type=positive, default=3, help="repetitions of each test (default 3)")
    b.add_argument("--json", action="store_true", help="JSON (every figure and sample) instead of the table")
    b.add_argument("-v", "--verbose", action="store_true",
                   help="also print time to first token, load time, KV cache size and peak RSS")
    b.add_argument("-np", "--parallel", type=int_list, default=None,
                   help="sequences decoded together, comma separated (e.g. 1,2,4,8): aggregate decode speed, "
                        "like llama-batched-bench (default: off)")
    b.add_argument("--json-schema", metavar="FILE", default=None,
                   help="generate under this JSON schema and report the token mask's cost per token "
                        "(shown with the -v table)")
    b.add_argument("--speculate", action="store_true",
                   help="greedy replies to the shipped grounded prompts (summaries, tool calls, corrections) and "
                        "novel text, speculation off and on: effective decode t/s, draft acceptance, identical "
                        "output asserted (-n: tokens per reply, default 128)")
    b.add_argument("--prompts", type=Path, default=None,
                   help="with --speculate: a JSON list of {kind, messages} instead of the shipped set")
    b.add_argument("--verify-curve", type=non_negative, metavar="K", default=None,
                   help="time of a decode step of k+1 rows against one row, k = 0..K, at -p tokens cached")
    b.set_defaults(func=run)
