"""ChatTemplate must render byte-for-byte what transformers' apply_chat_template(tokenize=False) renders."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import gguf
import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils import chat_template_utils

from edge.engine import chat_template as ct
from edge.engine.chat_template import DEFAULT_CHATML, ChatTemplate, ChatTemplateError

# Copied verbatim from llama.cpp's models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja
# (ggerganov/llama.cpp @ 7b5e0803c84435e8005725d8f9ddceb5d1820443), a dump of the "chat_template"
# of meta-llama's Llama 3.2 Instruct tokenizer_config.json; 1B-Instruct ships the same template
# (its strftime_now "Today Date" block distinguishes it from 3.1's fixed "26 Jul 2024").
LLAMA3_2_TEMPLATE = (Path(__file__).parent / "data" / "llama3_2_chat_template.jinja").read_text()
LLAMA3_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hello!"}],
    "system": [
        {"role": "system", "content": "  You are terse.\n"},
        {"role": "user", "content": "What is 2+2? <b>&</b> 'quotes'"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me about 世界 and 😀.\n\n  "},
    ],
    "ends with assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ],
}


class FrozenDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 9, 5, 23, 59, 59)


@pytest.fixture
def frozen_clock(monkeypatch):
    """Both renderers call strftime_now at render time; freeze it so they cannot straddle midnight."""
    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)
    monkeypatch.setattr(ct, "datetime", FrozenDatetime)


def hf_render(template: str, messages, add_generation_prompt: bool, tokens: dict, **extra) -> str:
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()), **tokens)
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


@pytest.fixture(scope="module")
def smollm2_template(smollm2_gguf) -> str:
    return gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_smollm2_matches_transformers(smollm2_template, name, add_generation_prompt):
    tokens = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    messages = CONVERSATIONS[name]
    ours = ChatTemplate(smollm2_template, **tokens).render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(smollm2_template, messages, add_generation_prompt, tokens)
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_llama3_2_matches_transformers(frozen_clock, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = ChatTemplate(LLAMA3_2_TEMPLATE, **LLAMA3_TOKENS).render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(LLAMA3_2_TEMPLATE, messages, add_generation_prompt, LLAMA3_TOKENS)
    assert ours.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 05 Sep 2024\n\n"
    )


def test_llama3_2_tools_and_extra_variables_match_transformers(frozen_clock):
    # tools go through tojson(indent=4) (non-ASCII kept, no HTML escaping); date_string overrides strftime_now
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "<str>"}}}]
    messages = CONVERSATIONS["system"]
    extra = {"tools": tools, "date_string": "01 Jan 2025"}
    ours = ChatTemplate(LLAMA3_2_TEMPLATE, **LLAMA3_TOKENS).render(messages, **extra)
    assert ours == hf_render(LLAMA3_2_TEMPLATE, messages, True, LLAMA3_TOKENS, **extra)
    assert '"name": "météo"' in ours and "Today Date: 01 Jan 2025" in ours


def test_none_valued_keys_are_dropped_like_transformers(frozen_clock):
    # A tool_calls=None key must not send the message down the template's tool-call branch.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "tool_calls": None}]
    ours = ChatTemplate(LLAMA3_2_TEMPLATE, **LLAMA3_TOKENS).render(messages)
    assert ours == hf_render(LLAMA3_2_TEMPLATE, messages, True, LLAMA3_TOKENS)
    assert "assistant<|end_header_id|>\n\nYo<|eot_id|>" in ours


def test_default_chatml_matches_transformers():
    messages = CONVERSATIONS["multi-turn"]
    ours = ChatTemplate(DEFAULT_CHATML).render(messages)
    assert ours == hf_render(DEFAULT_CHATML, messages, True, {})
    assert ours.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_block_whitespace_matches_transformers():
    # Neither real template above depends on trim_blocks/lstrip_blocks; this layout does.
    template = (
        "{% for message in messages %}\n"
        "    {% if message.role == 'user' %}\n"
        "    > {{ message.content }}\n"
        "    {% else %}\n"
        "    {{ message.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    messages = CONVERSATIONS["multi-turn"]
    ours = ChatTemplate(template).render(messages)
    assert ours == hf_render(template, messages, True, {})
    assert ours.startswith("    Be kind.\n    > Hi\n")


def test_special_tokens_and_loopcontrols():
    template = "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}{{ pad_token }}|{{ unk_token is defined }}"
    out = ChatTemplate(template, bos_token="<s>", pad_token="<pad>").render(CONVERSATIONS["multi-turn"])
    assert out == "<s>Be kind.<pad>|False"


def test_raise_exception_becomes_chat_template_error():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        ChatTemplate(template).render(CONVERSATIONS["system"])


def test_syntax_error_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{% set ns = namespace(_x=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ dict.__class__.__mro__ }}",
])
def test_sandbox_blocks_escapes(template):
    with pytest.raises(ChatTemplateError, match="unsafe|underscore"):
        ChatTemplate(template).render(CONVERSATIONS["user only"])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"content": "hi"}], "role"),
    ([{"role": "user", "content": None}], "content"),
    ([{"role": "user", "content": ["a", "b"]}], "content"),
    (["hi"], r"messages\[0\]"),
])
def test_invalid_messages_raise_value_error(messages, match):
    with pytest.raises(ValueError, match=match):
        ChatTemplate(DEFAULT_CHATML).render(messages)
