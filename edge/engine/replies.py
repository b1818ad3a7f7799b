"""One consumer of a request's events, for every interface.

A job (or `Engine.generate`) yields `Event`s: pieces of text, their logprobs when asked for,
and a last event carrying the finish reason and usage. `stream` turns them into `Piece`s to
show as they come (with tools, text that may open a call is held back) and ends with a final
piece: the rest of the content, the tool calls, the finish reason and usage. `collect`
gathers the whole answer instead. `astream` and `acollect` do the same over async events
(`aevents` reads a job's events on the interface's own threads).

Errors (`ContextFull`, `QueueFull`, an engine failure) pass through unchanged; each
interface turns them into its own answer with its own table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator

from edge.engine.engine import Event, TokenLogprob, Usage
from edge.engine.tool_calls import ToolCall, ToolUse


class _Finished:
    """The finish reason of a reply that has a last event (`final`) and the tool calls made."""
    final: Event | None
    tool_calls: list[ToolCall]

    @property
    def finish_reason(self) -> str | None:
        if self.final is None:
            return None
        return "tool_calls" if self.tool_calls else self.final.finish_reason


@dataclass
class Piece(_Finished):
    text: str = ""                                   # to show now
    logprobs: list[TokenLogprob] | None = None       # the tokens behind this event's text
    tokens: int = 0                                  # generated tokens behind it (0 on the last piece)
    final: Event | None = None                       # the last piece: the job's last event (finish reason, usage)
    tool_calls: list[ToolCall] = field(default_factory=list)    # the last piece: the calls made


@dataclass
class Answer(_Finished):
    text: str                                        # everything generated
    content: str | None                              # the text without its tool calls (None: calls only)
    tool_calls: list[ToolCall]
    logprobs: list[TokenLogprob] | None
    final: Event | None                              # None: the events ended without a last one

    @property
    def usage(self) -> Usage | None:
        return self.final.usage if self.final is not None else None


class Reader:
    """The state of one job's reading; `stream`/`collect` and their async twins drive it.
    `hold=False` streams a tools request's raw text (call included) and still gives the calls
    on the last piece."""

    def __init__(self, tool_use: ToolUse | None = None, hold: bool = True):
        self.tool_use = tool_use if tool_use is not None and tool_use.active else None
        self.calls = self.tool_use.stream() if self.tool_use is not None and hold else None
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.final: Event | None = None

    def feed(self, ev: Event) -> list[Piece]:
        self.parts.append(ev.text)
        if ev.logprobs is not None:
            self.logprobs = (self.logprobs or []) + ev.logprobs
        text = self.calls.feed(ev.text) if self.calls is not None else ev.text
        out = [Piece(text, ev.logprobs, tokens=int(ev.token_id is not None))] if text or ev.logprobs else []
        if ev.finish_reason is not None:      # the last event (its usage: None if it never started)
            self.final = ev
            if self.calls is not None:
                content, calls = self.calls.finish()
            else:
                content, calls = None, self.answer().tool_calls if self.tool_use is not None else []
            out.append(Piece(content or "", None, final=ev, tool_calls=calls))
        return out

    def answer(self) -> Answer:
        text = "".join(self.parts)
        content, calls = self.tool_use.parse(text) if self.tool_use is not None else (text, [])
        return Answer(text, content, calls, self.logprobs, self.final)


def stream(events: Iterable[Event], tool_use: ToolUse | None = None, hold: bool = True) -> Iterator[Piece]:
    reader = Reader(tool_use, hold)
    for ev in events:
        yield from reader.feed(ev)


def collect(events: Iterable[Event], tool_use: ToolUse | None = None) -> Answer:
    reader = Reader(tool_use)
    for ev in events:
        reader.feed(ev)
    return reader.answer()


async def astream(events: AsyncIterable[Event], tool_use: ToolUse | None = None) -> AsyncIterator[Piece]:
    reader = Reader(tool_use)
    async for ev in events:
        for piece in reader.feed(ev):
            yield piece


async def acollect(events: AsyncIterable[Event], tool_use: ToolUse | None = None) -> Answer:
    reader = Reader(tool_use)
    async for ev in events:
        reader.feed(ev)
    return reader.answer()


async def aevents(events: Iterator[Event], run: Callable[..., Awaitable]) -> AsyncIterator[Event]:
    """A job's blocking events as async ones: `run(next, events, None)` reads the next one off
    the event loop (the interface's bounded thread pool)."""
    while (ev := await run(next, events, None)) is not None:
        yield ev
