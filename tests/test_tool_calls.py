"""The chat layer's tool calling: the parser on Llama 3.2-style outputs, the streaming filter,
the request checks, the fallback prompt, and the Llama 3.2 template's rendering of tools, calls
and results against transformers."""
from __future__ import annotations

import json

import pytest

from edge.engine.chat_template import DEFAULT_CHATML, ChatTemplate
from edge.engine.tool_calls import ToolError, ToolUse, history, parse_calls
from tests.test_chat_template import LLAMA3_2_TEMPLATE, LLAMA3_TOKENS, frozen_clock, hf_render  # noqa: F401

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}}}}
NAMES = {"get_weather", "set_timer"}

# Outputs in the forms Llama 3.2 Instruct writes for custom tools (JSON, with or without the
# "type" key the 1B adds), the pythonic list of Meta's prompt-format guide, and <|python_tag|>.
LLAMA_OUTPUTS = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "San Francisco", "unit": "celsius"}}',
     None, [("get_weather", {"city": "San Francisco", "unit": "celsius"})]),
    ("[get_weather(city='San Francisco', unit='celsius')]", None,
     [("get_weather", {"city": "San Francisco", "unit": "celsius"})]),
    ('<|python_tag|>{"name": "set_timer", "parameters": {"minutes": 10}}', None, [("set_timer", {"minutes": 10})]),
    ('<|python_tag|>set_timer(minutes=5)', None, [("set_timer", {"minutes": 5})]),
    ('I will check that for you.\n\n{"name": "get_weather", "parameters": {"city": "Oslo"}}',
     "I will check that for you.", [("get_weather", {"city": "Oslo"})]),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "set_timer", "parameters": {"minutes": 3}}',
     None, [("get_weather", {"city": "Rome"}), ("set_timer", {"minutes": 3})]),
    ('[get_weather(city="Rome"), set_timer(minutes=3)]', None,
     [("get_weather", {"city": "Rome"}), ("set_timer", {"minutes": 3})]),
    ('[{"name": "get_weather", "arguments": "{\\"city\\": \\"Lyon\\"}"}]', None, [("get_weather", {"city": "Lyon"})]),
]

PROSE = [
    "In Python a dict looks like {'a': 1} and a list like [1, 2].",
    'The JSON {"name": "Bob", "parameters": {}} describes a person.',                 # unknown name
    '{"name": "get_weather", "parameters": {"city": "Par',                             # cut off
    '{"name": "get_weather", "parameters": {"city": "Paris"}} is how you would call it.',  # text after
    "[get_weather] is a function; call it like get_weather(city='x').",
    '<|python_tag|>brave_search.call(query="weather")',                                # built-in tool, not offered
    "[os.system('rm -rf /')]",
]


@pytest.mark.parametrize("text, content, calls", LLAMA_OUTPUTS, ids=range(len(LLAMA_OUTPUTS)))
def test_parser_reads_llama_call_forms_and_keeps_text_before(text, content, calls):
    got_content, got = parse_calls(text, NAMES)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)
    assert all(json.loads(c.arguments_json) == c.arguments for c in got)


@pytest.mark.parametrize("text", PROSE)
def test_parser_never_turns_prose_into_a_call(text):
    assert parse_calls(text, NAMES) == (text, [])


@pytest.mark.parametrize("text", [t for t, _, _ in LLAMA_OUTPUTS] + PROSE)
def test_streamed_pieces_give_the_same_content_and_calls(text):
    use = ToolUse.of([WEATHER, TIMER])
    for size in (1, 3, 7, 1000):
        stream = use.stream()
        shown = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
        rest, calls = stream.finish()
        whole_content, whole_calls = use.parse(text)
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
        assert (shown + (rest or "")).rstrip() == (whole_content or "")


STREAMED_EARLY = [      # (text, what is shown before the reply ends, one character at a time)
    ("In Python a dict looks like {'a': 1} and a list like [1, 2].", "all"),
    ('The JSON {"name": "Bob", "parameters": {}} describes a person.', "all"),
    ("[get_weather] is a function; call it like get_weather(city='x').", "all"),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}} is how you would call it.', "all"),
    ("[os.system('rm -rf /')]", "all"),
    ('Let me check.\n{"name": "get_weather", "parameters": {"city": "Oslo"}}', "Let me check.\n"),
    ('{"name": "get_weather", "parameters": {"city": "Par', ""),
    ('<|python_tag|>set_timer(minutes=5)', ""),
]


@pytest.mark.parametrize("text, early", STREAMED_EARLY)
def test_prose_streams_as_it_comes_and_only_a_possible_call_is_held(text, early):
    """llama.cpp's partial parsing: a brace holds the text only while a call may follow."""
    stream = ToolUse.of([WEATHER, TIMER]).stream()
    shown = "".join(stream.feed(c) for c in text)
    assert shown == (text if early == "all" else early)


