"""A multi-turn chat on top of the engine: history, system prompt, context bookkeeping.

Shared by the terminal chat and the serial console. Each turn re-renders the whole history
with the chat template; the engine's prefix reuse makes that cost only the new tokens.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

from edge.engine.engine import Engine, Event, GenerationParams


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
        msgs += self.turns
        if user_text is not None:
            msgs.append({"role": "user", "content": user_text})
        return msgs

    def reset(self, system: str | None = ...) -> None:
        if system is not ...:
            self.system = system
        self.turns.clear()

    def ask(self, text: str, params: GenerationParams, cancel: threading.Event | None = None,
            ) -> Iterator[Event]:
        """Stream the reply; on a full context, raise ContextFull and leave history unchanged."""
        ids = self.engine.encode_chat(self.messages(text))
        self.engine.check_fits(ids)
        reply = []
        for ev in self.generate(ids, params, cancel):
            reply.append(ev.text)
            if ev.usage is not None:
                self.last_usage = ev.usage
            yield ev
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]
