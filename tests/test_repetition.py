"""The loop guard (edge/engine/repetition.py): exact repeats end a reply as "length", text
that only resembles itself never does, and it is on for the terminal interfaces and off for
the HTTP APIs unless asked for."""
from __future__ import annotations

import pytest

from edge.engine.engine import Engine, GenerationParams
from edge.engine.repetition import MAX_PERIOD, MIN_REPEATS, MIN_SPAN, LoopGuard
from edge.engine.sampler import SamplingParams
from edge.launch.args import TERMINAL_DEFAULTS, request_defaults
from edge.launch.request import RequestDefaults
from edge.model.bundle import Bundle
from edge.cli import main as cli


def first_loop(tokens) -> int | None:
    """How many tokens a guard reads before it says "loop" (None: never)."""
    guard = LoopGuard()
    return next((i + 1 for i, t in enumerate(tokens) if guard.feed(t)), None)


@pytest.mark.parametrize("period", [1, 2, 7, 16, 40, MAX_PERIOD])
def test_an_exact_repeat_is_caught_once_it_is_long_enough(period):
    unit = list(range(100, 100 + period))
    intro = [1, 2, 3, 4, 5]
    tokens = intro + unit * 200
    span = max(MIN_SPAN, MIN_REPEATS * period)
    assert first_loop(tokens) == len(intro) + span
    guard = LoopGuard()
    for t in tokens[:len(intro) + span]:
        guard.feed(t)
    assert guard.period == period


@pytest.mark.parametrize("tokens", [
    [t for i in range(400) for t in (1000 + i, 7, 8)],                 # a numbered list: "1. x", "2. x", ...
    [t for i in range(10) for t in [5] * 40 + [1000 + i]],            # runs of 40, each ended differently
    list(range(30)) * (MIN_REPEATS - 1) + list(range(200, 400)),        # a chorus three times, then on
    [t for i in range(300) for t in (9, 9, 9, 1000 + i)],               # table rows: same cells, new numbers
    list(range(MAX_PERIOD + 1)) * 8,                                    # a unit longer than MAX_PERIOD
])
def test_text_that_only_resembles_itself_runs_on(tokens):
    assert first_loop(tokens) is None


def test_the_guard_keeps_a_bounded_tail():
    guard = LoopGuard()
    for i in range(100_000):
        assert not guard.feed(i)
    assert len(guard.tokens) <= 4 * MAX_PERIOD * MIN_REPEATS


def test_the_engine_ends_a_looping_reply_as_length(tiny_bundle):
    engine = Engine(Bundle.open(tiny_bundle), max_ctx=512)
    engine.eos_ids = frozenset()
    ids = engine.encode_chat([{"role": "user", "content": "w1 w2 w3"}])
    greedy = SamplingParams(temperature=0)
    free = list(engine.generate(ids, GenerationParams(max_tokens=300, sampling=greedy)))
    tokens = [ev.token_id for ev in free if ev.token_id is not None]
    assert len(tokens) == free[-1].usage.completion_tokens == 300       # every token came with its id
    k = first_loop(tokens)
    assert k is not None and k < 300, "the greedy tiny random model falls into a loop"

    guarded = list(engine.generate(ids, GenerationParams(max_tokens=300, sampling=greedy, stop_loops=True)))
    assert guarded[-1].finish_reason == "length"
    assert guarded[-1].usage.completion_tokens == k
    assert [ev.token_id for ev in guarded if ev.token_id is not None] == tokens[:k]   # the same reply, cut


def test_on_for_the_terminal_off_for_the_api():
    assert RequestDefaults().build().stop_loops is False                 # the APIs' defaults
    assert TERMINAL_DEFAULTS.build().stop_loops is True
    parser = cli.build_parser()
    assert request_defaults(parser.parse_args(["chat"])).build().stop_loops is True
    assert request_defaults(parser.parse_args(["run", "x"])).build().stop_loops is True
    assert request_defaults(parser.parse_args(["chat", "--stop-loops", "off"])).build().stop_loops is False
    serve = parser.parse_args(["serve"])
    assert request_defaults(serve, RequestDefaults(max_tokens=None)).build().stop_loops is False
    serve = parser.parse_args(["serve", "--stop-loops", "on"])
    assert request_defaults(serve, RequestDefaults(max_tokens=None)).build().stop_loops is True
    with pytest.raises(ValueError, match="stop_loops must be true or false"):
        RequestDefaults().build(stop_loops="yes")
