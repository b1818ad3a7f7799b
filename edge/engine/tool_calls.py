"""Tool calling in the chat layer: a tool list in, the prompt and a grammar out; text in, calls out.

Shared by every interface that offers tools (the OpenAI API, the serial jsonl mode): they pass
the client's `tools` / `tool_choice` / `parallel_tool_calls` and the messages down as plain
dicts and get back prompt messages, template variables, a `Grammar` for the engine and, from
the generated text, `(content, calls)`.

Prompting. A template that knows tools (Llama 3.2's: it tests `tools`) gets them as its `tools`
variable and renders them its own way. Any other template (SmolLM2's ChatML) gets the fallback:
the tool list and the call format open the system turn, before the client's system text (one
is added if there is none): what does not change comes first, so a system prompt whose text
changes (Home Assistant's clock line) still shares the tool block's KV with the last request.
Earlier assistant calls are written back as the JSON they would have been generated as, and
tool results become user turns that say which call they answer.

The call format asked for is Llama 3.2's JSON form, one object per call:
`{"name": "get_weather", "parameters": {"city": "Paris"}}`. The parser (`call_parser`) also
reads the other forms Meta's prompt format documents: the pythonic list `[get_weather(city="Paris"), ...]` and
anything after `<|python_tag|>`; several JSON calls may follow each other (separated by
whitespace, `;` or `,`, or inside a JSON list). A call is only recognised when everything from
its start to the end of the text is calls, and only with names from the request's tool list:
prose that mentions braces stays prose, and the text written before a call is kept as content.

Constraints. `tool_choice` "required" or a named function: the whole reply is one call, its
arguments held to the tool's schema by the grammar (objects in it that do not say otherwise
are closed to further keys, as in OpenAI's strict mode). "auto": the reply is free text, or, once
it starts with `{`, calls whose arguments follow their schemas. "none": no tools in the prompt,
no grammar, no parsing. A call answered earlier in the turn is left out of the grammar
(`tool_guard`) when the interface asks for it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from edge.engine import clock_line, tool_guard
from edge.engine.call_parser import CallStream, ToolCall, parse_calls  # noqa: F401 (parse_calls: re-exported)
from edge.engine.constraint import ConstraintError, Grammar, check_depth, closed, compact

CHAT_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "response_format", "tool_loop_guard"})
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")      # OpenAI's rule for function names (plus '.')


class ToolError(ValueError):
    """A malformed tools / tool_choice / tool message; `param` names the offending field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    spec: dict                     # the client's definition, as the template receives it


# --- the request's tools --------------------------------------------------------------

def parse_tools(tools) -> tuple[Tool, ...]:
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of {'type': 'function', 'function': {...}} objects", "tools")
    parsed, names = [], set()
    for i, spec in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(spec, dict) or spec.get("type", "function") != "function":
            raise ToolError(f"{where} must be an object with type 'function'", f"{where}.type")
        fn = spec.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function must be an object with a name", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '-' or '.', got {name!r}",
                            f"{where}.function.name")
        if name in names:
            raise ToolError(f"{where}.function.name {name!r} is defined twice", f"{where}.function.name")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must be a JSON schema of type 'object'",
                            f"{where}.function.parameters")
        try:
            check_depth(params, f"{where}.function.parameters")
        except ConstraintError as e:
            raise ToolError(str(e), f"{where}.function.parameters") from e
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        parsed.append(Tool(name, description, params, {"type": "function", "function": fn}))
    return tuple(parsed)


