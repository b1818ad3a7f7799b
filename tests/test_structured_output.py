"""Tools, JSON-schema output, logprobs and n > 1 on a real server, driven by the official client.

Tool calls and schemas run the default model (SmolLM2-135M-Instruct): its ChatML template has
no tool support, so this is the fallback prompt plus the grammar. Logprobs and n run the tiny
random model, checked against the NumPy reference model's own logits.
"""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from edge.engine.constraint import Grammar
from edge.engine.engine import Engine, GenerationParams
from edge.engine.sampler import SamplingParams
from edge.model.backends import load_backend
from edge.model.bundle import Bundle
from tests.http_server import SMOL_NAME, engine_text, endless_engine


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city's name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "description": "Start a kitchen timer",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 120},
                                                    "label": {"type": "string", "maxLength": 20}},
                   "required": ["minutes"]}}}
LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Switch a light on or off",
    "parameters": {"type": "object", "properties": {"room": {"type": "string", "enum": ["kitchen", "bedroom", "hall"]},
                                                    "on": {"type": "boolean"}},
                   "required": ["room", "on"]}}}
TOOLS = [WEATHER, TIMER, LIGHT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                           "languages": {"type": "array", "items": {"type": "string"},
                                                         "maxItems": 3}},
          "required": ["name", "age", "languages"], "additionalProperties": False}


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reassemble(chunks) -> tuple[str, list[dict], list[str]]:
    """Content, tool calls (merged by index, as OpenAI's own SDK helpers do) and finish reasons."""
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            if d.function and d.function.name:
                assert not call["name"], "the name comes once, first"
                call["name"] = d.function.name
            if d.function and d.function.arguments:
                assert call["name"], "arguments come after the name"
                call["arguments"] += d.function.arguments
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    return content, [calls[i] for i in sorted(calls)], finishes


# --- tools on the default model ----------------------------------------------------------

def test_tool_call_streamed_and_not_then_the_result_and_a_final_answer(smol_base):
    api = client(smol_base)
    messages = [{"role": "system", "content": "You are a home assistant."},
                {"role": "user", "content": "What is the weather like in Paris?"}]
    ask = dict(model=SMOL_NAME, messages=messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    reply = api.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])

    content, calls, finishes = reassemble(api.chat.completions.create(**ask, stream=True))
    assert content == "" and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [(call.function.name, json.loads(call.function.arguments))]
    assert calls[0]["id"].startswith("call_")

    followup = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
    # "none": a 135M model under "auto" tends to repeat the call it sees in the history
    final = api.chat.completions.create(model=SMOL_NAME, messages=followup, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content.strip()
    # the follow-up's prompt carries the call and its result
    before = api.chat.completions.create(model=SMOL_NAME, messages=messages, tools=TOOLS, tool_choice="none",
                                         max_tokens=1)
    assert final.usage.prompt_tokens > before.usage.prompt_tokens + 20


PROMPTS = ["Is it raining in Oslo?", "Set a timer for the pasta, 9 minutes.", "Turn off the bedroom light.",
           "How warm is it in Lisbon right now, in fahrenheit?", "Remind me in an hour and a half.",
           "Lights on in the kitchen please."]


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_validate_against_their_schema(smol_base, choice):
    api = client(smol_base)
    for i, prompt in enumerate(PROMPTS):
        name = TOOLS[i % 3]["function"]["name"]
        tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": name}}
        reply = api.chat.completions.create(model=SMOL_NAME, messages=user(prompt), tools=TOOLS, tool_choice=tool_choice,
                                            temperature=0.8, seed=i, max_tokens=120)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls", message
        [call] = message.tool_calls
        if choice == "named":
            assert call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.slow
def test_home_assistant_probe_tools_with_three_tokens(smol_base):
    """Home Assistant's llama_cpp integration checks a server this way and gives up on any error."""
    api = client(smol_base)
    reply = api.chat.completions.create(model=SMOL_NAME, messages=user("Hello"), tools=TOOLS, max_tokens=3)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert reply.usage.completion_tokens <= 3
    chunks = list(api.chat.completions.create(model=SMOL_NAME, messages=user("Hello"), tools=TOOLS, max_tokens=3,
                                              stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop", "tool_calls")


# --- response_format ---------------------------------------------------------------------

def test_response_format_json_schema_output_validates(smol_base):
    api = client(smol_base)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = user("Invent a person who speaks some languages. Answer in JSON.")
    for seed in range(3):
        reply = api.chat.completions.create(model=SMOL_NAME, messages=messages, response_format=fmt,
                                            temperature=0.9, seed=seed, max_tokens=200)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    content, _, finishes = reassemble(api.chat.completions.create(
        model=SMOL_NAME, messages=messages, response_format=fmt, temperature=0.9, seed=0, max_tokens=200, stream=True))
    jsonschema.validate(json.loads(content), PERSON)
    assert finishes == ["stop"]

    # (an open-ended "describe a cat" makes the 135M model list keys until max_tokens: JSON mode
    # bounds the syntax, not the length)
    reply = api.chat.completions.create(model=SMOL_NAME, messages=user("Return a JSON object with a city and its country."),
                                        temperature=0, response_format={"type": "json_object"}, max_tokens=200)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_the_engine_mask_holds_sampling_to_the_grammar(smol):
    """Any sampler setting, the output stays inside the grammar and ends where it completes."""
    grammar = Grammar.lark('start: "The answer is " /[0-9]{1,3}/ "."')
    ids = smol.encode_chat(user("Write a poem about the sea."))
    for seed in range(3):
        params = GenerationParams(max_tokens=20, constraint=grammar,
                                  sampling=SamplingParams(temperature=1.5, seed=seed))
        events = list(smol.generate(ids, params))
        text = "".join(e.text for e in events)
        assert text.startswith("The answer is ") and text.endswith(".") and text[14:-1].isdigit(), text
        assert events[-1].finish_reason == "stop"


BAD = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}}], "tool_choice": "required"}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id"),
]


