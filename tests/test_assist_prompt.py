"""Prefix reuse under Home Assistant's prompt: with our own tool block (a template without
tool support), the parts that do not change come first, so two Assist requests a minute apart
share the tool block (time line first, HA 2025.x) or everything up to the time line (time
last). Measured on SmolLM2's ChatML template and tokenizer with bench.assist's HA shapes.
And a conversation that outgrows the context loses its oldest messages, as Ollama drops them."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from bench.assist import TOOLS, conversation, system_prompt
from edge.engine.tool_calls import fallback_system_text, parse_tools, prepare_chat, template_knows_tools
from tests.test_tool_guard import looping

T0 = datetime(2025, 4, 15, 18, 2, 11)


def shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("time_first", [True, False])
def test_two_requests_a_minute_apart_share_the_static_parts(smol, time_first):  # noqa: F811
    assert not template_knows_tools(smol.template.source)          # our rendering decides the order
    ids = [prepare_chat(smol, conversation(50, T0 + timedelta(seconds=s), time_first, "Turn on the kitchen light."),
                        tools=TOOLS).ids for s in (0, 61)]
    common = shared(*ids)
    tool_block = fallback_system_text(parse_tools(TOOLS), False, True)
    static = smol.encode_chat([{"role": "system", "content": tool_block + "\n\n" + (
        "" if time_first else system_prompt(50, T0, False).split("Current time")[0])}])
    before_static_end = len(static) - 8           # the turn's closing and the assistant header differ
    assert common >= before_static_end, (common, len(static))
    assert common < len(ids[0])
    print(f"time {'first' if time_first else 'last'}: {common} of {len(ids[0])} prompt tokens shared")


def test_fit_messages_drops_the_oldest_non_system_messages_with_their_tool_results():
    from edge.engine.conversation import fit_messages
    msgs = looping(rounds=2) + [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "Thanks"}]
    kept, dropped = fit_messages(msgs, lambda m: len(m) <= 4)
    assert kept[0]["role"] == "system" and kept[-1] == msgs[-1] and len(kept) <= 4 and dropped == len(msgs) - len(kept)
    assert all(m["role"] != "tool" or kept[i - 1].get("tool_calls") for i, m in enumerate(kept))   # no orphan results
    assert fit_messages(msgs, lambda m: True) == (msgs, 0)
    kept, dropped = fit_messages(msgs, lambda m: False)          # never the system prompt or the last message
    assert kept == [msgs[0], msgs[-1]]
