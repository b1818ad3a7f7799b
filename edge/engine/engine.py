"""The engine: one loaded model, one KV cache, and the generation loop every interface uses.

Interfaces hand it token ids (or chat messages) and sampling settings and read back a stream
of `Event`s; they never see tensors. One sequence runs at a time (a lock); the cache of the
last sequence is kept so that a request sharing its prefix (same system prompt, next chat
turn) only prefills the new tokens.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pathlib import Path

from edge.model.backends import load_backend
from edge.model.bundle import Bundle
from edge.engine.chat_template import DEFAULT_CHATML, ChatTemplate
from edge.engine.constraint import Grammar, Grammars
from edge.engine.detokenizer import StreamDecoder, TokenBytes
from edge.model.kv_cache import ContextFull
from edge.engine.sampler import Sampler, SamplingParams
from edge.engine.stop_strings import StopMatcher

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
    finish_reason: str | None = None   # "stop" | "length" | "cancelled", on the last event only
    usage: Usage | None = None         # on the last event only
    logprobs: list[TokenLogprob] | None = None   # when asked for: the tokens behind this event's text


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

    def __post_init__(self):
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")


MAX_TOP_LOGPROBS = 20      # OpenAI's limit


class Engine:
    def __init__(self, bundle: Bundle, *, max_ctx: int, backend: str = "auto", threads: int | None = None,
                 weight_cache: Path | None = None):
        self.bundle = bundle
        self.config = cfg = bundle.config
        self.max_ctx = min(max_ctx, cfg.max_position_embeddings)
        self.tokenizer = bundle.tokenizer()
        m = bundle.manifest
        sp = m.get("special_tokens", {})
        self.template = ChatTemplate(m.get("chat_template") or DEFAULT_CHATML,
                                     bos_token=sp.get("bos_token", ""), eos_token=sp.get("eos_token", ""))
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self.model = load_backend(bundle, backend, self.max_ctx, threads, weight_cache)
        self.cache = self.model.new_cache()
        self._lock = threading.Lock()
        self._grammars: Grammars | None = None
        self._token_bytes: TokenBytes | None = None

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this model's tokenizer (built on first use)."""
        if self._grammars is None:
            text = (self.bundle.path / self.bundle.manifest["tokenizer"]).read_text()
            self._grammars = Grammars(text, self.config.vocab_size, self.eos_ids)
        return self._grammars

    def check_grammar(self, grammar: Grammar) -> None:
        """Raise ConstraintError (a ValueError) naming the problem if `grammar` cannot be compiled."""
        self.grammars.check(grammar)

    @property
    def name(self) -> str:
        return self.bundle.name

    # --- prompts -> ids ---------------------------------------------------------------
    def encode_chat(self, messages: list[dict], **extra) -> list[int]:
        """The checkpoint's own template; it writes BOS itself, so the tokenizer must not.
        `extra` reaches the template as variables (e.g. `tools`)."""
        text = self.template.render(messages, add_generation_prompt=True, **extra)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        bos = self.config.bos_token_id
        if self.bundle.manifest.get("add_bos") and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def count_context(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        with self._lock:
            self.cache.truncate(0)

    # --- generation -------------------------------------------------------------------
    def check_fits(self, prompt_ids: list[int]) -> None:
        """The one context rule: a prompt fits when at least one token can follow it.
        Raises ValueError for an empty prompt and ContextFull for one too long."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_ctx:
            raise ContextFull(len(prompt_ids), self.max_ctx)

    def generate(self, prompt_ids: list[int], params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        """Stream events for one request; `check_fits` runs before any work. Holding the lock
        for the whole stream keeps one sequence per engine."""
        self.check_fits(prompt_ids)
        with self._lock:
            yield from self._generate(list(prompt_ids), params, cancel)

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        cached = self.cache.common_prefix(ids)
        cached = min(cached, len(ids) - 1)      # the last prompt token must run to give logits
        self.cache.truncate(cached)
        return self.model.prefill(ids[cached:], self.cache), cached

    def _generate(self, ids, params, cancel) -> Iterator[Event]:
        t0 = time.perf_counter()
        sampler = Sampler(params.sampling)
        decoder = StreamDecoder(self.tokenizer, skip_special_tokens=not params.special_text)
        matcher = self.grammars.matcher(params.constraint) if params.constraint is not None else None
        scores: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        stops = StopMatcher(params.stop)
        usage = Usage(prompt_tokens=len(ids))
        logits, usage.cached_tokens = self._prefill(ids)
        history = list(ids)
        finish, stopped, t_first = "length", False, None
        limit = params.max_tokens or self.max_ctx
        while usage.completion_tokens < limit:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            allowed = logits if matcher is None else matcher.apply(logits)
            token = sampler.sample(allowed, history)
            usage.completion_tokens += 1
            if t_first is None:
                t_first = time.perf_counter()
                usage.time_to_first_token = t_first - t0
            if token in self.eos_ids:
                finish = "stop"
                break
            history.append(token)
            if scores is not None:
                scores.append(self.token_logprob(logits, token, params.logprobs))
            text, stopped = stops.feed(decoder.push(token))
            if text:
                yield Event(text=text, token_id=token, logprobs=_take(scores))
            if stopped:
                finish = "stop"
                break
            if matcher is not None:
                matcher.advance(token)
                if matcher.stopped:                  # the grammar is complete: nothing may follow
                    finish = "stop"
                    break
            if self.cache.length + 1 >= self.max_ctx:
                break                            # context full: "length", truthfully
            if usage.completion_tokens < limit:
                logits = self.model.forward([token], self.cache)
        tail = "" if stopped else stops.feed(decoder.flush())[0] + stops.flush()
        if t_first is not None:
            usage.decode_seconds = time.perf_counter() - t_first
        yield Event(text=tail, finish_reason=finish, usage=usage, logprobs=_take(scores))

    def token_logprob(self, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability under raw `logits` [V], with the `top` most likely tokens."""
        logits = np.asarray(logits, dtype=np.float64)
        peak = logits.max()
        log_total = peak + np.log(np.exp(logits - peak).sum())
        best = []
        if top:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = [self._scored(int(i), float(logits[i] - log_total)) for i in ids]
        return dataclasses.replace(self._scored(token, float(logits[token] - log_total)), top=best)

    def _scored(self, token: int, logprob: float) -> TokenLogprob:
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.tokenizer)
        return TokenLogprob(token, self.tokenizer.decode([token], skip_special_tokens=False), logprob,
                            self._token_bytes(token))


def _take(scores: list | None) -> list | None:
    """The scores gathered so far, handed over once (the list is emptied)."""
    if scores is None:
        return None
    taken = scores[:]
    scores.clear()
    return taken
