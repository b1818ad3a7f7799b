"""The JSON-lines protocol, for a microcontroller or a script: one JSON request per line in,
one JSON event per line out. Requests are stateless (send "messages" for a multi-turn chat).

In:  {"id": any, "prompt": str, "system": str} or {"id": any, "messages": [{"role", "content"}]},
     plus any request field (max_tokens, stop, temperature, top_k, ...) and the chat fields
     (tools, tool_choice, parallel_tool_calls, response_format).
Out: {"ready": true, "model", "max_ctx"} on connect; {"id", "delta"} per piece of text;
     {"id", "done": true, "finish_reason", "usage"[, "tool_calls"]} at the end;
     {"id", "error": {"code", "message"}}.
"""
from __future__ import annotations

import functools
import json

from edge.engine import ContextFull, QueueFull
from edge.engine.sampler import check_vocab
from edge.engine.tool_calls import CHAT_FIELDS, prepare_chat
from edge.launch.request import DEFAULT_TOOL_LOOP_GUARD, REQUEST_FIELDS, prompt_messages
from edge.serial.line_editor import Line
from edge.serial.protocol import Protocol

_REQUEST_FIELDS = {"id", "prompt", "system", "messages"} | REQUEST_FIELDS | CHAT_FIELDS
ERRORS = {ContextFull: "context_full", QueueFull: "busy"}     # the engine's refusals -> error codes


def json_bytes(rid=None, **fields) -> bytes:
    return (json.dumps(({"id": rid} if rid is not None else {}) | fields) + "\n").encode("ascii")


class JsonlProtocol(Protocol):
    echo = False          # a machine does not want its request back

    def __init__(self, console, *, echo: bool = False, system: str | None = None):
        """`echo` and `system` are the human console's; requests bring their own system prompt."""
        super().__init__(console)
        self.engine = console.engine

    def send(self, rid=None, wait: float = 0.0, **fields) -> bool:
        return self.console.send(json_bytes(rid, **fields), wait)

    def error(self, rid, code: str, message: str) -> None:
        self.send(rid, error=dict(code=code, message=message))

    def report(self, code: str, message: str) -> None:
        self.error(None, code, message)

    def greet(self) -> None:
        self.send(ready=True, model=self.engine.name, max_ctx=self.engine.max_ctx)

    def handle(self, line: Line) -> None:
        """Corrupted bytes (noise, wrong baud rate) refuse the request rather than run a guess."""
        if line.replaced or line.ignored:
            return self.error(None, "bad_bytes", f"{line.replaced} invalid UTF-8 sequence(s), "
                              f"{line.ignored} control byte(s); request refused")
        try:
            req = json.loads(line.text)
        except ValueError as e:
            return self.error(None, "bad_json", str(e))
        rid = req.get("id") if isinstance(req, dict) else None
        try:
            ids, params, chat = self._request(req)
        except tuple(ERRORS) as e:
            return self.error(rid, _code(e), str(e))
        except (ValueError, TypeError) as e:
            return self.error(rid, "bad_request", str(e))
        cancel = self.console.current_cancel()
        try:        # tools: the deltas are the raw text, the calls come on the last piece
            last, _ = self.console.stream(self.console.scheduler.stream(ids, params, cancel), cancel,
                                          lambda text: json_bytes(rid, delta=text), chat.tool_use)
        except tuple(ERRORS) as e:
            return self.error(rid, _code(e), str(e))
        except Exception as e:        # still this request's error: keep its id
            self.console.log(f"error: {type(e).__name__}: {e}")
            return self.error(rid, "internal", f"error: {e}")
        if last is not None:
            calls = last.tool_calls
            self.send(rid, wait=self.console.stall_timeout, done=True, finish_reason=last.finish_reason,
                      usage=_usage_dict(last.final.usage), **({"tool_calls": [c.openai() for c in calls]} if calls else {}))

    def _request(self, req):
        if not isinstance(req, dict):
            raise ValueError("a request is a JSON object")
        unknown = sorted(set(req) - _REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_REQUEST_FIELDS))}")
        chat_fields = {"tool_loop_guard": DEFAULT_TOOL_LOOP_GUARD, **{k: req[k] for k in CHAT_FIELDS & req.keys()}}
        tokenize = functools.partial(prepare_chat, self.engine, _messages(req), **chat_fields)
        chat = self.console.scheduler.tokenize(tokenize).result()     # one prompt at a time, every interface
        params = self.console.params.build(**{k: req[k] for k in REQUEST_FIELDS & req.keys()}, **chat.overrides())
        check_vocab(params.sampling, self.engine.config.vocab_size)
        self.engine.check_fits(chat.ids)
        return chat.ids, params, chat


def _messages(req: dict) -> list[dict]:
    if ("prompt" in req) == ("messages" in req):
        raise ValueError('give exactly one of "prompt" (a string) or "messages" (a list)')
    if "prompt" in req:
        if not isinstance(req["prompt"], str) or not isinstance(req.get("system", ""), str):
            raise ValueError('"prompt" and "system" must be strings')
        return prompt_messages(req["prompt"], req.get("system"))
    msgs = req["messages"]
    if not (isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)):
        raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
    return [{k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id") if k in m} for m in msgs]


def _code(exc: Exception) -> str:
    return next(code for kind, code in ERRORS.items() if isinstance(exc, kind))


def _usage_dict(u) -> dict | None:
    if u is None:
        return None
    return dict(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
                completion_tokens=u.completion_tokens, time_to_first_token=round(u.time_to_first_token, 4),
                tokens_per_second=round(u.decode_tokens_per_second, 2))
