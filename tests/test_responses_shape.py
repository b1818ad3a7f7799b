"""The Responses API request as a chat request (the route's own tests use the openai client)."""
from __future__ import annotations

import pytest

from edge.api.responses_shape import chat_request
from edge.engine.tool_calls import ToolError

LIGHT = {"type": "function", "name": "HassTurnOn", "description": "Turn on",
         "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}


def test_input_items_become_messages_tools_and_format():
    req = chat_request({
        "instructions": "You are a voice assistant.", "tools": [LIGHT], "tool_choice": {"type": "function", "name": "HassTurnOn"},
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}},
        "input": [{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "input_text", "text": "Kitchen light on"}]},
                  {"type": "function_call", "call_id": "c1", "name": "HassTurnOn", "arguments": '{"name": "Kitchen"}'},
                  {"type": "function_call", "call_id": "c2", "name": "HassTurnOn", "arguments": '{"name": "Hall"}'},
                  {"type": "function_call_output", "call_id": "c1", "output": '{"success": true}'},
                  {"type": "function_call_output", "call_id": "c2", "output": '{"success": true}'}]})
    m = req["messages"]
    assert [x["role"] for x in m] == ["system", "system", "user", "assistant", "tool", "tool"]
    assert m[0]["content"] == "You are a voice assistant." and m[2]["content"] == "Kitchen light on"
    assert [c["id"] for c in m[3]["tool_calls"]] == ["c1", "c2"]
    assert req["tools"] == [{"type": "function", "function": {k: LIGHT[k] for k in ("name", "description", "parameters")}}]
    assert req["tool_choice"] == {"type": "function", "function": {"name": "HassTurnOn"}}
    assert req["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert chat_request({"input": "hi"})["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "input_image"}]}, "input[0].type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
])
def test_what_cannot_be_served_is_refused_by_field(body, param):
    with pytest.raises(ToolError) as e:
        chat_request(body)
    assert e.value.param == param
