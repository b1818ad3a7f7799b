"""The Ollama-compatible API through the official `ollama` client against a real server."""
from __future__ import annotations

import threading

import httpx
import ollama
import pytest
from openai import OpenAI

from edge.api.ollama_api import create_ollama_app
from edge.service.serve import bind, http_app
from tests.http_server import engine_text, ready_state, running
from tests.test_http_api import slow_engine, tiny  # noqa: F401 fixtures

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def smol_ollama(smol):
    with running(ready_state(smol), make_app=create_ollama_app) as base:
        yield ollama.Client(host=base), base


def test_list_show_ps_version(smol_ollama, smol):
    client, base = smol_ollama
    models = client.list().models
    assert models[0].model == f"{smol.name}:latest"           # the served model first, then any other installed
    assert models[0].size > 0 and models[0].digest and models[0].details.family == "llama"
    shown = client.show(smol.name)
    assert shown.modelinfo["llama.context_length"] == smol.max_ctx
    assert shown.details.quantization_level == smol.bundle.quant
    assert [m.model for m in client.ps().models] == [f"{smol.name}:latest"]
    assert httpx.get(f"{base}/api/version").json()["version"]


def test_chat_matches_the_engine_streamed_or_not(smol_ollama, smol):
    client, _ = smol_ollama
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want, finish, usage = engine_text(smol, smol.encode_chat(messages), 16, temperature=0)
    whole = client.chat(model=smol.name, messages=messages, stream=False, options={**GREEDY, "num_predict": 16})
    assert whole.message.content == want and whole.message.role == "assistant"
    assert whole.done and whole.done_reason == ("length" if finish == "length" else "stop")
    assert whole.prompt_eval_count == usage.prompt_tokens and whole.eval_count == usage.completion_tokens
    assert whole.total_duration > 0 and whole.eval_duration >= 0
    parts = list(client.chat(model=f"{smol.name}:latest", messages=messages, stream=True,
                             options={**GREEDY, "num_predict": 16}))
    assert "".join(p.message.content for p in parts) == want
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done


