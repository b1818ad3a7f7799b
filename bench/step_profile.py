"""Where a decode step's time goes: one request through the real engine, every component timed.

    python bench/step_profile.py --model BUNDLE [--threads 2] [--steps 64] [--prompt-tokens 128]
    python bench/step_profile.py --model BUNDLE --rows 0-8        # + (k+1)-row verification steps
    python bench/step_profile.py --model BUNDLE --json

The components are timed with time.perf_counter around the engine's own objects (wrappers put
on the loaded instances, nothing in edge/ is changed), so the same script measures any version
of the code:

- invoke entry / layers / lm_head: LiteRT's RunByIndex alone (the XNNPACK matmuls)
- runner copies: the rest of a graph call (input checks, copying inputs in and outputs out)
- embed, attention (RoPE inside it separately), glue: the rest of `forward_batch`
- sample, detokenize, stop strings, logprobs: `Sequence.take`'s parts
- engine bookkeeping: the rest of `Engine.step`

Decode steps only (the prompt's prefill steps are left out); figures are the mean ms per step
over `--steps` tokens, each configuration run `--reps` times (the fastest repetition is kept:
on a shared machine the others only add other jobs' noise).
`--rows K0-K1` also runs one sequence's (k+1)-row steps (all rows' logits, as speculative
verification needs them) after the prompt, rolled back after each, and profiles the model side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARAGRAPH = ("The lighthouse keeper walked up the spiral stairs every evening at dusk, carrying a small "
             "can of oil and a cloth to polish the great lens. Ships passing the rocky headland relied "
             "on its beam, and in forty years the light had never once failed. ")


class Clock:
    """Accumulates seconds per component for the current step."""

    def __init__(self):
        self.now = defaultdict(float)

    def wrap(self, key, fn):
        now = self.now

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                now[key] += time.perf_counter() - t
        return timed

    def take(self) -> dict:
        out = dict(self.now)
        self.now.clear()
        return out


def instrument_model(model, clock: Clock) -> None:
    """Time the LiteRT model's parts on this instance."""
    def runner(r, name):
        sig = getattr(r, "__self__", r)      # a bound method (the runner's `fresh`) or the signature
        inner = getattr(sig, "_run", None)
        if inner is not None:
            sig._run = clock.wrap(f"invoke {name}", inner)
        return clock.wrap(f"call {name}", r)

    model.entry = runner(model.entry, "entry")
    model.layers = [runner(r, "layers") for r in model.layers]
    model.lm_head = runner(model.lm_head, "lm_head")
    model.embed = clock.wrap("embed", model.embed)
    att = model.attention
    name = "rotated" if hasattr(att.rope, "rotated") else "apply"     # before/after the fused RoPE
    setattr(att.rope, name, clock.wrap("rope", getattr(att.rope, name)))
    model.attention = clock.wrap("attention", att)
    model.forward_batch = clock.wrap("forward", model.forward_batch)


def model_parts(raw: dict) -> dict:
    """ms per component of the model side, from one step's raw seconds."""
    ms = {k: 1e3 * v for k, v in raw.items()}
    out = {}
    invoke = 0.0
    copies = 0.0
    for n in ("entry", "layers", "lm_head"):
        out[f"invoke {n}"] = ms.get(f"invoke {n}", 0.0)
        invoke += out[f"invoke {n}"]
        copies += ms.get(f"call {n}", 0.0) - out[f"invoke {n}"]
    out["runner copies"] = copies
    out["embed"] = ms.get("embed", 0.0)
    out["attention: RoPE"] = ms.get("rope", 0.0)
    out["attention: rest"] = ms.get("attention", 0.0) - ms.get("rope", 0.0)
    out["glue (forward)"] = ms.get("forward", 0.0) - invoke - copies - out["embed"] - ms.get("attention", 0.0)
    out["model total"] = ms.get("forward", 0.0)
    return out


def instrument_engine(engine, clock: Clock) -> None:
    import edge.engine.engine as E
    from edge.engine import detokenizer, sampler, stop_strings
    sampler.Sampler.sample = clock.wrap("sample", sampler.Sampler.sample)
    detokenizer.StreamDecoder.push = clock.wrap("detokenize", detokenizer.StreamDecoder.push)
    stop_strings.StopMatcher.feed = clock.wrap("stop strings", stop_strings.StopMatcher.feed)
    engine.token_logprob = clock.wrap("logprobs", engine.token_logprob)
    del E


