"""The OpenAI-compatible request bodies (pydantic) and response objects (plain dicts).

Requests are validated strictly (a string is not a number, 1.0 is not an integer) so that a
client's mistake gets a 400 naming the field instead of a silent coercion. Fields llama.cpp
users send (`top_k`, `min_p`, `repeat_penalty`) are accepted; unknown fields are ignored,
but features this server does not have (n > 1, logprobs, tools, JSON mode, echo, suffix)
are refused by name rather than quietly dropped.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 16


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
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

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (got {n}): this server generates one choice per request")
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
                      presence_penalty=self.presence_penalty, seed=self.seed)
        return fields


def _refuse(flag, message: str) -> None:
    if flag:
        raise ValueError(message)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _supported(self):
        _refuse(self.logprobs, "logprobs are not supported by this server")
        _refuse(self.tools, "tools (function calling) are not supported by this server")
        _refuse(self.response_format and self.response_format.get("type", "text") != "text",
                "response_format other than text (JSON mode) is not supported by this server")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self):
        _refuse(isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str)
                and len(self.prompt) != 1, "only one prompt per request is supported (no batching)")
        _refuse(self.echo, "echo is not supported by this server")
        _refuse(self.suffix, "suffix (fill-in-the-middle) is not supported by this server")
        _refuse(self.logprobs, "logprobs are not supported by this server")
        _refuse(self.best_of not in (None, 1), "only best_of=1 is supported")
        return self

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


def chat_choice(text: str, finish_reason: str) -> dict:
    return {"index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


def chat_delta(delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edge-llm"}
