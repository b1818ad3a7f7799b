"""Ollama's request side: its messages as the chat layer takes them, `num_ctx` and the
conversation cut to fit it, `format` as a grammar, and `options` as the launch layer's
request fields. The adapter (`ollama_api`) routes; this module only translates."""
from __future__ import annotations

import logging

from edge.api.runtime import ApiError
from edge.engine.constraint import ConstraintError, Grammar, closed
from edge.engine.conversation import fit_messages

log = logging.getLogger("edge.ollama")

# Ollama option -> RequestDefaults field
OPTION_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "seed": "seed", "num_predict": "max_tokens",
                 "stop": "stop"}
# Ollama options that tune its own runtime or samplers we do not have: accepted, no effect
NO_EFFECT_OPTIONS = {"num_keep", "typical_p", "repeat_last_n", "penalize_newline", "numa", "num_batch",
                     "num_gpu", "main_gpu", "low_vram", "use_mmap", "use_mlock", "num_thread", "mirostat",
                     "mirostat_tau", "mirostat_eta", "tfs_z", "vocab_only", "f16_kv", "logits_all"}


def chat_messages(messages: list) -> list[dict]:
    """Ollama's messages as the chat layer takes them (the chat template's messages): a call
    keeps its arguments as an object and gets an id, and a `tool` message answers the earliest
    unanswered call (of its `tool_name`, when it says)."""
    out, open_calls, n = [], [], 0
    for m in messages:
        msg = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ApiError(400, "messages: a tool call needs function.name")
                n += 1
                calls.append({"id": f"call_{n}", "type": "function",
                              "function": {"name": fn["name"], "arguments": fn.get("arguments") or {}}})
            msg["tool_calls"] = calls
            open_calls += [(c["id"], c["function"]["name"]) for c in calls]
        if m.role == "tool":
            match = next((c for c in open_calls if m.tool_name in (None, c[1])), None)
            if match is None:
                raise ApiError(400, "messages: a tool message answers no earlier tool call")
            open_calls.remove(match)
            msg["tool_call_id"] = match[0]
        out.append(msg)
    return out


def context_size(engine, options: dict | None) -> int:
    """The request's context: `num_ctx`, up to the server's `--ctx`."""
    n = (options or {}).get("num_ctx")
    if n is None:
        return engine.max_ctx
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ApiError(400, f"num_ctx must be a positive integer, got {n!r}")
    return min(n, engine.max_ctx)


REPLY_ROOM = 1 / 8       # of the context kept free for the reply when a conversation is cut to fit


def fitted_prompt(prompt, ctx: int, messages: list[dict]):
    """`prompt(messages)` (the chat layer's request); when it does not fit `ctx` with room for a
    reply, the oldest non-system messages go first (Ollama's rule) and the log says so."""
    chat = prompt(messages)
    room = max(1, int(ctx * REPLY_ROOM))
    if len(chat.ids) + room <= ctx:
        return chat
    fitted = {}

    def fits(msgs):
        try:
            fitted["chat"] = prompt(msgs)
        except ApiError:          # e.g. a template that needs a user message first
            return False
        return len(fitted["chat"].ids) + room <= ctx
    kept, dropped = fit_messages(messages, fits)
    if not dropped or "chat" not in fitted or not fits(kept):
        return chat               # nothing could go: the context check refuses it by name
    log.info("Ollama: the conversation (%d prompt tokens) does not fit num_ctx %d; dropped its %d oldest "
             "messages (%d prompt tokens now)", len(chat.ids), ctx, dropped, len(fitted["chat"].ids))
    return fitted["chat"]


def format_grammar(fmt) -> Grammar | None:
    """Ollama's `format` ("json" or a JSON schema, held to its properties) as a grammar."""
    if fmt in (None, ""):
        return None
    if fmt != "json" and not isinstance(fmt, dict):
        raise ApiError(400, f'format must be "json" or a JSON schema object, got {fmt!r}')
    try:
        return Grammar.json_object("format") if fmt == "json" else Grammar.json_schema(closed(fmt), "format")
    except ConstraintError as e:
        raise ApiError(400, f"format: {e}") from e


def check_format(engine, grammar: Grammar) -> None:
    try:
        engine.check_grammar(grammar)
    except ConstraintError as e:
        raise ApiError(400, f"format: {e}") from e


def overrides(options: dict | None) -> dict:
    """Ollama `options` -> RequestDefaults fields; unknown names are ignored (as Ollama does)
    with a log line."""
    options = options or {}
    unknown = sorted(set(options) - OPTION_FIELDS.keys() - NO_EFFECT_OPTIONS - {"num_ctx"})
    if unknown:
        log.info("Ollama: ignoring unknown option(s) %s", ", ".join(unknown))
    out = {OPTION_FIELDS[k]: v for k, v in options.items() if k in OPTION_FIELDS}
    if isinstance(out.get("max_tokens"), int) and out["max_tokens"] in (-1, -2):
        out["max_tokens"] = None          # Ollama: -1 = no limit, -2 = fill the context
    if out.get("max_tokens") == 0:
        raise ApiError(400, "num_predict must be at least 1 (or -1 for no limit)")
    return out
