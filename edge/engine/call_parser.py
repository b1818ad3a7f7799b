"""Tool calls read out of generated text: the forms Llama 3.x writes (JSON objects, the
pythonic list, `<|python_tag|>`), whole (`parse_calls`) or while streaming (`CallStream`).

A call is only recognised when everything from its start to the end of the text is calls, and
only with names from the request's tool list: prose that mentions braces stays prose, and the
text written before a call is kept as content.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass

PYTHON_TAG = "<|python_tag|>"
CALL_STARTS = ("{", "[", PYTHON_TAG)

@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_calls(text: str, names) -> tuple[str | None, list[ToolCall]]:
    """(content, calls): the calls the text ends with, if it does, and the text before them.
    With no calls, content is the whole text."""
    names = set(names)
    for start in _candidates(text):
        calls = _calls_in(text[start:], names)
        if calls:
            content = text[:start].rstrip()
            return content or None, [ToolCall(c.name, c.arguments, new_call_id()) for c in calls]
    return text, []


def _candidates(text: str):
    i = 0
    while True:
        found = [j for j in (text.find(s, i) for s in CALL_STARTS) if j >= 0]
        if not found:
            return
        i = min(found)
        yield i
        i += 1


def _calls_in(body: str, names: set) -> list[ToolCall]:
    body = body.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
        return _json_calls(body, names) or _pythonic_calls(body, names, bare=True)
    if body.startswith("["):
        return _json_calls(body, names) or _pythonic_calls(body, names)
    return _json_calls(body, names)


def _json_calls(body: str, names: set) -> list[ToolCall]:
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            value, i = decoder.raw_decode(body, i)
        except ValueError:
            return []
        items = value if isinstance(value, list) else [value]
        for item in items:
            call = _json_call(item, names)
            if call is None:
                return []
            calls.append(call)
        while i < len(body) and body[i] in " \t\r\n;,":
            i += 1
    return calls


def _json_call(item, names: set) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict) and "name" not in item:     # OpenAI's own shape
        item = item["function"]
    name = item.get("name")
    args = item.get("parameters", item.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if name not in names or not isinstance(args, dict):
        return None
    if set(item) - {"name", "parameters", "arguments", "type", "id"}:
        return None
    return ToolCall(name, args)


def _pythonic_calls(body: str, names: set, bare: bool = False) -> list[ToolCall]:
    try:
        tree = ast.parse(body.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return []
    if isinstance(tree, ast.List):
        nodes = tree.elts
    elif bare and isinstance(tree, ast.Call):
        nodes = [tree]
    else:
        return []
    calls = []
    for node in nodes:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
                and not node.args):
            return []
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, SyntaxError):
            return []
        if len(args) != len(node.keywords):
            return []
        calls.append(ToolCall(node.func.id, args))
    return calls


class CallStream:
    """Streamed text in, content deltas out, as llama.cpp's partial tool-call parsing does it:
    text is released as it comes; from something that may open a call (`{`, `[`,
    `<|python_tag|>`) it is held only while what follows can still become calls
    (`may_be_calls`), and released as soon as it cannot (prose with braces, a name that is
    no tool's). `finish` parses what is still held, so the result is the same as
    `parse_calls` on the whole text."""

    def __init__(self, use: ToolUse):
        self.use = use
        self._names = {t.name for t in use.tools}
        self._held = ""

    def feed(self, text: str) -> str:
        if not self.use.active:
            return text
        held, out = self._held + text, []
        while True:
            found = [j for j in (held.find(s) for s in CALL_STARTS) if j >= 0]
            if not found:       # a tail that may be the start of <|python_tag|> waits for the next piece
                cut = len(held) - _partial_tag(held)
                out.append(held[:cut])
                held = held[cut:]
                break
            start = min(found)
            out.append(held[:start])
            held = held[start:]
            if may_be_calls(held, self._names):
                break
            out.append(held[0])        # not a call from here: on to the next candidate
            held = held[1:]
        self._held = held
        return "".join(out)

    def finish(self) -> tuple[str | None, list[ToolCall]]:
        """(the rest of the content or None, the calls)."""
        held, self._held = self._held, ""
        if not held:
            return None, []
        content, calls = self.use.parse(held)
        return content, calls


CALL_KEYS = ("name", "parameters", "arguments", "type", "id", "function")
_INCOMPLETE_LITERAL = re.compile(r"^(t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?|-?[0-9.eE+-]*)$")


def may_be_calls(text: str, names: set) -> bool:
    """Whether `text`, which starts with a call opener, can still grow into calls only (what
    `parse_calls` accepts); False only when no continuation can."""
    if text.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(text):
        return True
    body = text.rstrip()
    if body.startswith("["):
        rest = body[1:].lstrip()
        if not rest or rest.startswith("{"):
            return _json_prefix_ok(body, names)
        m = re.match(r"[A-Za-z0-9_.-]*", rest)
        ident, after = m.group(), rest[m.end():]
        if not after:
            return any(n.startswith(ident) for n in names)
        return after.startswith("(") and ident in names
    return _json_prefix_ok(body, names)


def _json_prefix_ok(body: str, names: set) -> bool:
    """JSON calls (one or more, separated as `_json_calls` allows) or the beginning of one."""
    decoder, i = json.JSONDecoder(), 0
    while i < len(body):
        try:
            value, i = decoder.raw_decode(body, i)
        except ValueError as e:
            tail = body[getattr(e, "pos", len(body)):]
            incomplete = (getattr(e, "pos", 0) >= len(body) or str(e).startswith("Unterminated string")
                          or _INCOMPLETE_LITERAL.match(tail) is not None)
            return incomplete and _object_start_ok(body[i:], names)
        items = value if isinstance(value, list) else [value]
        if not all(_json_call(item, names) is not None for item in items):
            return False
        while i < len(body) and body[i] in " \t\r\n;,":
            i += 1
    return True


def _object_start_ok(text: str, names: set) -> bool:
    """The start of one JSON call: a known first key, and a name that begins a tool's."""
    text = text.lstrip("[ \t\r\n")
    if not text:
        return True
    m = re.match(r'\{\s*(?:"([^"\\]*)(")?\s*(?::\s*(?:"([^"\\]*)(")?)?)?)?', text)
    if not m or not text.startswith("{"):
        return False
    key, key_done, value, value_done = m.groups()
    if key is None:
        return m.end() == len(text)
    if key_done is None:
        return any(k.startswith(key) for k in CALL_KEYS) and m.end() == len(text)
    if key not in CALL_KEYS:
        return False
    if key == "name" and value is not None:
        return value in names if value_done else any(n.startswith(value) for n in names)
    if key == "type" and value is not None:
        return value == "function" if value_done else "function".startswith(value)
    return True


def _partial_tag(buffer: str) -> int:
    for n in range(min(len(buffer), len(PYTHON_TAG) - 1), 0, -1):
        if PYTHON_TAG.startswith(buffer[-n:]):
            return n
    return 0
