"""Render a checkpoint's chat template exactly as transformers' `apply_chat_template(tokenize=False)`.

This mirrors `transformers/utils/chat_template_utils.py` (`_cached_compile_jinja_template`,
`render_jinja_template`) with jinja2 alone, so the runtime never imports transformers:
the same sandbox, `trim_blocks`/`lstrip_blocks`, loop controls, `tojson` without HTML escaping,
`raise_exception`, `strftime_now`, the restricted `dict`/`namespace`, the `{% generation %}` tag,
and the same variables (`messages`, `add_generation_prompt`, `tools=None`, `documents=None`, the
named special tokens, then the caller's extras). Message keys whose value is None are dropped first,
as transformers does, because templates test `'key' in message` rather than its value; so an
assistant message may have `content: null` when it carries `tool_calls`. `continue_final_message`
leaves the last message open for the model to continue (an assistant prefill), cut exactly where
transformers cuts it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime

import jinja2
import jinja2.nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = frozenset({"system", "user", "assistant", "tool", "ipython"})   # ipython: Llama 3.x's tool results
RESULT_ROLES = frozenset({"tool", "ipython"})        # their content may be a JSON object or list

# The ChatML template transformers used as its class-level default; SmolLM2, Qwen and many others
# are trained on this layout, so it is the least surprising choice for a checkpoint without one.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template failed to compile or render (including its own `raise_exception`).

    A ValueError because `raise_exception` usually rejects the conversation itself (e.g. roles
    that do not alternate), which an HTTP layer should report as a bad request.
    """


class ChatTemplate:
    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", **special_tokens: str):
        """`special_tokens` are further named tokens (unk_token, pad_token, ...). Empty ones stay
        undefined in the template, as they are for a transformers tokenizer that lacks them."""
        tokens = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}
        self.special_tokens = {name: value for name, value in tokens.items() if value}
        self.source = template
        try:
            self._template = _ENV.from_string(template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True, *,
               continue_final_message: bool = False, **extra) -> str:
        chat = _checked_messages(messages)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise ValueError("continue_final_message is set but the final message has no content to continue")
            chat[-1]["content"] = final + _CONTINUE_TAG
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            text = self._template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e
        return _cut_at_continue_tag(text, final) if continue_final_message else text


# transformers' marker for the end of the message to continue (render_jinja_template)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _cut_at_continue_tag(text: str, final: str) -> str:
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ChatTemplateError("the chat template drops part of the final message, so it cannot be continued")
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()      # the template trimmed the message's trailing space


def _checked_messages(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {sorted(ROLES)}, got {role!r}")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, (list, tuple))
                                  or not all(isinstance(c, Mapping) for c in calls)):
            raise ValueError(f"messages[{i}]['tool_calls'] must be a list of dicts on an assistant message")
        content = message.get("content")
        if role in RESULT_ROLES and isinstance(content, (Mapping, list)):
            pass                 # the template writes it (Llama 3.x: `tojson`), as transformers passes it
        elif not isinstance(content, str) and not (content is None and calls):
            raise ValueError(f"messages[{i}]['content'] must be a string"
                             f"{' (or null with tool_calls)' if role == 'assistant' else ''}, got {type(content).__name__}")
        # A fresh dict per message: the template can never touch the caller's objects.
        chat.append({key: value for key, value in message.items() if value is not None})
    return chat


def _make_environment() -> ImmutableSandboxedEnvironment:
    # Templates come with downloaded checkpoints, i.e. untrusted code; older jinja2 releases have
    # known sandbox escapes, which is why transformers refuses them too.
    if tuple(int(n) for n in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML, which would corrupt prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training
    masks and renders as its body; templates that use it must still compile here."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    """`dict` for templates without the class attributes a template could climb through."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` that refuses underscore names, which lead to CPython internals."""

    def __init__(*args, **kwargs):
        # jinja's own signature trick, so that `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r} on a namespace")


_ENV = _make_environment()
