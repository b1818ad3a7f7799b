"""A guard against runaway replies: the same n-gram of tokens, over and over.

A small model sometimes falls into a loop (an emoji, a phrase, a whole line, again and again)
and would fill the context. `LoopGuard` watches a reply's tokens and says when its tail is an
exact repetition: a period of `p` tokens (1 <= p <= MAX_PERIOD) repeated back to back over at
least max(MIN_SPAN, MIN_REPEATS * p) tokens. So one token 64 times, a 16-token phrase 4 times
(64 tokens), a 64-token paragraph 4 times (256 tokens). Only exact repeats count; text that
merely resembles itself (a numbered list, a table's rows) never does.

The engine then ends the reply as if it had reached its token limit (finish_reason "length"):
the reply was cut, not finished. Interfaces turn it on per request (`GenerationParams.stop_loops`).
"""
from __future__ import annotations

MAX_PERIOD = 64        # longest repeated unit looked for, in tokens
MIN_REPEATS = 4        # back-to-back copies of it
MIN_SPAN = 64          # and at least this many tokens in the repetition


class LoopGuard:
    """Feed it each generated token; `feed` returns True once the tail is a loop.

    For each period p it keeps the number of consecutive latest tokens equal to the token p
    before them: the tail is periodic with period p over that many tokens plus p."""

    def __init__(self, max_period: int = MAX_PERIOD, min_repeats: int = MIN_REPEATS, min_span: int = MIN_SPAN):
        self.max_period, self.min_repeats, self.min_span = max_period, min_repeats, min_span
        self.tokens: list[int] = []
        self.runs = [0] * (max_period + 1)       # runs[p] for p = 1..max_period
        self.period: int | None = None           # the loop's period, once found

    def feed(self, token: int) -> bool:
        toks = self.tokens
        toks.append(token)
        n = len(toks)
        runs = self.runs
        for p in range(1, min(self.max_period, n - 1) + 1):
            if toks[n - 1 - p] == token:
                runs[p] += 1
                if runs[p] + p >= self.min_span and runs[p] + p >= self.min_repeats * p:
                    self.period = p
                    return True
            else:
                runs[p] = 0
        if n > 4 * self.max_period * self.min_repeats:      # only the tail is ever looked at
            del toks[:n - self.max_period - 1]
        return False
