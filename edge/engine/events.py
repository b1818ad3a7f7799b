"""What a request asks of the engine and what it gets back: `GenerationParams` in, a stream of
`Event`s out (text, the finish reason and `Usage` on the last one, logprobs when asked), and
`SequenceFailed` when the request failed on its own."""
from __future__ import annotations

from dataclasses import dataclass, field

from edge.engine.constraint import Grammar
from edge.engine.sampler import SamplingParams


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0          # prompt tokens whose K/V were reused from the last request
    completion_tokens: int = 0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.completion_tokens - 1   # the first token comes out of prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class Event:
    text: str = ""                  # new text, never a partial UTF-8 character
    token_id: int | None = None
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error", on the last event only
    usage: Usage | None = None         # on the last event only
    logprobs: list[TokenLogprob] | None = None   # when asked for: the tokens behind this event's text
    error: SequenceFailed | None = None          # with finish_reason "error": what ended this request


class SequenceFailed(RuntimeError):
    """One request's generation failed on its own (its restored prefix, its sampler, its
    grammar) and was ended; the other sequences went on. Readers of its events get it raised.
    The server's fault unless it is a `RequestFailed`."""


class RequestFailed(SequenceFailed):
    """A `SequenceFailed` the request's own input caused (its grammar failed mid-answer, e.g.
    a schema exceeding the grammar engine's limits): a client error for the interfaces."""


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (log-softmax of its raw logits,
    before penalties, temperature or a grammar's mask), and the `top` most likely alternatives."""
    token_id: int
    token: str
    logprob: float
    bytes: bytes = b""                 # exact, even for part of a UTF-8 character (`token` then has U+FFFD)
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class GenerationParams:
    """One request's settings. Interfaces build it with `edge.launch.request`, which holds the
    defaults; the field defaults here only mean "off" (no stop strings, neutral sampling)."""
    max_tokens: int | None = None      # None: until the context is full
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    constraint: Grammar | None = None  # the output must match this grammar (a per-token logits mask)
    logprobs: int | None = None        # None: off; k >= 0: each token's logprob and its k top alternatives
    special_text: bool = False         # special tokens (other than eos) appear in the text, e.g. <|python_tag|>
    speculate: bool = False            # draft tokens by prompt lookup and verify them in one pass (speculation.py)
    stop_loops: bool = False           # end a reply stuck in an exact loop, as "length" (repetition.py)

    def __post_init__(self):
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


MAX_TOP_LOGPROBS = 20      # OpenAI's limit
