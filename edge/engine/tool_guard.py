"""The tool-loop guard: a call identical to one already answered in the current turn is left
out of the grammar, so it cannot be generated again.

Clients that offer the tools again after every result (Home Assistant's Ollama integration,
up to 10 rounds; the Ollama API has no `tool_choice`) otherwise let a small model call the
same action over and over. "Answered" means: an assistant `tool_calls` entry that a later
`tool` message answers, after the last `user` message (a new question may legitimately
repeat an earlier action: "turn the light on" again after "off").

The exclusion is written in JSON schema, which llguidance compiles (it has no `not`): the
tool's parameters minus one value v is the union of "a key of v is missing", "a key v lacks
is present" and "the value under one key differs", each difference expressed by type
(another enum member, a string pattern that matches everything but one string, a number
above or below, an array of another length or with one item different, an object, again
by this rule). Where a difference cannot be expressed (e.g. a schema with its own `anyOf`),
that exclusion is dropped: the guard never forbids a call other than the answered one.
"""
from __future__ import annotations

import json

MAX_BRANCHES = 64          # a tool's schema grows by about one branch per key per excluded call
MAX_STRING = 256           # a longer excluded string is not written into a pattern


def answered_calls(messages: list[dict]) -> list[tuple[str, dict]]:
    """(name, arguments) of the calls answered since the last user message, newest first."""
    start = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), default=-1)
    calls: dict[str, tuple[str, dict]] = {}
    answered: list[tuple[str, dict]] = []
    for m in messages[start + 1:]:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            for c in m["tool_calls"]:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("name"), str) and c.get("id"):
                    args = _arguments(fn.get("arguments", {}))
                    if args is not None:
                        calls[c["id"]] = (fn["name"], args)
        elif m.get("role") in ("tool", "ipython") and m.get("tool_call_id") in calls:
            call = calls.pop(m["tool_call_id"])
            if call not in answered:
                answered.append(call)
    return answered[::-1]


def parsed_arguments(args):
    """A call's arguments as sent: a JSON string parsed ("" is {}), text that is not JSON as is."""
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except ValueError:
            return args
    return args


def _arguments(args) -> dict | None:
    args = parsed_arguments(args)
    return args if isinstance(args, dict) else None


def excluding(schema: dict, banned: list[dict]) -> list[dict]:
    """Schemas whose union is `schema` less the objects in `banned` (most important first;
    one that cannot be expressed within MAX_BRANCHES is skipped). [] when nothing is left."""
    branches = [schema]
    for value in banned:
        narrowed = []
        for b in branches:
            parts = _object_without(b, value)
            if parts is None:
                narrowed = None
                break
            narrowed += parts
        if narrowed is None or len(narrowed) > MAX_BRANCHES:
            continue
        branches = narrowed
    return branches


def _object_without(s: dict, v) -> list[dict] | None:
    """Object schemas whose union is `s` less the object v; None when it cannot be said."""
    if not isinstance(v, dict) or not isinstance(s, dict) or set(s) & _OPAQUE:
        return None
    props = s.get("properties", {})
    required = list(s.get("required", []))
    if s.get("additionalProperties", True) is not False or set(v) - set(props):
        return None
    out = []
    for k, value in v.items():
        if k not in required:
            out.append({**s, "properties": {**props, k: False}})
        other = _other_than(props[k], value)
        if other is None:
            return None
        out += [{**s, "properties": {**props, k: o}, "required": required + [k] if k not in required else required}
                for o in other]
    for k in props:
        if k not in v and props[k] is not False and k not in required:
            out.append({**s, "required": required + [k]})
    return out


_OPAQUE = {"anyOf", "oneOf", "allOf", "$ref", "not", "if", "patternProperties", "dependentRequired",
           "dependentSchemas", "propertyNames", "minProperties", "maxProperties", "unevaluatedProperties"}


def _other_than(p, a) -> list[dict] | None:
    """Schemas whose union is the property schema p less the value a ([] when p allows only
    a); None when it cannot be said."""
    if p is True:
        p = {}
    if not isinstance(p, dict):
        return None
    if "const" in p:
        return [] if p["const"] == a else [p]
    if "enum" in p:
        rest = [e for e in p["enum"] if not _same(e, a)]
        return [{**p, "enum": rest}] if rest else []
    if set(p) & (_OPAQUE - {"minProperties", "maxProperties"}):
        return None
    kind = p.get("type")
    if isinstance(a, bool):
        return [{**p, "enum": [not a]}] if kind == "boolean" else None
    if isinstance(a, str):
        if kind != "string" or len(a) > MAX_STRING or "pattern" in p or "format" in p:
            return None
        return [{**p, "pattern": not_string(a)}]
    if isinstance(a, (int, float)):
        if kind not in ("integer", "number"):
            return None
        below = min(a, p.get("exclusiveMaximum", a))
        above = max(a, p.get("exclusiveMinimum", a))
        return [{**p, "exclusiveMaximum": below}, {**p, "exclusiveMinimum": above}]
    if isinstance(a, list):
        return _array_without(p, a)
    if isinstance(a, dict):
        return _object_without(p, a)
    return None


def _array_without(p: dict, a: list) -> list[dict] | None:
    if set(p) & {"prefixItems", "minItems", "maxItems", "contains", "uniqueItems"} or p.get("type") != "array":
        return None
    items = p.get("items", {})
    out = [{**p, "minItems": len(a) + 1}]
    if a:
        out.append({**p, "maxItems": len(a) - 1})
    for i, value in enumerate(a):
        other = _other_than(items, value)
        if other is None:
            return None
        out += [{**p, "prefixItems": [items] * i + [o], "minItems": max(i + 1, len(a)), "maxItems": len(a)}
                for o in other]
    return out


def _same(x, y) -> bool:
    return type(x) is type(y) and x == y


def not_string(a: str) -> str:
    """A regex matching every string except `a`: a proper prefix of it, a string that leaves it
    at some character, or one that goes on after it."""
    if not a:
        return "^(?s:.+)$"
    alts = ["(?:" + "|".join(_escape(a[:i]) for i in range(len(a))) + ")"]
    alts += [_escape(a[:i]) + "[^" + _escape(a[i]) + "].*" for i in range(len(a))]
    alts.append(_escape(a) + ".+")
    return "^(?s:" + "|".join(alts) + ")$"


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _META else c for c in text)


_META = set("\\.+*?()|[]{}^$#&-~")
