"""A multi-turn chat on top of the engine: history, system prompt, context bookkeeping.

Shared by the terminal chat and the serial console. Each turn re-renders the whole history
with the chat template; the engine's prefix reuse makes that cost only the new tokens.

When the context fills, `make_room` drops the oldest turns (a question and its reply),
never the system prompt, until the history plus the new question fits with room for a
reply; whether a prompt fits is `Engine.check_fits`, the one context rule.
A reply cut short (Ctrl-C, cancel) stays in the history, marked `interrupted`, so that the
next question can refer to it.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

from edge.engine.engine import Engine, Event, GenerationParams
from edge.engine.replies import Reader
from edge.model.kv_cache import ContextFull


class Conversation:
    def __init__(self, engine: Engine, system: str | None = None,
                 generate: Callable[..., Iterator[Event]] | None = None):
        """`generate(ids, params, cancel)` runs a request: the engine directly (terminal) or
        through the shared scheduler (`Scheduler.stream`) when other interfaces share it."""
        self.engine = engine
        self.generate = generate or engine.generate
        self.system = system
        self.turns: list[dict] = []
        self.last_usage = None

    def messages(self, user_text: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += [{"role": t["role"], "content": t["content"]} for t in self.turns]
        if user_text is not None:
            msgs.append({"role": "user", "content": user_text})
        return msgs

    def tokens(self, user_text: str | None = None) -> list[int]:
        """The prompt ids of the history (plus a next question); [] when there is nothing."""
        msgs = self.messages(user_text)
        return self.engine.encode_chat(msgs) if msgs else []

    def reset(self, system: str | None = ...) -> None:
        if system is not ...:
            self.system = system
        self.turns.clear()
        self.last_usage = None

    def oldest_turn(self) -> list[dict]:
        """The messages `make_room` drops first: the oldest question and its reply."""
        n = 2 if len(self.turns) >= 2 and self.turns[1]["role"] == "assistant" else 1
        return self.turns[:n]

    def make_room(self, user_text: str, reserve: int = 1) -> list[dict]:
        """Drop the oldest turns, keeping the system prompt, until the history plus
        `user_text` leaves `reserve` tokens for the reply. Returns the dropped messages;
        raises ContextFull when the system prompt and the question alone do not fit."""
        dropped: list[dict] = []
        while True:
            try:
                self.engine.check_fits(self.tokens(user_text), reserve)
                return dropped
            except ContextFull:
                if not self.turns:
                    raise
                oldest = self.oldest_turn()
                dropped += oldest
                del self.turns[:len(oldest)]

    def ask(self, text: str, params: GenerationParams, cancel: threading.Event | None = None,
            ) -> Iterator[Event]:
        """Stream the reply; on a full context, raise ContextFull and leave history unchanged.
        A reply that ends early (cancelled, or the reader stops reading) is kept, marked."""
        ids = self.engine.encode_chat(self.messages(text))
        self.engine.check_fits(ids)
        reader = Reader()
        try:
            for ev in self.generate(ids, params, cancel):
                reader.feed(ev)
                if ev.usage is not None:
                    self.last_usage = ev.usage
                yield ev
        except GeneratorExit:
            self.record(text, reader.parts, interrupted=True)
            raise
        last = reader.final
        self.record(text, reader.parts, interrupted=last is None or last.finish_reason == "cancelled")

    def record(self, text: str, reply: list[str], interrupted: bool) -> None:
        """A question and its reply (pieces of text) join the history."""
        answer = {"role": "assistant", "content": "".join(reply)}
        if interrupted:
            answer["interrupted"] = True
        self.turns += [{"role": "user", "content": text}, answer]


def fit_messages(messages: list[dict], fits: Callable[[list[dict]], bool]) -> tuple[list[dict], int]:
    """Ollama's rule for a conversation longer than the context: drop the oldest messages that
    are not system messages until `fits(messages)`, never the last one; an assistant message
    with tool calls goes together with the tool results that follow it. Returns the messages
    kept and how many were dropped (the same list, 0, when it fits or nothing can go)."""
    kept = list(messages)
    dropped = 0
    while not fits(kept):
        i = next((j for j, m in enumerate(kept[:-1]) if m.get("role") not in ("system", "developer")), None)
        if i is None:
            break
        n = 1
        if kept[i].get("role") == "assistant" and kept[i].get("tool_calls"):
            while i + n < len(kept) - 1 and kept[i + n].get("role") in ("tool", "ipython"):
                n += 1
        while i + n < len(kept) - 1 and kept[i + n].get("role") in ("tool", "ipython"):
            n += 1           # results whose call went already
        del kept[i:i + n]
        dropped += n
    return kept, dropped