@dataclass(frozen=True)
class ToolUse:
    """One request's tools and how the model may use them."""
    tools: tuple[Tool, ...]
    choice: str = "auto"             # "auto" | "none" | "required" (a named function is "required" + forced)
    forced: str | None = None
    parallel: bool = True
    answered: tuple = ()             # (name, arguments) the grammar leaves out (`tool_guard`)

    @classmethod
    def of(cls, tools, tool_choice=None, parallel_tool_calls=None) -> ToolUse | None:
        """None when the request has no tools; raises ToolError naming the bad field."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise ToolError("tool_choice needs tools: the request defines none", "tool_choice")
            return None
        parsed = parse_tools(tools)
        names = {t.name for t in parsed}
        choice, forced = tool_choice if tool_choice is not None else "auto", None
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            forced = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(forced, str):
                raise ToolError("tool_choice must be 'auto', 'none', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
            if forced not in names:
                raise ToolError(f"tool_choice names the function {forced!r}, which is not among the tools "
                                f"({', '.join(sorted(names))})", "tool_choice.function.name")
            choice = "required"
        elif choice not in ("auto", "none", "required"):
            raise ToolError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {choice!r}",
                            "tool_choice")
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
        return cls(parsed, choice, forced, parallel_tool_calls is not False)

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def offered(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.forced in (None, t.name))

    # --- the grammar ------------------------------------------------------------------
    def call_schema(self, guard: bool = True) -> dict | None:
        """One call in the JSON form, its arguments held to the tool's schema and, with
        `guard`, different from the calls in `answered`. None when no call is left."""
        options = []
        for t in self.offered:
            banned = [args for name, args in self.answered if name == t.name] if guard else []
            for params in tool_guard.excluding(closed(t.parameters), banned):
                options.append({"type": "object", "properties": {"name": {"const": t.name}, "parameters": params},
                                "required": ["name", "parameters"], "additionalProperties": False})
        if not options:
            return None
        return options[0] if len(options) == 1 else {"anyOf": options}

    def grammar(self) -> Grammar | None:
        if not self.active:
            return None
        schema = self.call_schema()
        if self.choice == "required":       # a call there must be: the guard gives way when none is left
            return Grammar.json_schema(schema or self.call_schema(guard=False), origin="tools")
        if schema is None:                  # every call was answered already: text only
            return Grammar.lark('start: TEXT |\nTEXT: /(?s:[^{\\s].*|\\s+[^{\\s].*)/\n', origin="tools")
        call = json.dumps(compact(schema), ensure_ascii=False)
        more = ' (SEP call)*\nSEP: /[ \\t]*(\\n|; ?)[ \\t]*/' if self.parallel else ""
        # free text that does not open with "{", or calls; the empty reply too
        lark = (f'start: TEXT | calls |\ncalls: call{more}\nTEXT: /(?s:[^{{\\s].*|\\s+[^{{\\s].*)/\n'
                f'call: %json {call}\n')
        return Grammar.lark(lark, origin="tools")

    # --- the prompt -------------------------------------------------------------------
    def prompt(self, messages: list[dict], template_source: str) -> tuple[list[dict], dict]:
        """(messages, template variables) for this request."""
        if not self.active:
            return messages, {}
        if template_knows_tools(template_source):
            return messages, {"tools": [t.spec for t in self.offered]}
        system = fallback_system_text(self.offered, self.choice == "required", self.parallel)
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0], content=f"{system}\n\n{messages[0].get('content') or ''}".rstrip())
            return [first, *messages[1:]], {}
        return [{"role": "system", "content": system}, *messages], {}

    # --- the reply --------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return parse_calls(text, {t.name for t in self.tools}) if self.active else (text, [])

    def stream(self) -> CallStream:
        return CallStream(self)


def template_knows_tools(source: str) -> bool:
    """Whether a chat template renders a `tools` variable (Llama 3.x, Qwen, Hermes...)."""
    return re.search(r"\btools\b", source) is not None


def one_call_per_message(source: str) -> bool:
    """Whether a template raises on more than one tool call per assistant message (Llama 3.x)."""
    return "only supports single tool-calls" in source


def fallback_system_text(tools, required: bool, parallel: bool) -> str:
    lines = ["You can call the following functions. Each is given as a JSON schema:"]
    lines += [json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                         ensure_ascii=False) for t in tools]
    lines.append("To call a function, reply with only a JSON object in the format "
                 '{"name": function name, "parameters": object of argument names and values}'
                 + (", one line per call." if parallel else ", a single call."))
    lines.append("You must call one of these functions." if required else
                 "If no function fits, answer in plain text instead.")
    return "\n".join(lines)


# --- conversation history -------------------------------------------------------------

def history(messages: list[dict], template_source: str) -> list[dict]:
    """Messages as the template should see them: assistant `tool_calls` with their arguments as
    objects (as transformers expects) and `tool` results; for a template without tool support,
    calls as the JSON text the model would have written and results as user turns.
    Raises ToolError for a tool message that answers no earlier call."""
    native = template_knows_tools(template_source)
    calls: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            parsed = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ToolError(f"messages[{i}].tool_calls[{j}].function.name is required",
                                    f"messages[{i}].tool_calls")
                args = tool_guard.parsed_arguments(fn.get("arguments", {}))      # not JSON: written back as given
                if call.get("id"):
                    calls[call["id"]] = fn["name"]
                parsed.append({"id": call.get("id"), "type": "function",
                               "function": {"name": fn["name"], "arguments": args}})
            if native and len(parsed) > 1 and one_call_per_message(template_source):
                # Llama 3.x templates refuse several calls in one message (as transformers does);
                # parallel calls are written as consecutive assistant turns of one call each
                out += [{**m, "content": "", "tool_calls": [c]} for c in parsed]
            elif native:
                out.append({**m, "content": m.get("content") or "", "tool_calls": parsed})
            else:
                text = "\n".join(json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]},
                                            ensure_ascii=False) for c in parsed)
                out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).lstrip()})
        elif role in ("tool", "ipython"):
            call_id = m.get("tool_call_id")
            if role == "tool" and call_id not in calls:
                raise ToolError(f"messages[{i}] is a tool result for {call_id!r}, which no earlier assistant "
                                "message called", f"messages[{i}].tool_call_id")
            if native:
                out.append(m)
            else:
                content = m.get("content")
                text = content if isinstance(content, str) or content is None else json.dumps(content, ensure_ascii=False)
                out.append({"role": "user", "content": f"Result of {calls.get(call_id, 'a tool')}: {text or ''}"})
        elif role == "developer":          # what newer OpenAI clients call the system message
            out.append({**m, "role": "system"})
        else:
            out.append(m)
    return out


# --- parsing calls out of text --------------------------------------------------------

# --- one chat request with tools / a response format, for any interface -----------------

@dataclass(frozen=True)
class ChatRequest:
    ids: list[int]
    tool_use: ToolUse | None
    grammar: Grammar | None

    def overrides(self) -> dict:
        """The request builder's fields for it (`RequestDefaults.build(**overrides)`)."""
        tools = self.tool_use is not None and self.tool_use.active
        return {"constraint": self.grammar, "special_text": True if tools else None}

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return self.tool_use.parse(text) if self.tool_use is not None else (text, [])


