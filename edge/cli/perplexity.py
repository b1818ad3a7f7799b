"""`edge-llm perplexity FILE`: sliding-window perplexity, and how far a model's next-token
distributions are from a reference model's (llama.cpp's `--kl-divergence-base` / `--kl-divergence`).

The text is tokenized once; windows of `ctx` tokens advance by `stride`, and each window
scores only its last `stride` tokens (all of them in the first window), so every scored
token sees at least ctx - stride tokens of context. `--chunks` scores the positions
llama.cpp's `llama-perplexity` scores instead: non-overlapping chunks of `ctx` tokens, in each
the tokens after its first half (ctx - 1 - ctx/2 per chunk; with BOS, it replaces the chunk's
first token), so both tools' numbers come from the same tokens in the same contexts.

`--save-base FILE` (run with the f32 bundle) stores, per scored position, the reference's `k`
most likely tokens and their log-probabilities, plus the log of the probability mass left
over, and its perplexity. `--kl-base FILE` (run with a quantized bundle of the same model on
the same text) then reports the mean, 99th-percentile and maximum KL(reference || model) and
top-1 agreement against it. The KL is computed over the reference's top k tokens and one
bucket for all other tokens: exact when k is the vocabulary, otherwise a lower bound that
differs from the full sum only by the leftover mass's own divergence (with the default k of
256, the leftover mass of SmolLM2-135M is a fraction of a percent).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.launch.model_store import resolve, weight_cache_dir
from edge.launch.args import add_model_args, positive
from edge.model.backends import load_backend
from edge.model.bundle import Bundle

BASE_TOP_K = 256          # reference tokens kept per position in a --save-base file
BASE_FORMAT = 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def scored_logprobs(model, ids: list[int], ctx: int, stride: int, bos: int | None = None, progress=None,
                    chunks: bool = False):
    """Yield (targets, log-probabilities [n, V]) for each window's scored positions, in order."""
    if chunks:
        yield from _chunk_logprobs(model, ids, ctx, bos, progress)
        return
    cache = model.new_cache()
    body = ctx - (1 if bos is not None else 0)
    starts = range(0, max(len(ids) - body, 0) + 1, stride)
    nll, count = 0.0, 0
    for w, start in enumerate(starts):
        window = ids[start:start + body]
        tokens = ([bos] if bos is not None else []) + window
        cache.truncate(0)
        logits = np.asarray(model.prefill(tokens, cache, all_logits=True), np.float32)
        first = 0 if w == 0 else len(window) - stride     # score only what earlier windows did not
        offset = len(tokens) - len(window)
        js = np.arange(max(first, 1 - offset), len(window))
        lp = log_softmax(logits[offset + js - 1])
        targets = np.asarray(window, np.int64)[js]
        yield targets, lp
        nll -= float(lp[np.arange(len(js)), targets].sum())
        count += len(js)
        if progress:
            progress(w + 1, len(starts), math.exp(nll / max(count, 1)))


