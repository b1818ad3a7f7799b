"""`/v1/responses` through the official `openai` client (`client.responses.create`), as Home
Assistant's OpenAI integration calls it: streamed and not, with a tool, `instructions`,
structured output; and the `developer` role on chat completions."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.http_server import SMOL_NAME, engine_text, ready_state, running

LIGHT = {"type": "function", "name": "set_light", "description": "Switch a light",
         "parameters": {"type": "object", "required": ["room", "on"], "properties": {
             "room": {"type": "string", "enum": ["kitchen", "bedroom"]}, "on": {"type": "boolean"}}}}


@pytest.fixture(scope="module")
def client(smol):  # noqa: F811
    with running(ready_state(smol)) as base:
        yield OpenAI(base_url=f"{base}/v1", api_key="x"), base


def test_a_response_matches_the_chat_answer(client, smol):  # noqa: F811
    oa, _ = client
    r = oa.responses.create(model=SMOL_NAME, instructions="You are brief.", input="What is the capital of France?",
                            max_output_tokens=16, temperature=0)
    want, finish, usage = engine_text(smol, smol.encode_chat([{"role": "system", "content": "You are brief."},
                                                              {"role": "user", "content": "What is the capital of France?"}]),
                                      16, temperature=0)
    assert r.output_text == want and r.object == "response"
    assert r.status == ("incomplete" if finish == "length" else "completed")
    assert r.usage.input_tokens == usage.prompt_tokens and r.usage.output_tokens == usage.completion_tokens


def test_a_streamed_response_gives_the_same_text_in_events(client):
    oa, _ = client
    kwargs = dict(model=SMOL_NAME, input=[{"role": "developer", "content": "Answer in one sentence."},
                                    {"role": "user", "content": "Why is the sky blue?"}],
                  max_output_tokens=24, temperature=0)
    whole = oa.responses.create(**kwargs).output_text
    events = list(oa.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] in ("response.completed",
                                                                                       "response.incomplete")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_and_its_result(client, stream):
    oa, _ = client
    ask = [{"role": "user", "content": "Turn off the bedroom light."}]
    r = oa.responses.create(model=SMOL_NAME, input=ask, tools=[LIGHT], tool_choice={"type": "function", "name": "set_light"},
                            temperature=0, max_output_tokens=60, stream=stream)
    if stream:
        events = list(r)
        assert "response.function_call_arguments.delta" in [e.type for e in events]
        r = events[-1].response
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "set_light" and call.call_id
    jsonschema.validate(json.loads(call.arguments), LIGHT["parameters"])
    follow = ask + [{"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                    {"type": "function_call_output", "call_id": call.call_id, "output": '{"success": true}'}]
    again = oa.responses.create(model=SMOL_NAME, input=follow, tools=[LIGHT], temperature=0, max_output_tokens=20)
    assert again.status in ("completed", "incomplete") and again.output


def test_structured_output_through_text_format(client):
    oa, _ = client
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    r = oa.responses.create(model=SMOL_NAME, input="Name a city and its country as JSON.", temperature=0,
                            max_output_tokens=60,
                            text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)


def test_what_cannot_be_served_is_a_400_in_openai_shape(client):
    oa, base = client
    r = httpx.post(f"{base}/v1/responses", json={"model": SMOL_NAME, "input": "x", "previous_response_id": "resp_1"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    r = httpx.post(f"{base}/v1/responses", json={"model": SMOL_NAME, "input": "x", "tools": [{"type": "web_search"}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].type"


def test_developer_role_and_object_tool_results_on_chat_completions(client, smol):  # noqa: F811
    oa, _ = client
    msgs = [{"role": "developer", "content": "You are brief."}, {"role": "user", "content": "Say hi."}]
    got = oa.chat.completions.create(model=SMOL_NAME, messages=msgs, max_tokens=8, temperature=0)
    want, _, _ = engine_text(smol, smol.encode_chat([{"role": "system", "content": "You are brief."}, msgs[1]]), 8,
                             temperature=0)
    assert got.choices[0].message.content == want
    tools = [{"type": "function", "function": {k: LIGHT[k] for k in ("name", "description", "parameters")}}]
    follow = [{"role": "user", "content": "Kitchen light on"},
              {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                  "name": "set_light", "arguments": '{"room": "kitchen", "on": true}'}}]},
              {"role": "tool", "tool_call_id": "c1", "content": {"success": True}}]
    r = httpx.post(f"{oa.base_url}chat/completions", json={"model": SMOL_NAME, "messages": follow, "tools": tools,
                                                            "max_tokens": 8}, timeout=300)
    assert r.status_code == 200, r.text