@pytest.mark.parametrize("extra, param", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_tools_and_formats_get_400_naming_the_field(smol_base, extra, param):
    body = {"messages": user("Hi"), "max_tokens": 2, **extra}
    r = httpx.post(f"{smol_base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert param.split("[")[0].split(".")[0] in error["message"] or "schema" in error["message"], error


# --- the tiny model: auto tools without a grammar, logprobs, n ---------------------------

@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> Engine:
    return endless_engine(tiny_bundle, 512)     # room for the tool prompt


def test_auto_tools_on_a_model_that_writes_no_call_answer_as_text(tiny, tiny_base):
    # the tiny word-level tokenizer has no grammar support: "auto" still parses, unconstrained
    reply = client(tiny_base).chat.completions.create(model="tiny", messages=user("w1 w2"), tools=TOOLS,
                                                      temperature=0, max_tokens=6)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.tool_calls is None
    assert len(reply.choices[0].message.content.split()) == 6
    r = httpx.post(f"{tiny_base}/v1/chat/completions", json={"messages": user("w1"), "tools": TOOLS,
                                                             "tool_choice": "required"})
    assert r.status_code == 400 and "cannot be used for constrained decoding" in r.json()["error"]["message"]


def reference_logprobs(bundle_path, prompt_ids: list[int], generated: list[int]) -> np.ndarray:
    """log-softmax of the NumPy reference model's logits at each generated position [n, V]."""
    model = load_backend(Bundle.open(bundle_path), "numpy", 128)
    logits = model.prefill(list(prompt_ids) + list(generated), model.new_cache(), all_logits=True)
    rows = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(generated)].astype(np.float64)
    return rows - (rows.max(1, keepdims=True) + np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1, keepdims=True)))