def _chunk_logprobs(model, ids: list[int], ctx: int, bos: int | None, progress=None):
    """llama-perplexity's positions: chunk c is ids[c*ctx:(c+1)*ctx] (its first token replaced
    by BOS when the model uses one), scoring the tokens after position ctx/2."""
    cache = model.new_cache()
    n_chunks, first = len(ids) // ctx, ctx // 2
    nll, count = 0.0, 0
    for c in range(n_chunks):
        tokens = list(ids[c * ctx:(c + 1) * ctx])
        if bos is not None:
            tokens[0] = bos
        cache.truncate(0)
        logits = np.asarray(model.prefill(tokens, cache, all_logits=True), np.float32)
        lp = log_softmax(logits[first:ctx - 1])
        targets = np.asarray(tokens[first + 1:], np.int64)
        yield targets, lp
        nll -= float(lp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        if progress:
            progress(c + 1, n_chunks, math.exp(nll / max(count, 1)))


def perplexity(model, ids: list[int], ctx: int, stride: int, bos: int | None = None,
               progress=None) -> tuple[float, int, list[int]]:
    """(perplexity, tokens scored, argmax predictions for those tokens)."""
    nll, count, top1 = 0.0, 0, []
    for targets, lp in scored_logprobs(model, ids, ctx, stride, bos, progress):
        nll -= float(lp[np.arange(len(targets)), targets].sum())
        top1 += np.argmax(lp, axis=-1).tolist()
        count += len(targets)
    return math.exp(nll / count), count, top1


# ---------------------------------------------------------------- the reference's distributions

def _tail_logsumexp(lp: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """log of the probability mass outside the `keep` columns of each row (-inf if none)."""
    rest = lp.copy()
    np.put_along_axis(rest, keep, -np.inf, axis=-1)
    m = rest.max(axis=-1, keepdims=True)
    finite = np.isfinite(m)
    m = np.where(finite, m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(rest - m).sum(axis=-1, keepdims=True)))[:, 0]


def top_k_summary(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids [n, k] most likely first, their log-probs [n, k], log of the leftover mass [n])."""
    k = min(k, lp.shape[-1])
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k] if k < lp.shape[-1] else np.tile(np.arange(k), (len(lp), 1))
    vals = np.take_along_axis(lp, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, axis=-1), np.take_along_axis(vals, order, axis=-1)
    return idx, vals, _tail_logsumexp(lp, idx)


def kl_divergence(base_idx: np.ndarray, base_lp: np.ndarray, base_tail: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row over P's kept tokens plus one bucket for the rest; `lq` [n, V] is Q's
    full log-probabilities. Exact when the kept tokens are the whole vocabulary."""
    base_lp, base_tail = base_lp.astype(np.float64), base_tail.astype(np.float64)
    q_kept = np.take_along_axis(lq, base_idx.astype(np.int64), axis=-1).astype(np.float64)
    p = np.exp(base_lp)
    kept = (p * (base_lp - q_kept)).sum(axis=-1)
    q_tail = _tail_logsumexp(lq, base_idx.astype(np.int64)).astype(np.float64)
    p_tail = np.exp(base_tail)
    with np.errstate(invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * (base_tail - q_tail), 0.0)
    return np.maximum(kept + tail, 0.0)


def text_digest(ids: list[int], ctx: int, stride: int, bos: int | None, chunks: bool = False) -> str:
    h = hashlib.sha256(np.asarray(ids, np.int64).tobytes())
    h.update(json.dumps([ctx, stride, bos] + (["chunks"] if chunks else [])).encode())
    return h.hexdigest()


@dataclass
class Base:
    """What --save-base stores: the reference's top-k per scored position and its perplexity."""
    digest: str
    idx: np.ndarray        # [N, k] token ids, most likely first
    lp: np.ndarray         # [N, k] float32 log-probs
    tail: np.ndarray       # [N] float32 log of the mass outside idx
    ppl: float
    model: str

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, format=np.int64(BASE_FORMAT), digest=np.str_(self.digest), idx=self.idx,
                                lp=self.lp, tail=self.tail, ppl=np.float64(self.ppl), model=np.str_(self.model))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Base":
        try:
            with np.load(path) as z:
                if int(z["format"]) != BASE_FORMAT:
                    raise ValueError(f"format {int(z['format'])}, this version reads {BASE_FORMAT}")
                return cls(str(z["digest"]), z["idx"], z["lp"], z["tail"], float(z["ppl"]), str(z["model"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a --save-base file of edge-llm perplexity ({e})") from e


@dataclass
class Scores:
    ppl: float
    n: int
    base_ppl: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def score(model, ids: list[int], ctx: int, stride: int, bos: int | None = None, progress=None,
          base: Base | None = None, save_k: int = 0, name: str = "", chunks: bool = False
          ) -> tuple[Scores, Base | None]:
    """Perplexity, and against `base` KL and top-1; with `save_k` also this model's own Base.
    chunks: llama-perplexity's positions (`_chunk_logprobs`) instead of the sliding window."""
    digest = text_digest(ids, ctx, 0 if chunks else stride, bos, chunks)
    if base is not None and base.digest != digest:
        raise ValueError(f"the base file was made from other tokens or settings (model {base.model}); "
                         "use the same text, tokenizer, --ctx, --stride and --chunks")
    nll, n, kls, agree, saved = 0.0, 0, [], 0, []
    for targets, lp in scored_logprobs(model, ids, ctx, stride, bos, progress, chunks):
        rows = np.arange(len(targets))
        nll -= float(lp[rows, targets].sum())
        if base is not None:
            sl = slice(n, n + len(targets))
            if sl.stop > len(base.idx):
                raise ValueError("the base file has fewer positions than this run scores")
            kls.append(kl_divergence(base.idx[sl], base.lp[sl], base.tail[sl], lp))
            agree += int((np.argmax(lp, axis=-1) == base.idx[sl, 0]).sum())
        if save_k:
            saved.append(top_k_summary(lp, save_k))
        n += len(targets)
    s = Scores(ppl=math.exp(nll / n), n=n)
    if base is not None:
        if n != len(base.idx):
            raise ValueError(f"the base file has {len(base.idx)} positions, this run scored {n}")
        kl = np.concatenate(kls)
        s.base_ppl, s.top1 = base.ppl, agree / n
        s.kl_mean, s.kl_p99, s.kl_max = float(kl.mean()), float(np.percentile(kl, 99)), float(kl.max())
    own = None
    if save_k:
        idx = np.concatenate([t[0] for t in saved])
        own = Base(digest, idx.astype(np.uint16 if idx.max(initial=0) < 2**16 else np.int32),
                   np.concatenate([t[1] for t in saved]).astype(np.float32),
                   np.concatenate([t[2] for t in saved]).astype(np.float32), s.ppl, name)
    return s, own


def run(args) -> int:
    bundle = Bundle.open(resolve(args.model, log=lambda m: print(m, file=sys.stderr)))
    text = Path(args.file).read_text(encoding="utf-8")
    ids = bundle.tokenizer().encode(text, add_special_tokens=False).ids
    need = 2 * args.ctx if args.chunks else args.ctx + 1
    if len(ids) < need:
        raise ValueError(f"{args.file}: {len(ids)} tokens; need at least {need} with --ctx {args.ctx}"
                         + (" and --chunks" if args.chunks else ""))
    if not args.chunks and (args.stride < 1 or args.stride > args.ctx):
        raise ValueError(f"--stride {args.stride}: must be between 1 and --ctx {args.ctx}")
    base = Base.load(Path(args.kl_base)) if args.kl_base else None
    model = load_backend(bundle, args.backend, args.ctx, args.threads, weight_cache_dir(bundle))
    bos = bundle.config.bos_token_id if bundle.manifest.get("add_bos") else None

    def show(i, n, ppl):
        if not args.json:
            print(f"\r[{i}/{n}] ppl {ppl:.4f}", end="", file=sys.stderr, flush=True)

    name = f"{bundle.name} {bundle.quant}"
    s, own = score(model, ids, args.ctx, args.stride, bos, progress=show, base=base,
                   save_k=args.top_k if args.save_base else 0, name=name, chunks=args.chunks)
    if own is not None:
        own.save(Path(args.save_base))
    if args.json:
        how = {"chunks": True} if args.chunks else {"stride": args.stride}
        print(json.dumps({"model": name, "file": str(args.file), "ctx": args.ctx, **how, **s.as_dict()}))
        return 0
    print(file=sys.stderr)
    how = f"chunks of {args.ctx}, second halves" if args.chunks else f"ctx {args.ctx}, stride {args.stride}"
    print(f"{name}: perplexity {s.ppl:.4f} over {s.n} tokens ({how})")
    if base is not None:
        print(f"  against {base.model} (perplexity {base.ppl:.4f}, {100 * (s.ppl / base.ppl - 1):+.2f} %): "
              f"mean KL {s.kl_mean:.6f}, 99th percentile KL {s.kl_p99:.6f}, max KL {s.kl_max:.4f}, "
              f"top-1 agreement {100 * s.top1:.2f} %")
    if own is not None:
        print(f"  saved its top-{own.idx.shape[1]} distributions to {args.save_base}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file, and KL divergence "
                                          "against a reference model's saved distributions")
    p.add_argument("file", help="UTF-8 text file to score (e.g. bench/eval/*.txt)")
    add_model_args(p, ctx=512)
    p.add_argument("--stride", type=positive, default=256, help="tokens the window moves per step")
    p.add_argument("--chunks", action="store_true",
                   help="score llama-perplexity's positions: non-overlapping --ctx chunks, the tokens after "
                        "each chunk's first half (--stride is not used)")
    p.add_argument("--save-base", metavar="FILE",
                   help="store this model's next-token distributions (run it with the f32 bundle)")
    p.add_argument("--kl-base", metavar="FILE",
                   help="report KL divergence and top-1 agreement against a --save-base file")
    p.add_argument("--top-k", type=positive, default=BASE_TOP_K,
                   help=f"reference tokens --save-base keeps per position (default {BASE_TOP_K})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)