def test_generate_uses_the_chat_template_unless_raw(smol_ollama, smol):
    client, _ = smol_ollama
    want, _, _ = engine_text(smol, smol.encode_chat([{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Name a colour."}]), 8, temperature=0)
    got = client.generate(model=smol.name, prompt="Name a colour.", system="Be brief.", options={**GREEDY, "num_predict": 8})
    assert got.response == want
    raw_want, _, _ = engine_text(smol, smol.encode_text("The Raspberry Pi is"), 8, temperature=0)
    streamed = client.generate(model=smol.name, prompt="The Raspberry Pi is", raw=True, stream=True,
                               options={**GREEDY, "num_predict": 8})
    assert "".join(p.response for p in streamed) == raw_want


def test_errors_are_ollama_shaped(smol_ollama, smol):
    client, base = smol_ollama
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "llama3.2" in e.value.error and smol.name in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2")
    assert e.value.status_code == 404
    assert client.pull(smol.name).status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=smol.name, input="x")
    assert e.value.status_code == 501 and "not supported" in e.value.error
    r = httpx.post(f"{base}/api/chat", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(f"{base}/api/generate", json={"model": smol.name, "prompt": "x", "options": {"top_p": 7}})
    assert r.status_code == 400 and "top_p" in r.json()["error"]
    r = httpx.get(f"{base}/api/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]


def test_empty_prompt_loads_and_answers_at_once(smol_ollama, smol):
    client, _ = smol_ollama
    r = client.generate(model=smol.name, prompt="")
    assert r.done and r.done_reason == "load" and r.response == ""


def test_api_key_applies_to_the_ollama_port(smol):
    with running(ready_state(smol, api_key="k3y"), make_app=create_ollama_app) as base:
        assert httpx.get(f"{base}/api/tags").status_code == 401
        assert httpx.get(f"{base}/api/tags").json()["error"].startswith("Missing API key")
        ok = ollama.Client(host=base, headers={"Authorization": "Bearer k3y"}).list()
        assert len(ok.models) == 1


def test_ollama_and_openai_ports_of_one_server_at_once(tiny):
    """One uvicorn server, two ports: an Ollama chat while an OpenAI stream runs."""
    import time

    import uvicorn
    state = ready_state(tiny)
    slow_engine(state, 0.01)
    a, b = bind("127.0.0.1", 0), bind("127.0.0.1", 0)
    app = http_app(state, b.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [a, b]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        oa = OpenAI(base_url=f"http://127.0.0.1:{a.getsockname()[1]}/v1", api_key="x")
        got = {}

        def openai_stream():
            got["openai"] = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
                model=tiny.name, messages=[{"role": "user", "content": "w1"}], max_tokens=20, stream=True))
        t = threading.Thread(target=openai_stream)
        t.start()
        reply = ollama.Client(host=f"http://127.0.0.1:{b.getsockname()[1]}", timeout=60).chat(
            model=tiny.name, messages=[{"role": "user", "content": "w2"}], options={"num_predict": 5})
        t.join(60)
        assert reply.done and reply.eval_count == 5
        assert got["openai"]
        assert httpx.get(f"http://127.0.0.1:{a.getsockname()[1]}/api/tags").status_code == 404   # OpenAI's port: no Ollama
        on_ollama = OpenAI(base_url=f"http://127.0.0.1:{b.getsockname()[1]}/v1", api_key="x")   # Ollama's: /v1 too
        assert [m.id for m in on_ollama.models.list()] == [state.model_id]
        assert on_ollama.chat.completions.create(model=tiny.name, messages=[{"role": "user", "content": "w3"}],
                                                 max_tokens=3).usage.completion_tokens == 3
    finally:
        server.should_exit = True
        thread.join(10)


def test_chat_with_tools_gives_calls_with_object_arguments(smol_ollama, smol, monkeypatch):
    """Ollama has no tool_choice and the 135M model rarely calls under "auto", so the call is
    forced here (the chat layer's "required", as the OpenAI API offers it); what is tested is
    Ollama's shape: arguments as an object, the call sent back, the tool result answered."""
    import jsonschema

    from edge.api import runtime          # the chat layer both APIs call
    real = runtime.prepare_chat
    monkeypatch.setattr(runtime, "prepare_chat",
                        lambda engine, messages, tools, choice, parallel, fmt, **kw: real(
                            engine, messages, tools, "required", parallel, fmt, **kw))
    client, _ = smol_ollama
    params = {"type": "object", "required": ["room", "on"], "properties": {
        "room": {"type": "string", "enum": ["kitchen", "bedroom"]}, "on": {"type": "boolean"}}}
    tools = [{"type": "function", "function": {"name": "set_light", "description": "Switch a light",
                                               "parameters": params}}]
    messages = [{"role": "user", "content": "Turn off the bedroom light."}]
    for stream in (False, True):
        got = client.chat(model=smol.name, messages=messages, tools=tools, stream=stream,
                          options={"temperature": 0, "num_predict": 60})
        parts = list(got) if stream else [got]
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        assert len(calls) == 1 and calls[0].function.name == "set_light"
        assert isinstance(calls[0].function.arguments, dict)
        jsonschema.validate(calls[0].function.arguments, params)
        assert parts[-1].done
    monkeypatch.setattr(runtime, "prepare_chat", real)
    follow = messages + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "set_light", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_name": "set_light", "content": '{"ok": true}'}]
    final = client.chat(model=smol.name, messages=follow, options={"temperature": 0, "num_predict": 20})
    assert final.done and final.message.content
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=smol.name, messages=[{"role": "tool", "content": "x"}])
    assert e.value.status_code == 400 and "tool" in e.value.error


def test_format_json_schema_and_json(smol_ollama, smol):
    import json

    import jsonschema
    client, _ = smol_ollama
    person = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    got = client.chat(model=smol.name, messages=[{"role": "user", "content": "Invent a person."}], format=person,
                      options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(got.message.content), person)
    gen = client.generate(model=smol.name, prompt="A cat as JSON, with its name only.", format="json",
                          options={"temperature": 0, "num_predict": 300})
    assert gen.done_reason == "stop" and isinstance(json.loads(gen.response), dict), gen.response
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=smol.name, prompt="x", format={"type": "frobnicate"})
    assert e.value.status_code == 400 and "format" in e.value.error


def test_bodies_are_json_whatever_the_content_type(smol_ollama, smol):
    """Ollama's own examples post with `curl -d`, i.e. a form-encoded Content-Type."""
    _, base = smol_ollama
    body = '{"model": "%s", "prompt": "Hi", "stream": false, "options": {"num_predict": 3}}' % smol.name
    r = httpx.post(f"{base}/api/generate", content=body,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"], r.text


# --- Home Assistant's traffic --------------------------------------------------------------

@pytest.fixture
def ollama_log(caplog):
    """The Ollama adapter's log lines, caught on its own logger."""
    from edge.api import ollama_api
    logger = ollama_api.log
    caplog.set_level("INFO", logger=logger.name)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_unknown_options_are_ignored_with_a_log_line(smol_ollama, smol, ollama_log):
    caplog = ollama_log
    client, base = smol_ollama
    got = client.chat(model=smol.name, messages=[{"role": "user", "content": "x"}],
                      options={"temprature": 0.1, "rope_frequency_base": 500000, "num_gqa": 8, "num_predict": 2})
    assert got.done and got.eval_count == 2
    assert "ignoring unknown option(s) num_gqa, rope_frequency_base, temprature" in caplog.text


def test_head_root_and_tools_in_the_capabilities(smol_ollama, smol):
    client, base = smol_ollama
    assert httpx.head(f"{base}/").status_code == 200          # the ollama CLI's heartbeat
    assert "tools" in client.show(smol.name).capabilities


def test_num_ctx_drops_the_oldest_messages_as_ollama_does(smol_ollama, smol, ollama_log):
    caplog = ollama_log
    client, _ = smol_ollama
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"Question {i}: tell me about the number {i} in a few words, please."},
                  {"role": "assistant", "content": f"The number {i} is a fine number with a long story. " * 3}]
    messages = [{"role": "system", "content": "You are brief."}] + turns + [{"role": "user", "content": "Say hi."}]
    full = len(smol.encode_chat(messages))
    assert full > 512
    got = client.chat(model=smol.name, messages=messages, options={"num_ctx": 512, "num_predict": 8, **GREEDY})
    assert got.done and got.prompt_eval_count + got.eval_count <= 512 and got.prompt_eval_count < full
    assert "does not fit num_ctx 512; dropped its" in caplog.text
    kept = smol.tokenizer.decode(smol.encode_chat(messages[:1] + messages[-3:]))     # newest turns stay
    assert "You are brief." in kept
    small = client.chat(model=smol.name, messages=[{"role": "user", "content": "Count to fifty."}],
                        options={"num_ctx": 40, **GREEDY})
    assert small.prompt_eval_count + small.eval_count <= 40                 # the reply is held to num_ctx too


def test_streaming_with_tools_shows_prose_as_it_comes(smol_ollama, smol):
    client, _ = smol_ollama
    tools = [{"type": "function", "function": {"name": "set_light", "description": "Switch a light",
                                               "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}}}}]
    parts = list(client.chat(model=smol.name, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
                             tools=tools, stream=True, options={"num_predict": 24, **GREEDY}))
    prose = [p.message.content for p in parts if p.message.content]
    assert len(prose) > 3 and not any(p.message.tool_calls for p in parts)      # many lines, not one at the end
    assert parts[-1].done and "".join(prose).strip()


def test_the_tool_loop_guard_on_the_ollama_port(smol_ollama, smol, monkeypatch):
    """Home Assistant's loop: the same call answered, the tools offered again. A scripted model
    that would call it again cannot (the server's default), unless the request turns it off."""
    import json

    from edge.engine import engine as engine_module
    from tests.test_tool_guard import KITCHEN, TURN_ON, Scripted
    client, base = smol_ollama
    repeat = json.dumps({"name": "HassTurnOn", "parameters": KITCHEN})
    monkeypatch.setattr(engine_module, "Sampler", Scripted(smol, repeat))
    messages = [{"role": "user", "content": "Turn on the kitchen light"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": KITCHEN}}]},
                {"role": "tool", "tool_name": "HassTurnOn", "content": '{"success": true}'}]
    guarded = client.chat(model=smol.name, messages=messages, tools=[TURN_ON], options={"num_predict": 60})
    assert [(c.function.name, dict(c.function.arguments)) for c in guarded.message.tool_calls or []] \
        != [("HassTurnOn", KITCHEN)]
    monkeypatch.setattr(engine_module, "Sampler", Scripted(smol, repeat))
    free = httpx.post(f"{base}/api/chat", timeout=120, json={
        "model": smol.name, "messages": messages, "tools": [TURN_ON], "stream": False, "tool_loop_guard": False,
        "options": {"num_predict": 60}}).json()
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in free["message"]["tool_calls"]] \
        == [("HassTurnOn", KITCHEN)]
