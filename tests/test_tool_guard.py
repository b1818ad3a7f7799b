"""The tool-loop guard: a call answered in the current turn is left out of the grammar.

The schema arithmetic is checked with `jsonschema` (the answered value fails every branch,
other values pass one), the grammars compile in llguidance, and a scripted model that
would repeat the answered call (on SmolLM2's tokenizer and engine) is made to do otherwise."""
from __future__ import annotations

import json

import jsonschema
import pytest

from edge.engine import engine as engine_module
from edge.engine.constraint import Grammar, closed
from edge.engine.tool_calls import ToolUse, prepare_chat
from edge.engine.tool_guard import answered_calls, excluding, not_string
from edge.launch.request import RequestDefaults

TURN_ON = {"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turns on a device or entity",
    "parameters": {"type": "object", "properties": {
        "name": {"type": "string"}, "area": {"type": "string"},
        "domain": {"type": "array", "items": {"type": "string", "enum": ["light", "switch", "fan"]}},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100}}}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}},
                                        "required": ["minutes"]}}}
KITCHEN = {"name": "Kitchen Light", "domain": ["light"]}


def looping(args=KITCHEN, name="HassTurnOn", rounds=1) -> list[dict]:
    """Home Assistant's loop: the question, then the same call answered `rounds` times."""
    msgs = [{"role": "system", "content": "You control a home."},
            {"role": "user", "content": "Turn on the kitchen light"}]
    for i in range(rounds):
        msgs += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
                 {"role": "tool", "tool_call_id": f"c{i}", "content": '{"success": true}'}]
    return msgs


def union_allows(branches, value) -> bool:
    return any(jsonschema.Draft202012Validator(b).is_valid(value) for b in branches)


def test_answered_calls_are_those_of_the_current_turn():
    msgs = looping(rounds=3)
    assert answered_calls(msgs) == [("HassTurnOn", KITCHEN)]        # the same call once
    assert answered_calls(msgs + [{"role": "user", "content": "and again"}]) == []
    unanswered = msgs[:2] + [msgs[2]]
    assert answered_calls(unanswered) == []


@pytest.mark.parametrize("banned", [
    KITCHEN, {}, {"name": "Kitchen Light"}, {"name": "", "brightness": 50},
    {"name": "a[b]^-\\c.*", "area": "Küche", "domain": ["light", "fan"], "brightness": 0},
])
def test_the_union_is_the_schema_less_the_answered_value(banned):
    schema = closed(TURN_ON["function"]["parameters"])
    branches = excluding(schema, [banned])
    assert not union_allows(branches, banned)
    others = [{**banned, "name": banned.get("name", "") + "x"}, {**banned, "area": "Hall"},
              {k: v for k, v in banned.items() if k != "name"} if "name" in banned else {**banned, "name": "n"},
              {**banned, "domain": ["switch"]}, {**banned, "domain": (banned.get("domain") or []) + ["fan"]},
              {**banned, "brightness": banned.get("brightness", 5) + 1}]
    for other in others:
        assert jsonschema.Draft202012Validator(schema).is_valid(other)
        assert union_allows(branches, other), other
    for b in branches:
        Grammar.json_schema(b)                                         # llguidance compiles each


def test_not_string():
    import re
    for a in ["Kitchen Light", "", "a[b]^-\\c.*", "ü"]:
        rx = re.compile(not_string(a))
        assert not rx.search(a)
        for other in [a + "x", a[:-1], "x" + a, "", "\n" + a, a.upper() + "!"]:
            assert bool(rx.search(other)) == (other != a), (a, other)


def test_a_schema_the_guard_cannot_describe_is_left_whole():
    schema = {"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
              "additionalProperties": False}
    assert excluding(schema, [{"x": "a"}]) == [schema]


def test_grammar_of_a_loop_has_no_call_left_for_a_parameterless_tool():
    ping = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
    use = ToolUse.of([ping])
    guarded = ToolUse(use.tools, answered=(("ping", {}),))
    assert guarded.call_schema() is None and guarded.grammar() is not None
    forced = ToolUse(use.tools, "required", "ping", answered=(("ping", {}),))
    assert forced.grammar() is not None           # a call is required: the guard gives way


class Scripted:
    """A sampler that writes `script` whenever the grammar lets it, token by token (the
    longest allowed token that continues it), else the most likely allowed token."""

    def __init__(self, engine, script: str):
        self.script, self.engine, self.text, self.matcher = script, engine, "", None
        self.pieces = [engine.tokenizer.decode([i]) for i in range(engine.config.vocab_size)]

    def __call__(self, params, matcher=None):       # the engine builds a sequence's sampler with its grammar
        self.matcher = matcher
        return self

    def sample(self, logits, history=()) -> int:
        import numpy as np
        if self.matcher is not None:
            logits = self.matcher.apply(logits)
        rest = self.script[len(self.text):]
        ok = [i for i in np.flatnonzero(np.isfinite(logits))
              if self.pieces[i] and rest.startswith(self.pieces[i]) and self.text == self.script[:len(self.text)]]
        token = max(ok, key=lambda i: len(self.pieces[i])) if ok else int(np.argmax(logits))
        self.text += self.pieces[token] if token not in self.engine.eos_ids else ""
        return int(token)


@pytest.mark.parametrize("guard", [False, True])
def test_a_model_that_would_repeat_the_answered_call_cannot(smol, monkeypatch, guard):  # noqa: F811
    repeat = json.dumps({"name": "HassTurnOn", "parameters": KITCHEN})
    script = Scripted(smol, repeat)
    monkeypatch.setattr(engine_module, "Sampler", script)
    chat = prepare_chat(smol, looping(rounds=2), tools=[TURN_ON, TIMER], tool_loop_guard=guard)
    params = RequestDefaults(max_tokens=60).build(**chat.overrides())
    text = "".join(e.text for e in smol.generate(chat.ids, params))
    content, calls = chat.parse(text)
    if not guard:
        assert text == repeat and [(c.name, c.arguments) for c in calls] == [("HassTurnOn", KITCHEN)]
    else:
        assert text != repeat and ("HassTurnOn", KITCHEN) not in [(c.name, c.arguments) for c in calls]
        assert text.startswith(repeat[:-3])        # it went along the script as far as the grammar let it