BAD_TOOLS = [
    ([{"type": "function", "function": {"parameters": {"type": "object"}}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], None, "tools[0].function.parameters"),
    ([{"type": "retrieval"}], None, "tools[0].type"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([WEATHER], {"type": "function", "function": {"name": "launch_rocket"}}, "tool_choice.function.name"),
    ([WEATHER], "always", "tool_choice"),
    (None, "required", "tool_choice"),
]


@pytest.mark.parametrize("tools, choice, param", BAD_TOOLS, ids=[b[2] + str(i) for i, b in enumerate(BAD_TOOLS)])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(ToolError) as e:
        ToolUse.of(tools, choice)
    assert e.value.param == param


def test_tool_result_without_a_call_is_refused():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]
    with pytest.raises(ToolError) as e:
        history(messages, DEFAULT_CHATML)
    assert e.value.param == "messages[2].tool_call_id"


def conversation_with_a_call(arguments) -> list[dict]:
    return [{"role": "system", "content": "You are a home assistant."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]


def test_llama3_2_renders_tools_calls_and_results_like_transformers(frozen_clock):  # noqa: F811
    use = ToolUse.of([WEATHER, TIMER])
    template = ChatTemplate(LLAMA3_2_TEMPLATE, **LLAMA3_TOKENS)
    # the client sends arguments as a JSON string; transformers' templates want the object
    ours_messages, extra = use.prompt(history(conversation_with_a_call('{"city": "Paris"}'), template.source),
                                      template.source)
    ours = template.render(ours_messages, add_generation_prompt=True, **extra)
    want = hf_render(LLAMA3_2_TEMPLATE, conversation_with_a_call({"city": "Paris"}), True, LLAMA3_TOKENS,
                     tools=[WEATHER, TIMER])
    assert ours == want
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in ours
    assert "<|start_header_id|>ipython<|end_header_id|>" in ours and '"name": "set_timer"' in ours


def test_fallback_prompt_for_chatml_puts_tools_in_the_system_turn():
    use = ToolUse.of([WEATHER], "required")
    messages, extra = use.prompt(history(conversation_with_a_call('{"city": "Paris"}'), DEFAULT_CHATML),
                                 DEFAULT_CHATML)
    assert extra == {}
    text = ChatTemplate(DEFAULT_CHATML).render(messages)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou can call") and system.endswith("\n\nYou are a home assistant.")
    assert json.dumps(WEATHER["function"]["parameters"]) in system and "You must call" in system
    assert '<|im_start|>assistant\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|im_end|>' in text
    assert 'Result of get_weather: {"temperature": 21' in text
    # tool_choice "none": no tools in the prompt at all
    plain, _ = ToolUse.of([WEATHER], "none").prompt([{"role": "user", "content": "x"}], DEFAULT_CHATML)
    assert plain == [{"role": "user", "content": "x"}]


def test_llama3_2_parallel_calls_in_the_history_become_one_call_per_turn(frozen_clock):  # noqa: F811
    # the template itself refuses two calls in one message; split, each renders as transformers renders one
    template = ChatTemplate(LLAMA3_2_TEMPLATE, **LLAMA3_TOKENS)
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
             {"id": "c2", "type": "function", "function": {"name": "set_timer", "arguments": '{"minutes": 3}'}}]
    messages = [{"role": "user", "content": "Rome weather, and a 3 minute timer"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "started"}]
    ours = template.render(history(messages, template.source))
    one_each = [messages[0]] + [{"role": "assistant", "content": None, "tool_calls": [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}]} for c in calls] \
        + messages[2:]
    assert ours == hf_render(LLAMA3_2_TEMPLATE, one_each, True, LLAMA3_TOKENS)
    assert ours.count('"name": "get_weather"') == 1 and ours.count('"name": "set_timer"') == 1


@pytest.mark.parametrize("role", ["tool", "ipython"])
def test_object_tool_results_and_the_ipython_role_render_like_transformers(frozen_clock, role):  # noqa: F811
    template = ChatTemplate(LLAMA3_2_TEMPLATE, **LLAMA3_TOKENS)
    messages = conversation_with_a_call({"city": "Paris"})
    messages[-1] = {"role": role, "tool_call_id": "call_1", "content": {"temperature": 21, "sky": "clear"}}
    ours = template.render(history(messages, template.source), tools=[WEATHER["function"]])
    assert ours == hf_render(LLAMA3_2_TEMPLATE, messages, True, LLAMA3_TOKENS, tools=[WEATHER["function"]])
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 21, "sky": "clear"}<|eot_id|>' in ours


def test_object_results_and_developer_messages_in_the_fallback_prompt():
    messages = conversation_with_a_call({"city": "Paris"})
    messages[0] = {"role": "developer", "content": "You are a home assistant."}
    messages[-1] = {"role": "tool", "tool_call_id": "call_1", "content": {"temperature": 21}}
    text = ChatTemplate(DEFAULT_CHATML).render(history(messages, DEFAULT_CHATML))
    assert text.startswith("<|im_start|>system\nYou are a home assistant.<|im_end|>")
    assert 'Result of get_weather: {"temperature": 21}' in text
