"""Command-line options every command shares (like llama.cpp's common/arg): which model and
how to run it, and the sampling flags. Defaults come from `edge.launch.request`."""
from __future__ import annotations

import argparse

from edge.engine.engine import KV_TYPES
from edge.launch.request import (DEFAULT_CTX, DEFAULT_MAX_TOKENS, DEFAULT_PARALLEL, DEFAULT_PROMPT_CACHE_MB, DEFAULT_SAMPLING,
                                 DEFAULT_SPECULATE, DEFAULT_THREADS, RequestDefaults)
from edge.model.backends import BACKENDS
from edge.model.thread_policy import parse_threads


def add_model_choice(p: argparse.ArgumentParser) -> None:
    """--model and --backend."""
    p.add_argument("--model", "-m", help="a converted model's name (edge-llm models), bundle directory, HF checkpoint directory or GGUF file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="litert: the bundle's TFLite graph (default); numpy: float reference")


def add_model_args(p: argparse.ArgumentParser, ctx: int = DEFAULT_CTX) -> None:
    """--model, --backend, --threads and --ctx."""
    add_model_choice(p)
    p.add_argument("--threads", type=threads_arg, default=DEFAULT_THREADS,
                   help="worker threads: a number, or auto = one thread or all cores, whichever runs faster "
                        f"beside the machine's other work, timed as it runs (default {DEFAULT_THREADS})")
    p.add_argument("--ctx", type=int, default=ctx, help=f"context length in tokens, per slot; 0 = the model's maximum, bounded by memory (default {ctx})")
    p.add_argument("--kv-type", default="f32", choices=sorted(KV_TYPES),
                   help="KV cache storage: f16 halves its memory (default f32)")


def add_parallel_args(p: argparse.ArgumentParser, default: int = DEFAULT_PARALLEL) -> None:
    p.add_argument("--parallel", "-np", type=_positive, default=default,
                   help=f"sequences generated at once, each in a slot with its own --ctx of KV cache "
                        f"(default {default})")
    p.add_argument("--prompt-cache-mb", type=int, default=DEFAULT_PROMPT_CACHE_MB,
                   help="disk for the KV of long prompts, kept across restarts in the state directory "
                        f"(0 = off; default {DEFAULT_PROMPT_CACHE_MB})")


def threads_arg(value: str) -> int | str:
    try:
        return parse_threads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return n


def add_sampling_args(p, max_tokens_help: str = str(DEFAULT_MAX_TOKENS)) -> None:
    """Sampling flags default to None ("not given"): `request_overrides` passes on only what
    the user set, and the one set of defaults in `edge.launch.request` fills the rest."""
    s = DEFAULT_SAMPLING
    p.add_argument("--max-tokens", "-n", type=int, default=None, help=f"tokens to generate (default {max_tokens_help})")
    p.add_argument("--temperature", "--temp", type=float, default=None, help=f"0 = greedy (default {s.temperature})")
    p.add_argument("--top-k", type=int, default=None, help=f"0 = off (default {s.top_k})")
    p.add_argument("--top-p", type=float, default=None, help=f"1 = off (default {s.top_p})")
    p.add_argument("--min-p", type=float, default=None, help=f"0 = off (default {s.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=None, help=f"1 = off (default {s.repetition_penalty})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default: none)")
    p.add_argument("--speculate", default=None, choices=("on", "off"),
                   help="prompt-lookup speculative decoding: drafts copied from the prompt, checked in one pass; "
                        f"same output, faster when the reply repeats the prompt (default {'on' if DEFAULT_SPECULATE else 'off'})")


def request_overrides(a: argparse.Namespace) -> dict:
    """The sampling flags as `RequestDefaults` field names (None = not given)."""
    return dict(max_tokens=a.max_tokens, stop=a.stop, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repeat_penalty, seed=a.seed,
                speculate=None if getattr(a, "speculate", None) is None else a.speculate == "on")


def request_defaults(a: argparse.Namespace, base: RequestDefaults = RequestDefaults()) -> RequestDefaults:
    """`base` with the command's sampling flags applied."""
    return base.with_overrides(**request_overrides(a))
