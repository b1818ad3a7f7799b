"""Prefix reuse under Home Assistant's prompt: with our own tool block (a template without
tool support), the parts that do not change come first, so two Assist requests a minute apart
share the tool block (time line first, HA 2025.x) or everything up to the time line (time
last). Measured on SmolLM2's ChatML template and tokenizer with bench.assist's HA shapes."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from bench.assist import TOOLS, conversation, system_prompt
from edge.engine.tool_calls import fallback_system_text, parse_tools, prepare_chat, template_knows_tools
from tests.test_http_api import smol, smol_bundle  # noqa: F401 fixtures

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
