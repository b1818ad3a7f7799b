"""The engine: one loaded model, one KV cache, and the generation loop every interface uses.

Interfaces hand it token ids (or chat messages) and sampling settings and read back a stream
of `Event`s; they never see tensors. One sequence runs at a time (a lock); the cache of the
last sequence is kept so that a request sharing its prefix (same system prompt, next chat
turn) only prefills the new tokens.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pathlib import Path

from edge.model.backends import load_backend
from edge.model.bundle import Bundle
from edge.engine.chat_encoding import ChatEncoder
from edge.engine.chat_template import DEFAULT_CHATML, ChatTemplate
from edge.engine.detokenizer import StreamDecoder
from edge.model.kv_cache import ContextFull
from edge.engine.sampler import Sampler, SamplingParams
from edge.engine.stop_strings import StopMatcher

class _PrefillCancelled(Exception):
    """Raised between prefill chunks when the request was cancelled (client gone, shutdown)."""


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


@dataclass
class GenerationParams:
    """One request's settings. Interfaces build it with `edge.launch.request`, which holds the
    defaults; the field defaults here only mean "off" (no stop strings, neutral sampling)."""
    max_tokens: int | None = None      # None: until the context is full
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


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
        self.chat = ChatEncoder(self.tokenizer, self.template)
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self.model = load_backend(bundle, backend, self.max_ctx, threads, weight_cache)
        self.cache = self.model.new_cache()
        self._lock = threading.Lock()
        self._longest: int | None = None     # 0: the tokenizer drops bytes, no bound from size

    @property
    def name(self) -> str:
        return self.bundle.name

    # --- prompts -> ids ---------------------------------------------------------------
    def encode_chat(self, messages: list[dict], *, continue_final_message: bool | None = None,
                    **template_vars) -> list[int]:
        """The checkpoint's own template; it writes BOS itself, so the tokenizer must not.
        Text from the messages (and `template_vars`, e.g. tools=[...]) is tokenized as plain text:
        only the template's markup becomes special tokens (see chat_encoding). A conversation
        ending with an assistant message is continued, not closed (llama.cpp's default, transformers'
        continue_final_message), unless continue_final_message=False."""
        if continue_final_message is None:
            last = messages[-1] if isinstance(messages, (list, tuple)) and messages else None
            continue_final_message = (isinstance(last, Mapping) and last.get("role") == "assistant"
                                      and isinstance(last.get("content"), str))
        return self.chat.encode(messages, add_generation_prompt=not continue_final_message,
                                continue_final_message=continue_final_message, **template_vars)

    def encode_text(self, prompt: str) -> list[int]:
        """A raw prompt: special-token text in it *is* parsed (the caller writes its own template)."""
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
    def check_fits(self, prompt_ids: list[int], reserve: int = 1) -> None:
        """The one context rule: a prompt fits when at least one token (or `reserve` tokens,
        for a caller that wants room for a reply) can follow it.
        Raises ValueError for an empty prompt and ContextFull for one too long."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + max(1, reserve) > self.max_ctx:
            raise ContextFull(len(prompt_ids), self.max_ctx)

    def check_fits_bytes(self, nbytes: int) -> None:
        """`check_fits` before tokenizing: with a tokenizer that keeps every byte, a text of
        `nbytes` UTF-8 bytes has at least ceil(nbytes / longest token) tokens; ContextFull
        when even that many do not fit."""
        if nbytes < self.max_ctx:
            return                   # fewer bytes than the context: cannot be too long by size
        if self._longest is None:
            self._longest = _longest_token_bytes(self.tokenizer)
        if self._longest:
            at_least = -(-nbytes // self._longest)
            if at_least >= self.max_ctx:
                raise ContextFull(at_least, self.max_ctx)

    def generate(self, prompt_ids: list[int], params: GenerationParams,
                 cancel: threading.Event | None = None, progress=None) -> Iterator[Event]:
        """Stream events for one request; `check_fits` runs before any work. Holding the lock
        for the whole stream keeps one sequence per engine. `progress(done, total)` is called
        after each prefill chunk."""
        self.check_fits(prompt_ids)
        with self._lock:
            yield from self._generate(list(prompt_ids), params, cancel, progress)

    def _prefill(self, ids: list[int], progress=None) -> tuple[np.ndarray, int]:
        cached = self.model.reusable(ids, self.cache)
        self.cache.truncate(cached)
        return self.model.prefill(ids[cached:], self.cache, progress=progress), cached

    def _generate(self, ids, params, cancel, progress=None) -> Iterator[Event]:
        t0 = time.perf_counter()
        sampler = Sampler(params.sampling)
        decoder = StreamDecoder(self.tokenizer)
        stops = StopMatcher(params.stop)
        usage = Usage(prompt_tokens=len(ids))
        def on_chunk(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if cancel is not None and cancel.is_set() and done < total:
                raise _PrefillCancelled    # the rows computed so far stay valid in the cache
        try:
            logits, usage.cached_tokens = self._prefill(ids, on_chunk)
        except _PrefillCancelled:
            yield Event(finish_reason="cancelled", usage=usage)
            return
        history = list(ids)
        finish, stopped, t_first = "length", False, None
        limit = params.max_tokens or self.max_ctx
        while usage.completion_tokens < limit:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            token = sampler.sample(logits, history)
            usage.completion_tokens += 1
            if t_first is None:
                t_first = time.perf_counter()
                usage.time_to_first_token = t_first - t0
            if token in self.eos_ids:
                finish = "stop"
                break
            history.append(token)
            text, stopped = stops.feed(decoder.push(token))
            if text:
                yield Event(text=text, token_id=token)
            if stopped:
                finish = "stop"
                break
            if self.cache.length + 1 >= self.max_ctx:
                break                            # context full: "length", truthfully
            if usage.completion_tokens < limit:
                logits = self.model.forward([token], self.cache)
        tail = "" if stopped else stops.feed(decoder.flush())[0] + stops.flush()
        if t_first is not None:
            usage.decode_seconds = time.perf_counter() - t_first
        yield Event(text=tail, finish_reason=finish, usage=usage)


_PROBE = "a  b\t\n\n c  \u00e9 e\u0301 \u1100\u1161 ~"


def _longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token stands for: every id decoded alone (a byte-level piece of
    a character decodes to U+FFFD, 3 bytes: still an upper bound), added tokens included; ~0.2 s
    for 49k ids, computed once, on the first prompt at least max_ctx bytes long. 0 when the
    tokenizer does not keep every byte (a normalizer, or whitespace dropped: the probe does not
    survive a round trip), so a text's size says nothing about its token count."""
    if tokenizer.normalizer is not None or \
            tokenizer.decode(tokenizer.encode(_PROBE, add_special_tokens=False).ids) != _PROBE:
        return 0
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    pieces = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    return max(len(p.encode()) for p in pieces)
