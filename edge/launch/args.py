"""Command-line options every command shares (like llama.cpp's common/arg): which model and
how to run it, and the sampling flags. Defaults come from `edge.launch.request`."""
from __future__ import annotations

import argparse

from edge.engine.engine import KV_TYPES
from edge.engine.repetition import MIN_REPEATS, MIN_SPAN
from edge.launch.request import (DEFAULT_CTX, DEFAULT_KV_POOL_MB, DEFAULT_MAX_TOKENS, DEFAULT_PARALLEL, DEFAULT_PROMPT_CACHE_MB, DEFAULT_SAMPLING,
                                 DEFAULT_SPECULATE, DEFAULT_THREADS, TERMINAL_STOP_LOOPS, RequestDefaults)
from edge.model.backends import BACKENDS
from edge.model.thread_policy import parse_threads


def add_model_choice(p: argparse.ArgumentParser) -> None:
    """--model and --backend."""
    p.add_argument("--model", "-m", help="a converted model's name (edge-llm models), bundle directory, HF checkpoint directory or GGUF file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="litert: the bundle's TFLite graph (default); numpy: float reference")


def number(kind=int, low=None, high=None, low_open: bool = False):
    """An argparse `type`: a number of `kind` in [low, high] (`low_open`: above low), refused
    at parse time with the option's name and the range, as argparse refuses a bad choice."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high) or value != value:       # value != value: nan
            raise argparse.ArgumentTypeError(f"must be {_range(low, high, low_open)}, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


def _range(low, high, low_open: bool) -> str:
    if low is not None and high is not None:
        return f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"
    if low is not None:
        return f"{'above' if low_open else 'at least'} {low:g}"
    return f"at most {high:g}"


port = number(int, 0, 65535)       # 0: any free port (the system picks one)
positive = number(int, 1)
non_negative = number(int, 0)


def add_model_args(p: argparse.ArgumentParser, ctx: int = DEFAULT_CTX) -> None:
    """--model, --backend, --threads and --ctx."""
    add_model_choice(p)
    p.add_argument("--threads", type=threads_arg, default=DEFAULT_THREADS,
                   help="worker threads: a number, or auto = one thread or all cores, whichever runs faster "
                        f"beside the machine's other work, timed as it runs (default {DEFAULT_THREADS})")
    p.add_argument("--ctx", type=non_negative, default=ctx,
                   help="most tokens one sequence may hold (prompt and reply); 0 = the model's maximum, bounded by "
                        f"memory; never more than --kv-pool-mb holds (default {ctx})")
    p.add_argument("--kv-pool-mb", type=non_negative, default=DEFAULT_KV_POOL_MB,
                   help="KV cache memory shared by all sequences: each takes what its tokens need, idle cached prompts "
                        "are evicted when it runs short, and a request waits while running ones hold it; "
                        f"0 = half the memory available at start (default {DEFAULT_KV_POOL_MB})")
    p.add_argument("--kv-type", default="f32", choices=sorted(KV_TYPES),
                   help="KV cache storage: f16 halves its memory (default f32)")


def add_parallel_args(p: argparse.ArgumentParser, default: int = DEFAULT_PARALLEL) -> None:
    p.add_argument("--parallel", "-np", type=positive, default=default,
                   help=f"sequences generated at once, each up to --ctx tokens, sharing --kv-pool-mb of KV cache "
                        f"(default {default})")
    p.add_argument("--prompt-cache-mb", type=non_negative, default=DEFAULT_PROMPT_CACHE_MB,
                   help="disk for the KV of long prompts, kept across restarts in the state directory "
                        f"(0 = off; default {DEFAULT_PROMPT_CACHE_MB})")


def threads_arg(value: str) -> int | str:
    try:
        return parse_threads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_sampling_args(p, max_tokens_help: str = str(DEFAULT_MAX_TOKENS)) -> None:
    """Sampling flags default to None ("not given"): `request_overrides` passes on only what
    the user set, and the one set of defaults in `edge.launch.request` fills the rest."""
    s = DEFAULT_SAMPLING
    p.add_argument("--max-tokens", "-n", type=positive, default=None, help=f"tokens to generate (default {max_tokens_help})")
    p.add_argument("--temperature", "--temp", type=number(float, 0), default=None, help=f"0 = greedy (default {s.temperature})")
    p.add_argument("--top-k", type=non_negative, default=None, help=f"0 = off (default {s.top_k})")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=None, help=f"1 = off (default {s.top_p})")
    p.add_argument("--min-p", type=number(float, 0, 1), default=None, help=f"0 = off (default {s.min_p})")
    p.add_argument("--repeat-penalty", type=number(float, 0, low_open=True), default=None,
                   help=f"1 = off (default {s.repetition_penalty})")
    p.add_argument("--seed", type=number(int, -1), default=None, help="sampling seed; -1 = random (default: random)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default: none)")
    p.add_argument("--speculate", default=None, choices=("on", "off"),
                   help="prompt-lookup speculative decoding: drafts copied from the prompt, checked in one pass; "
                        f"same output, faster when the reply repeats the prompt (default {'on' if DEFAULT_SPECULATE else 'off'})")
    p.add_argument("--stop-loops", default=None, choices=("on", "off"),
                   help=f"end a reply caught in an exact loop (the same run of tokens {MIN_REPEATS} times back to back, "
                        f"{MIN_SPAN}+ tokens) as if cut at the token limit (default {'on' if TERMINAL_STOP_LOOPS else 'off'} "
                        "for chat, run and the serial console; off for the HTTP APIs)")


def request_overrides(a: argparse.Namespace) -> dict:
    """The sampling flags as `RequestDefaults` field names (None = not given)."""
    return dict(max_tokens=a.max_tokens, stop=a.stop, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repeat_penalty, seed=a.seed,
                speculate=None if getattr(a, "speculate", None) is None else a.speculate == "on",
                stop_loops=None if getattr(a, "stop_loops", None) is None else a.stop_loops == "on")


TERMINAL_DEFAULTS = RequestDefaults(stop_loops=TERMINAL_STOP_LOOPS)


def request_defaults(a: argparse.Namespace, base: RequestDefaults = TERMINAL_DEFAULTS) -> RequestDefaults:
    """`base` (the terminal interfaces' defaults unless given) with the command's sampling flags applied."""
    return base.with_overrides(**request_overrides(a))
