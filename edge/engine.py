"""The engine: one loaded model, one KV cache, and the generation loop every interface uses.

Interfaces hand it token ids (or chat messages) and sampling settings and read back a stream
of `Event`s; they never see tensors. One sequence runs at a time (a lock); the cache of the
last sequence is kept so that a request sharing its prefix (same system prompt, next chat
turn) only prefills the new tokens.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edge.bundle import Bundle
from edge.chat_template import DEFAULT_CHATML, ChatTemplate
from edge.detokenizer import StreamDecoder
from edge.kv_cache import ContextFull
from edge.sampler import Sampler, SamplingParams
from edge.stop_strings import StopMatcher

PREFILL_CHUNK = 64


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
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


class Engine:
    def __init__(self, bundle: Bundle, backend: str = "auto", max_ctx: int | None = None,
                 threads: int | None = None):
        self.bundle = bundle
        self.config = cfg = bundle.config
        self.max_ctx = min(max_ctx or 4096, cfg.max_position_embeddings)
        self.tokenizer = bundle.tokenizer()
        m = bundle.manifest
        sp = m.get("special_tokens", {})
        self.template = ChatTemplate(m.get("chat_template") or DEFAULT_CHATML,
                                     bos_token=sp.get("bos_token", ""), eos_token=sp.get("eos_token", ""))
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self.model = load_backend(bundle, backend, self.max_ctx, threads)
        self.cache = self.model.new_cache()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.bundle.name

    # --- prompts -> ids ---------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The checkpoint's own template; it writes BOS itself, so the tokenizer must not."""
        text = self.template.render(messages, add_generation_prompt=True)
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
    def generate(self, prompt_ids: list[int], params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        """Stream events for one request; raises ContextFull before any work if the prompt
        cannot fit. Holding the lock for the whole stream keeps one sequence per engine."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_ctx:
            raise ContextFull(f"the prompt has {len(prompt_ids)} tokens but the context holds "
                              f"{self.max_ctx}; shorten it")
        with self._lock:
            yield from self._generate(list(prompt_ids), params, cancel)

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        cached = self.cache.common_prefix(ids)
        cached = min(cached, len(ids) - 1)      # the last prompt token must run to give logits
        self.cache.truncate(cached)
        logits = None
        for i in range(cached, len(ids), PREFILL_CHUNK):
            logits = self.model.forward(ids[i:i + PREFILL_CHUNK], self.cache)
        return logits, cached

    def _generate(self, ids, params, cancel) -> Iterator[Event]:
        t0 = time.perf_counter()
        sampler = Sampler(params.sampling)
        decoder = StreamDecoder(self.tokenizer)
        stops = StopMatcher(params.stop)
        usage = Usage(prompt_tokens=len(ids))
        logits, usage.cached_tokens = self._prefill(ids)
        history = list(ids)
        finish, stopped, t_first = "length", False, None
        while usage.completion_tokens < params.max_tokens:
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
            if usage.completion_tokens < params.max_tokens:
                logits = self.model.forward([token], self.cache)
        tail = "" if stopped else stops.feed(decoder.flush())[0] + stops.flush()
        if t_first is not None:
            usage.decode_seconds = time.perf_counter() - t_first
        yield Event(text=tail, finish_reason=finish, usage=usage)


BACKENDS = ("auto", "litert", "numpy")


def load_backend(bundle: Bundle, backend: str, max_ctx: int, threads: int | None):
    """litert runs the bundle's graph; numpy is the float reference (f32/f16 bundles only)."""
    if backend == "auto":
        backend = "litert" if bundle.has_graph else "numpy"
    if backend == "litert":
        from edge.model_litert import LiteRTModel, default_threads
        from edge.models import home
        # one cache directory per graph: the runner keeps a single cache file per directory
        cache = home() / "xnnpack-cache" / bundle.manifest["files"]["model.tflite"]["sha256"][:16]
        return LiteRTModel(bundle, max_ctx, threads or default_threads(), weight_cache=cache)
    if backend == "numpy":
        if not bundle.has_float_weights:
            raise ValueError(f"{bundle.path}: a {bundle.quant} bundle has no float weights for the numpy "
                             "backend; convert with --quant f32 or f16 for a reference bundle")
        from edge.model_numpy import NumpyModel
        return NumpyModel(bundle.config, bundle.tensor, max_ctx)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
