"""The loop guard (edge/engine/repetition.py): exact repeats end a reply as "length", text
that only resembles itself never does, and it is on for the terminal interfaces and off for
the HTTP APIs unless asked for."""
from __future__ import annotations

import httpx
import openai
import pytest

from edge.engine.engine import Engine, GenerationParams
from edge.engine.repetition import MAX_PERIOD, MIN_REPEATS, MIN_SPAN, LoopGuard
from edge.engine.sampler import SamplingParams
from edge.launch.args import TERMINAL_DEFAULTS, request_defaults
from edge.launch.request import RequestDefaults
from edge.model.bundle import Bundle
from edge.cli import main as cli
from tests.http_server import endless_engine, ready_state, running


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


def test_run_says_when_the_guard_stopped_the_answer(tiny_bundle):
    import subprocess
    import sys
    argv = [sys.executable, "-m", "edge.cli", "run", "w1 w2 w3", "-m", str(tiny_bundle), "-n", "300",
            "--temperature", "0", "--ctx", "512"]
    guarded = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert guarded.returncode == 0, guarded.stderr
    words = len(guarded.stdout.split())
    assert words < 300
    assert f"the answer was stopped after {words} tokens: it was repeating itself" in guarded.stderr
    free = subprocess.run(argv + ["--stop-loops", "off"], capture_output=True, text=True, timeout=300)
    assert free.returncode == 0 and len(free.stdout.split()) == 300 and "repeating" not in free.stderr
    assert free.stdout.startswith(guarded.stdout.rstrip("\n"))          # the same answer, cut


def test_the_api_guards_only_when_asked(tiny_bundle):
    state = ready_state(endless_engine(tiny_bundle, 512))
    with running(state) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        ask = dict(model="tiny", messages=[{"role": "user", "content": "w1 w2 w3"}], max_tokens=300, temperature=0)
        free = client.chat.completions.create(**ask)
        assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 300
        guarded = client.chat.completions.create(**ask, extra_body={"stop_loops": True})
        assert guarded.choices[0].finish_reason == "length" and guarded.usage.completion_tokens < 300
        assert free.choices[0].message.content.startswith(guarded.choices[0].message.content)
        bad = httpx.post(f"{base}/v1/chat/completions", json={**ask, "stop_loops": "yes"}, timeout=60)
        assert bad.status_code == 400 and "stop_loops" in bad.text
