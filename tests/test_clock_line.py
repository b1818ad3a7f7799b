"""Home Assistant 2025.x's leading clock line is read last, so a second conversation of a home
reuses the whole home's prompt; `--clock-line keep` leaves the prompt as it came."""
from __future__ import annotations

import re
from datetime import datetime

import pytest

from bench.assist import conversation
from edge.api.ollama_api import create_ollama_app
from edge.engine.clock_line import clock_last
from edge.engine.engine import Engine
from edge.model.bundle import Bundle
from edge.service import serve
from edge.cli.main import build_parser
from tests.http_server import ready_state, running

CLOCK = "Current time is 18:02:11. Today's date is 2025-04-15."


def test_the_leading_clock_line_moves_to_the_end_of_the_system_message():
    first = conversation(10, datetime(2025, 4, 15, 18, 2, 11), True, "Turn on the kitchen light.")
    assert first[0]["content"].startswith(CLOCK + "\n")
    moved = clock_last(first)
    assert moved[0]["content"].endswith("\n" + CLOCK) and CLOCK not in moved[0]["content"][:-len(CLOCK)]
    assert sorted(moved[0]["content"].splitlines()) == sorted(first[0]["content"].splitlines())
    assert moved[1:] == first[1:] and first[0]["content"].startswith(CLOCK)      # the request is not changed
    later = clock_last(conversation(10, datetime(2025, 4, 15, 19, 30, 5), True, "Turn on the kitchen light."))
    assert later[0]["content"][:-len(CLOCK)] == moved[0]["content"][:-len(CLOCK)]   # one prefix for the home
    assert clock_last([{**first[0], "role": "developer"}])[0]["content"] == moved[0]["content"]


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "user", "content": CLOCK + "\nhello"}],                           # not a system message
    [{"role": "system", "content": "You are helpful.\n" + CLOCK + "\n"}],        # already last
    [{"role": "system", "content": CLOCK + "\n  \n"}],                           # nothing after it
    [{"role": "system", "content": "Current time is soon. Today's date is 2025-04-15.\nHi"}],
    [{"role": "system", "content": [{"type": "text", "text": CLOCK + "\nHi"}]}],  # parts, not a string
])
def test_anything_else_is_left_as_it_is(messages):
    assert clock_last(messages) is messages


def test_serve_flag():
    assert serve.server_config(build_parser().parse_args(["serve"]), None).clock_last is True
    assert serve.server_config(build_parser().parse_args(["serve", "--clock-line", "keep"]), None).clock_last is False


@pytest.fixture(scope="module")
def smol_engine(smol_bundle):
    return Engine(Bundle.open(smol_bundle), max_ctx=4096)


@pytest.mark.parametrize("clock_last", [True, False])
def test_a_second_conversation_of_a_home_reuses_its_prompt(smol_engine, clock_last):
    """The real `ollama` client, two conversations of one home an hour apart with the time
    first (Home Assistant 2025.4's order; without its tools, which we render first anyway)."""
    import ollama
    smol_engine.reset()
    state = ready_state(smol_engine, clock_last=clock_last)
    cached = []
    with running(state, make_app=create_ollama_app) as base:
        client = ollama.Client(host=base, timeout=600)
        for hour in (18, 19):
            messages = conversation(10, datetime(2025, 4, 15, hour, 2, 11), True, "Turn on the kitchen light.")
            before = _cached(state)
            got = client.chat(model=smol_engine.name, messages=messages, keep_alive=-1,
                              options={"num_ctx": 8192, "num_predict": 2, "temperature": 0})
            cached.append((_cached(state) - before, got.prompt_eval_count))
    (_, n1), (reused, n2) = cached
    assert n1 == n2 > 300
    if clock_last:
        assert reused >= n2 - 48            # all but the question, the clock line and a partial chunk
    else:
        assert reused < 16                  # the whole home is read again


def _cached(state) -> int:
    return int(re.search(r"^edge_llm_cached_prompt_tokens_total (\d+)", state.metrics.render(), re.M).group(1))
