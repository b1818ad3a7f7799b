"""OpenAI's Responses API (`/v1/responses`, what Home Assistant's OpenAI integration calls) as
the chat request it is, and a chat answer as its `response` object and stream events.

Stateless, like Ollama's and llama.cpp's: `previous_response_id` and stored responses are
refused; the client sends the whole conversation as `input` items (messages,
`function_call` and `function_call_output`). `instructions` becomes the system message,
`developer` messages are system messages, `tools` are function tools (flat, as this API
writes them), `text.format` is the structured output (`json_schema`, `json_object`, `text`).
"""
from __future__ import annotations

import json
import time
import uuid

from edge.engine.tool_calls import ToolError


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                    or not isinstance(part.get("text"), str):
                raise ToolError(f"{where}[{j}] must be an input_text part with a string 'text' "
                                "(images and files are not supported)", f"{where}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ToolError(f"{where} must be a string or a list of input_text parts", where)


def chat_request(body: dict) -> dict:
    """The Responses request as the chat layer's fields: messages, tools, tool_choice,
    parallel_tool_calls, response_format. Raises ToolError naming the field."""
    if body.get("previous_response_id"):
        raise ToolError("previous_response_id is not supported: this server keeps no responses; send the "
                        "whole conversation as input", "previous_response_id")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ToolError("instructions must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ToolError("input must be a string or a non-empty list of items", "input")
    for i, item in enumerate(items):
        messages += _item(item, f"input[{i}]", messages)
    return {"messages": messages, "tools": _tools(body.get("tools")), "tool_choice": _tool_choice(body.get("tool_choice")),
            "parallel_tool_calls": body.get("parallel_tool_calls"), "response_format": _format(body.get("text"))}


def _item(item, where: str, before: list[dict]) -> list[dict]:
    if not isinstance(item, dict):
        raise ToolError(f"{where} must be an object", where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ToolError(f"{where}.role must be user, assistant, system or developer, got {role!r}", f"{where}.role")
        return [{"role": "system" if role == "developer" else role, "content": _text(item.get("content"), f"{where}.content")}]
    if kind == "function_call":
        name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
        if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(args, str):
            raise ToolError(f"{where} needs a string name, call_id and arguments", where)
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
        if before and before[-1]["role"] == "assistant" and before[-1].get("tool_calls") is not None:
            before[-1]["tool_calls"].append(call)          # parallel calls: one assistant message
            return []
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str):
            raise ToolError(f"{where}.call_id must be a string", f"{where}.call_id")
        return [{"role": "tool", "tool_call_id": item["call_id"],
                 "content": output if isinstance(output, str) else _text(output, f"{where}.output")}]
    raise ToolError(f"{where}.type {kind!r} is not supported (message, function_call, function_call_output)",
                    f"{where}.type")


def _tools(tools):
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ToolError("tools must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ToolError(f"tools[{i}]: only function tools are supported", f"tools[{i}].type")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format(text):
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ToolError("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    return {"type": fmt.get("type", "text")}


class ResponseShape:
    """One response's objects: `whole` for a finished answer, `events` while streaming."""

    def __init__(self, body: dict, model: str):
        self.id, self.created, self.model = _id("resp"), int(time.time()), model
        self.body = body
        self.msg_id = _id("msg")
        self.seq = 0

    def response(self, status: str, output: list, usage=None, reason: str | None = None) -> dict:
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output, "error": None,
                "incomplete_details": {"reason": reason} if reason else None,
                "instructions": b.get("instructions"), "metadata": b.get("metadata") or {},
                "parallel_tool_calls": b.get("parallel_tool_calls", True),
                "temperature": b.get("temperature"), "top_p": b.get("top_p"),
                "max_output_tokens": b.get("max_output_tokens"),
                "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [],
                "text": b.get("text") or {"format": {"type": "text"}}, "store": False,
                "usage": self.usage(usage) if usage is not None else None}

    @staticmethod
    def usage(u) -> dict:
        return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.completion_tokens}

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [self.part(text)] if status == "completed" else []}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    @staticmethod
    def call(call, status: str = "completed", arguments: str | None = None) -> dict:
        return {"type": "function_call", "id": _id("fc"), "call_id": call.id, "name": call.name,
                "arguments": call.arguments_json if arguments is None else arguments, "status": status}

    def output(self, content: str | None, calls) -> list[dict]:
        out = [self.message(content)] if content else []
        return out + [self.call(c) for c in calls]

    @staticmethod
    def status(finish: str) -> tuple[str, str | None]:
        return ("incomplete", "max_output_tokens") if finish == "length" else ("completed", None)

    def event(self, kind: str, **data) -> str:
        """One server-sent event: `event:` line and the data with its type and sequence number."""
        self.seq += 1
        payload = {"type": kind, "sequence_number": self.seq, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"