def test_logprobs_equal_log_softmax_of_the_reference_logits(tiny, tiny_base, tiny_bundle):
    api = client(tiny_base)
    vocab = tiny.tokenizer.get_vocab()
    messages = user("w3 w14 w15 w92")
    ids = tiny.encode_chat(messages)
    ask = dict(model="tiny", messages=messages, temperature=1.0, seed=3, max_tokens=8, logprobs=True, top_logprobs=4)
    whole = api.chat.completions.create(**ask).choices[0].logprobs.content
    streamed = [e for c in api.chat.completions.create(**ask, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    generated = [vocab[e.token] for e in whole]
    assert len(generated) == 8
    ref = reference_logprobs(tiny_bundle, ids, generated)
    for row, entry, token in zip(ref, whole, generated):
        assert entry.logprob == pytest.approx(row[token], abs=1e-3)
        assert [t.token for t in entry.top_logprobs] == [f"w{i}" for i in np.argsort(-row)[:4]]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(np.sort(row)[::-1][:4], abs=1e-3)
        assert entry.bytes == list(entry.token.encode())

    prompt = "w5 w6 w7"
    done = api.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    generated = [vocab[t] for t in lp.tokens]
    ref = reference_logprobs(tiny_bundle, tiny.encode_text(prompt), generated)
    assert lp.token_logprobs == pytest.approx([row[t] for row, t in zip(ref, generated)], abs=1e-3)
    assert all(t == max(top, key=top.get) for t, top in zip(lp.tokens, lp.top_logprobs))  # greedy: the top one
    streamed = [t for c in api.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                                  stream=True) if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_n_choices_are_generated_one_after_the_other(tiny, tiny_base):
    api = client(tiny_base)
    messages = user("w7 w8")
    want = [engine_text(tiny, tiny.encode_chat(messages), 6, temperature=1.0, seed=20 + i)[0] for i in range(3)]
    assert len(set(want)) == 3
    reply = api.chat.completions.create(model="tiny", messages=messages, n=3, seed=20, temperature=1.0, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == want
    assert reply.usage.completion_tokens == 18
    got = {}
    for c in api.chat.completions.create(model="tiny", messages=messages, n=3, seed=20, temperature=1.0, max_tokens=6,
                                         stream=True):
        for ch in c.choices:
            got[ch.index] = got.get(ch.index, "") + (ch.delta.content or "")
    assert [got[i] for i in range(3)] == want


@pytest.mark.slow
def test_bench_reports_the_mask_cost_against_the_decode_step(smol, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    out = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "-m", str(smol.bundle.path), "-p", "8",
                          "-n", "24", "-r", "1", "-t", "1", "--json-schema", str(schema), "--json"],
                         capture_output=True, text=True, check=True).stdout
    row = json.loads(out)
    assert 0 < row["mask_ms_per_token"] <= row["mask_ms_p90"]
    assert 0 < row["mask_share_of_step"] < 1 and row["decode_ms_per_token"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "frobnicate"}')
    failed = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "-m", str(smol.bundle.path), "-p", "8",
                             "-n", "4", "-r", "1", "--json-schema", str(bad)], capture_output=True, text=True)
    assert failed.returncode != 0 and "frobnicate" in failed.stderr


def test_logprob_bytes_are_exact_even_inside_a_character(smol):
    from edge.engine.detokenizer import TokenBytes
    token_bytes = TokenBytes(smol.tokenizer)
    text = "Grüße, 世界 😀 — naïve café!"
    ids = smol.tokenizer.encode(text, add_special_tokens=False).ids
    pieces = [token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in pieces)  # a split character
    assert token_bytes(smol.tokenizer.token_to_id("<|im_end|>")) == b"<|im_end|>"
    entry = smol.token_logprob(np.zeros(smol.config.vocab_size, np.float32), ids[0], 2)
    assert entry.bytes == pieces[0] and len(entry.top) == 2
    assert entry.logprob == pytest.approx(-np.log(smol.config.vocab_size))


@pytest.mark.slow
def test_speculative_drafts_under_a_grammar_give_the_same_tokens(smol):
    """Drafts are checked token by token through the grammar's mask (the matcher advances only
    on taken tokens): with speculation the constrained reply is the plain one, greedy or seeded."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    grammar = Grammar.json_schema(schema)
    ids = smol.encode_chat(user('Repeat exactly this JSON: {"city": "San Francisco de Campeche", '
                                '"country": "Mexico"} and {"city": "San Francisco de Campeche", "country": "Mexico"}'))
    drafted = []
    real_verify = smol._verify
    smol._verify = lambda seq, rows, d: drafted.append(len(d)) or real_verify(seq, rows, d)
    try:
        for sampling in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3)):
            got = {}
            for speculate in (False, True):
                smol.reset()
                events = list(smol.generate(ids, GenerationParams(max_tokens=60, constraint=grammar, sampling=sampling,
                                                                  speculate=speculate)))
                got[speculate] = [e.token_id for e in events if e.token_id is not None], events[-1].finish_reason
            assert got[True] == got[False]
            assert json.loads(smol.tokenizer.decode(got[True][0]))["country"]
    finally:
        del smol._verify
    assert drafted