def engine_profile(engine, clock: Clock, prompt_ids, params, steps: int) -> list[dict]:
    seq = engine.start(prompt_ids, params)
    rows = []
    try:
        while not seq.done:
            decoding = seq.decoding
            clock.take()
            t = time.perf_counter()
            engine.step([seq])
            total = time.perf_counter() - t
            raw = clock.take()
            if not decoding:
                continue
            r = model_parts(raw)
            for k in ("sample", "detokenize", "stop strings", "logprobs"):
                r[k] = 1e3 * raw.get(k, 0.0)
            r["engine bookkeeping"] = 1e3 * total - r["model total"] - sum(
                r[k] for k in ("sample", "detokenize", "stop strings", "logprobs"))
            r["step total"] = 1e3 * total
            rows.append(r)
    finally:
        engine.release(seq)
    if len(rows) < steps - 1:
        print(f"  (only {len(rows)} decode steps: the request ended early)", file=sys.stderr)
    return rows


def rows_profile(model, clock: Clock, prompt_ids, k: int, reps: int, switch: bool = False) -> list[dict]:
    """(k+1)-row steps of one sequence after its prompt, all rows' logits, rolled back. With
    `switch` each follows a one-row step (untimed), as when decode and verification alternate."""
    cache = model.new_cache()
    model.prefill(prompt_ids, cache)
    n = cache.length
    tokens = [int(t) for t in prompt_ids[1:k + 2]]
    model.forward(tokens, cache, all_logits=True)      # warm-up: the (k+1)-row buffers
    cache.truncate(n)
    out = []
    for _ in range(reps):
        if switch:
            model.forward(tokens[:1], cache)
            cache.truncate(n)
        clock.take()
        t = time.perf_counter()
        model.forward(tokens, cache, all_logits=True)
        total = time.perf_counter() - t
        cache.truncate(n)
        r = model_parts(clock.take())
        r["step total"] = 1e3 * total
        out.append(r)
    return out


def mean(rows: list[dict]) -> dict:
    keys = list(rows[0])
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def k_range(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a bundle directory, or a model name (edge-llm models)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per request")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="greedy,default,logprobs",
                    help="greedy (temperature 0), default (the product's sampling defaults), "
                         "logprobs (default + top_logprobs 5)")
    ap.add_argument("--rows", default="", help="also profile (k+1)-row steps, e.g. 0-8")
    ap.add_argument("--switch", action="store_true",
                    help="each (k+1)-row step follows a one-row step (T changes every step)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from edge.engine.engine import Engine
    from edge.launch.model_store import open_bundle, weight_cache_dir
    from edge.launch.request import RequestDefaults
    bundle = open_bundle(args.model, log=lambda m: print(m, file=sys.stderr), verify=False)
    engine = Engine(bundle, max_ctx=args.prompt_tokens + args.steps + 16, backend="litert",
                    threads=args.threads, weight_cache=weight_cache_dir(bundle))
    clock = Clock()
    instrument_model(engine.model, clock)
    instrument_engine(engine, clock)
    ids = engine.encode_text(PARAGRAPH * 20)[:args.prompt_tokens]
    defaults = RequestDefaults()
    modes = {"greedy": defaults.build(max_tokens=args.steps, temperature=0, stop=["\n\nUser:"]),
             "default": defaults.build(max_tokens=args.steps, seed=1, stop=["\n\nUser:"]),
             "logprobs": defaults.build(max_tokens=args.steps, seed=1, stop=["\n\nUser:"], logprobs=5)}
    result = {"model": bundle.name, "quant": bundle.quant, "threads": args.threads,
              "prompt_tokens": len(ids), "steps": args.steps, "load": os.getloadavg(), "modes": {}, "rows": {}}
    engine_profile(engine, clock, ids, modes["greedy"], 4)          # warm-up
    for name in filter(None, args.modes.split(",")):
        best = None
        for _ in range(args.reps):
            m = mean(engine_profile(engine, clock, ids, modes[name], args.steps))
            if best is None or m["step total"] < best["step total"]:
                best = m
        result["modes"][name] = best
    for k in k_range(args.rows) if args.rows else []:
        result["rows"][k] = mean(rows_profile(engine.model, clock, ids, k, max(args.reps, 5), args.switch))
    result["load_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(markdown(result))
    return 0


def markdown(res: dict) -> str:
    lines = [f"{res['model']} ({res['quant']}), {res['threads']} threads, prompt {res['prompt_tokens']}, "
             f"{res['steps']} steps, load {res['load'][0]:.2f} -> {res['load_after'][0]:.2f}", ""]
    modes = list(res["modes"])
    if modes:
        keys = list(res["modes"][modes[0]])
        lines += ["| ms per decode step | " + " | ".join(modes) + " |", "|---" + "|---:" * len(modes) + "|"]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{res['modes'][m][k]:.3f}" for m in modes) + " |")
    if res["rows"]:
        ks = list(res["rows"])
        keys = list(res["rows"][ks[0]])
        base = res["rows"][ks[0]]["step total"]
        lines += ["", "| ms per (k+1)-row step | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---" + "|---:" * len(ks) + "|"]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{res['rows'][j][k]:.3f}" for j in ks) + " |")
        lines.append("| ÷ one row | " + " | ".join(f"{res['rows'][j]['step total'] / base:.2f}x" for j in ks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
