"""The OpenAI-compatible request bodies (pydantic) and response objects (plain dicts).

Requests are validated strictly (a string is not a number, 1.0 is not an integer) so that a
client's mistake gets a 400 naming the field instead of a silent coercion. Fields llama.cpp
users send (`top_k`, `min_p`, `repeat_penalty`) are accepted; unknown fields are ignored,
but features this server does not have (echo, suffix, several prompts) are refused by name
rather than quietly dropped. Tools, `response_format`, logprobs and n > 1 are served (n
sequentially); their checks beyond the wire shape live in the chat layer and the engine.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from edge.api.text import UnicodeBody
from edge.engine import ContextFull, QueueFull, RequestFailed, SequenceFailed

# the engine's refusals in OpenAI's terms: status, error type, code
ERRORS = {ContextFull: (400, "invalid_request_error", "context_length_exceeded"),
          QueueFull: (429, "rate_limit_error", "queue_full"),
          RequestFailed: (400, "invalid_request_error", "generation_failed"),     # e.g. its grammar's limits
          SequenceFailed: (500, "server_error", "generation_failed")}

MAX_STOP_STRINGS = 16
MAX_CHOICES = 8          # n: choices are generated one after the other


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]   # developer: newer clients' system
    content: str | list[TextPart] | dict | None = None        # a dict: a tool result as a JSON object
    tool_calls: list[dict] | None = None       # assistant: the calls it made (checked by the chat layer)
    tool_call_id: str | None = None            # tool: the call this result answers
    name: str | None = None

    def as_dict(self) -> dict:
        """The message for the chat layer: text content, and the tool fields that are set."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
            message["content"] = self.text() if self.content is not None else None
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class GenerationRequest(UnicodeBody):
    """What /v1/chat/completions and /v1/completions share: sampling and streaming."""
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-1, description="-1 means random, as in llama.cpp")
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # llama.cpp's extras
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, validation_alias=AliasChoices(
        "repeat_penalty", "repetition_penalty"))
    logit_bias: dict[str, float] | None = None      # token id (as a string) -> bias in [-100, 100]
    # edge-llm's: end a reply caught in an exact loop as "length" (engine/repetition.py); the chat page sends it
    stop_loops: bool | None = None

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int) -> int:
        if not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be between 1 and {MAX_CHOICES} (got {n}): choices are generated one after "
                             "the other")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_overrides(self) -> dict:
        """The sampler fields of this request (None means: the server's default; seed -1
        means a random seed whatever the server's default)."""
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      repetition_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
                      presence_penalty=self.presence_penalty, seed=self.seed, logit_bias=self.logit_bias,
                      stop_loops=self.stop_loops)
        return fields


def _refuse(flag, message: str) -> None:
    if flag:
        raise ValueError(message)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    tool_loop_guard: bool | None = None        # ours: False lets a call answered in this turn be made again

    @model_validator(mode="after")
    def _supported(self):
        _refuse(self.functions or self.function_call, "functions/function_call (the old function calling) are not "
                "supported by this server; send tools and tool_choice")
        return self

    @property
    def logprobs_top(self) -> int | None:
        """The engine's `logprobs` setting: None (off) or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self):
        _refuse(isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str)
                and len(self.prompt) != 1, "only one prompt per request is supported (no batching)")
        _refuse(self.echo, "echo is not supported by this server")
        _refuse(self.suffix, "suffix (fill-in-the-middle) is not supported by this server")
        _refuse(self.best_of not in (None, 1), "only best_of=1 is supported")
        return self

    @property
    def logprobs_top(self) -> int | None:
        return self.logprobs

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# --- responses -------------------------------------------------------------------------

def usage_dict(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def envelope(id_: str, obj: str, model: str, choices: list, created: int | None = None, **extra) -> dict:
    return {"id": id_, "object": obj, "created": created or int(time.time()), "model": model,
            "choices": choices, **extra}


def chat_choice(text: str | None, finish_reason: str, index: int = 0, tool_calls: list | None = None,
                logprobs: dict | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(delta: dict, finish_reason: str | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def text_choice(text: str, finish_reason: str | None, index: int = 0, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_logprobs(entries) -> dict:
    """Chat's `logprobs` object from the engine's TokenLogprob entries."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                                          for t in e.top]} for e in entries],
            "refusal": None}


def text_logprobs(entries, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object; `offset` is the text length before these tokens."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries], "text_offset": offsets}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edge-llm"}