def prepare_chat(engine, messages: list[dict], tools=None, tool_choice=None, parallel_tool_calls=None,
                 response_format=None, tool_loop_guard: bool = False, clock_last: bool = False) -> ChatRequest:
    """Messages (OpenAI-shaped dicts) and the client's tool / format fields -> prompt ids and
    grammar. Raises ToolError (with `param`) for anything malformed or uncompilable, and the
    template's own ValueError for a conversation it rejects. `tool_loop_guard`: calls answered
    in this turn are left out of the grammar (`tool_guard`; the interfaces' default is the
    launch layer's). `clock_last`: Home Assistant's leading clock line goes to the end of the
    system message (engine/clock_line.py)."""
    if not isinstance(tool_loop_guard, bool):
        raise ToolError("tool_loop_guard must be true or false", "tool_loop_guard")
    use = ToolUse.of(tools, tool_choice, parallel_tool_calls)
    if use is not None and tool_loop_guard:
        use = dataclasses.replace(use, answered=tuple(tool_guard.answered_calls(messages)))
    if clock_last:
        messages = clock_line.clock_last(messages)
    messages = history(messages, engine.template.source)
    extra = {}
    if use is not None:
        messages, extra = use.prompt(messages, engine.template.source)
    ids = engine.encode_chat(messages, **extra)
    grammar = response_grammar(response_format)
    if grammar is not None:
        _check(engine, grammar, grammar.origin)
    if use is not None and use.active and (grammar is None or use.choice == "required"):
        try:
            grammar = use.grammar()
            _check(engine, grammar, "tools")
        except ToolError:
            if use.choice == "required":
                raise
            grammar = None       # "auto" on a model without a usable grammar: calls are still parsed
    return ChatRequest(ids, use, grammar)


def _check(engine, grammar: Grammar, param: str) -> None:
    try:
        engine.check_grammar(grammar)
    except ConstraintError as e:
        raise ToolError(str(e), param) from e


def response_grammar(response_format) -> Grammar | None:
    """OpenAI's `response_format` -> a Grammar (None for plain text); a Grammar an interface
    built from its own field (Ollama's `format`) is taken as it is."""
    if isinstance(response_format, Grammar):
        return response_format
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise ToolError("response_format must be an object with a type", "response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    try:
        if kind == "json_object":
            return Grammar.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ToolError("response_format.json_schema must be an object with a 'name' and a 'schema'",
                                "response_format.json_schema")
            origin = "response_format.json_schema.schema"
            schema = closed(spec["schema"], origin) if spec.get("strict") else spec["schema"]
            return Grammar.json_schema(schema, origin=origin)
    except ConstraintError as e:
        raise ToolError(str(e), "response_format.json_schema.schema" if kind == "json_schema"
                        else "response_format") from e
    raise ToolError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                    "response_format.type")
