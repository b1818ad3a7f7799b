"""`edge-llm perplexity FILE`: sliding-window perplexity, as llama.cpp's tool reports it.

The text is tokenized once; windows of `ctx` tokens advance by `stride`, and each window
scores only its last `stride` tokens (all of them in the first window), so every scored
token sees at least ctx - stride tokens of context.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from edge.launch.model_store import resolve, weight_cache_dir
from edge.launch.args import add_model_args, positive
from edge.model.backends import load_backend
from edge.model.bundle import Bundle


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def perplexity(model, ids: list[int], ctx: int, stride: int, bos: int | None = None,
               progress=None) -> tuple[float, int, list[int]]:
    """(perplexity, tokens scored, argmax predictions for those tokens)."""
    cache = model.new_cache()
    nll, count, top1 = 0.0, 0, []
    body = ctx - (1 if bos is not None else 0)
    starts = range(0, max(len(ids) - body, 0) + 1, stride)
    for w, start in enumerate(starts):
        window = ids[start:start + body]
        tokens = ([bos] if bos is not None else []) + window
        cache.truncate(0)
        logits = model.prefill(tokens, cache, all_logits=True)
        first = 0 if w == 0 else len(window) - stride     # score only what earlier windows did not
        offset = len(tokens) - len(window)
        for j in range(max(first, 1 - offset), len(window)):
            lp = log_softmax(logits[offset + j - 1])
            nll -= float(lp[window[j]])
            top1.append(int(np.argmax(lp)))
            count += 1
        if progress:
            progress(w + 1, len(starts), math.exp(nll / max(count, 1)))
    return math.exp(nll / count), count, top1


def run(args) -> int:
    bundle = Bundle.open(resolve(args.model, log=lambda m: print(m, file=sys.stderr)))
    text = Path(args.file).read_text(encoding="utf-8")
    ids = bundle.tokenizer().encode(text, add_special_tokens=False).ids
    if len(ids) < args.ctx + 1:
        raise ValueError(f"{args.file}: {len(ids)} tokens; need more than --ctx {args.ctx}")
    model = load_backend(bundle, args.backend, args.ctx, args.threads, weight_cache_dir(bundle))
    bos = bundle.config.bos_token_id if bundle.manifest.get("add_bos") else None

    def show(i, n, ppl):
        print(f"\r[{i}/{n}] ppl {ppl:.4f}", end="", file=sys.stderr, flush=True)

    ppl, n, _ = perplexity(model, ids, args.ctx, args.stride, bos, progress=show)
    print(file=sys.stderr)
    print(f"{bundle.name} {bundle.quant}: perplexity {ppl:.4f} over {n} tokens (ctx {args.ctx}, stride {args.stride})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    p.add_argument("file", help="UTF-8 text file to score (e.g. edge/data/perplexity/*.txt)")
    add_model_args(p, ctx=512)
    p.add_argument("--stride", type=positive, default=256, help="tokens the window moves per step")
    p.set_defaults(func=run)
