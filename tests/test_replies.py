"""The one consumer of a job's events (edge.engine.replies): what every interface shows while
a reply streams, and what it gets at the end (content, tool calls, logprobs, finish, usage)."""
from __future__ import annotations

import asyncio

import pytest

from edge.engine import ContextFull, replies
from edge.engine.engine import Event, TokenLogprob, Usage
from edge.engine.tool_calls import ToolUse

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = 'Let me look.{"name": "get_weather", "parameters": {"city": "Oslo"}}'


def events(text: str, pieces: int = 7, finish: str = "stop", logprobs: bool = False) -> list[Event]:
    """`text` cut into `pieces` events, the last one carrying the finish reason and usage."""
    step = max(1, -(-len(text) // pieces))
    chunks = [text[i:i + step] for i in range(0, len(text), step)]
    out = [Event(text=c, token_id=i, logprobs=[TokenLogprob(i, c, -0.5)] if logprobs else None)
           for i, c in enumerate(chunks)]
    out[-1].finish_reason, out[-1].usage = finish, Usage(prompt_tokens=3, completion_tokens=len(chunks))
    return out


def test_plain_text_streams_as_it_comes_and_ends_with_the_final_piece():
    evs = events("Hello there, world.")
    pieces = list(replies.stream(evs))
    assert "".join(p.text for p in pieces) == "Hello there, world."
    assert [p.final for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    last = pieces[-1]
    assert last.final is evs[-1] and last.finish_reason == "stop" and last.tool_calls == []
    answer = replies.collect(events("Hello there, world."))
    assert (answer.text, answer.content, answer.finish_reason) == ("Hello there, world.",) * 2 + ("stop",)
    assert answer.usage.completion_tokens == len(evs)


def test_a_tool_call_is_held_back_while_streaming_and_given_at_the_end():
    use = ToolUse.of([WEATHER])
    pieces = list(replies.stream(events(CALL), use))
    shown = "".join(p.text for p in pieces[:-1])
    assert shown == "Let me look." and "{" not in shown
    last = pieces[-1]
    assert [(c.name, c.arguments) for c in last.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert last.finish_reason == "tool_calls"
    answer = replies.collect(events(CALL), use)
    assert answer.content == "Let me look." and answer.text == CALL
    assert [c.name for c in answer.tool_calls] == ["get_weather"] and answer.finish_reason == "tool_calls"


def test_hold_false_streams_the_raw_text_and_still_parses_the_calls():
    pieces = list(replies.stream(events(CALL), ToolUse.of([WEATHER]), hold=False))
    assert "".join(p.text for p in pieces) == CALL
    assert [c.name for c in pieces[-1].tool_calls] == ["get_weather"]


def test_tool_choice_none_streams_text_and_parses_nothing():
    use = ToolUse.of([WEATHER], "none")
    pieces = list(replies.stream(events(CALL), use))
    assert "".join(p.text for p in pieces) == CALL and pieces[-1].tool_calls == []


def test_logprobs_come_with_their_pieces_and_gather_in_the_answer():
    pieces = list(replies.stream(events("abcdef", pieces=3, logprobs=True)))
    assert [len(p.logprobs) for p in pieces if p.final is None] == [1, 1, 1]
    answer = replies.collect(events("abcdef", pieces=3, logprobs=True))
    assert [e.token for e in answer.logprobs] == ["ab", "cd", "ef"]


def test_a_job_cancelled_before_it_started_ends_with_a_final_piece_without_usage():
    pieces = list(replies.stream([Event(finish_reason="cancelled")]))
    assert len(pieces) == 1 and pieces[0].finish_reason == "cancelled" and pieces[0].final.usage is None
    assert replies.collect([Event(finish_reason="cancelled")]).usage is None


def test_errors_pass_through_for_each_interface_to_answer():
    def failing():
        yield Event(text="partial")
        raise ContextFull(10, 8)
    with pytest.raises(ContextFull):
        list(replies.stream(failing()))


def test_async_twins_give_the_same_pieces_and_answer():
    use = ToolUse.of([WEATHER])

    async def aiter(evs):
        for ev in evs:
            yield ev

    async def run():
        pieces = [p async for p in replies.astream(aiter(events(CALL)), use)]
        return pieces, await replies.acollect(aiter(events(CALL)), use)

    pieces, answer = asyncio.run(run())
    sync = list(replies.stream(events(CALL), use))
    assert [(p.text, p.finish_reason) for p in pieces] == [(p.text, p.finish_reason) for p in sync]
    assert answer.content == "Let me look." and answer.finish_reason == "tool_calls"
