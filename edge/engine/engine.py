"""The engine: one loaded model, a few sequence slots, and the generation loop every
interface uses.

Interfaces hand it token ids (or chat messages) and sampling settings and read back a stream
of `Event`s; they never see tensors. Each request runs in a **slot** (a KV cache from the
shared pool, kv_pool.py) that keeps its tokens after the request, so a later request sharing
their prefix only prefills the rest (slots.py: slot choice and the prompt cache on disk). Starting a request is all or nothing: everything that can
fail for it alone is built before it claims a slot, and a failure after gives the slot back.

`step(sequences)` advances every running sequence in one model pass: each decoding sequence
contributes one row, and prompts still being read contribute a chunk (at most PREFILL_CHUNK
rows a step, shared), so running streams keep producing tokens while a long prompt loads.
The weights are read once per step for all rows. A failure that belongs to one sequence
(its grammar, sampler, restored prefix) ends that one alone with an "error" event; the
others go on unchanged. `generate()` is the one-request form (terminal, tests); the
scheduler drives `start` and `step` for many at once.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np

from edge.engine.chat_encoding import ChatEncoder
from edge.engine.chat_template import DEFAULT_CHATML, ChatTemplate
from edge.engine.constraint import ConstraintError, Grammars
from edge.engine.detokenizer import StreamDecoder, TokenBytes, longest_token_bytes
from edge.engine.events import (MAX_TOP_LOGPROBS, Event, GenerationParams, RequestFailed,  # noqa: F401
                                 SequenceFailed, TokenLogprob, Usage)
from edge.engine.kv_pool import KVPool
from edge.engine.prompt_cache import PromptCache
from edge.engine.repetition import LoopGuard
from edge.engine.sampler import Sampler
from edge.engine.slots import PERSIST_MIN_TOKENS, Slot, Slots
from edge.engine.speculation import PromptLookup, Speculator, VerifyCost
from edge.engine.stop_strings import StopMatcher
from edge.model.backends import load_backend
from edge.model.bundle import Bundle
from edge.model.forward import PREFILL_CHUNK, chunk_rows, whole_chunk
from edge.model.kv_cache import ContextFull

KV_TYPES = {"f32": np.float32, "f16": np.float16}
SPEC_MAX_BATCH = 1          # draft only while at most this many sequences decode together (measured, README)
log = logging.getLogger("edge.engine")


class Sequence:
    """One request in flight: its slot, sampler, detokenizer, stop strings and usage.
    `pending` holds the tokens the model has still to read (the uncached prompt, then each
    sampled token). Everything that can fail for the request alone is built before it takes
    a slot (`occupy`)."""

    def __init__(self, engine: Engine, ids: list[int], params: GenerationParams,
                 cancel: threading.Event | None, twin: Sequence | None = None):
        self.engine, self.params, self.cancel = engine, params, cancel
        self.slot: Slot | None = None
        self.twin = twin if twin is not None and twin.history[:len(ids)] == list(ids) else None
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.decoder = StreamDecoder(engine.tokenizer, skip_special_tokens=not params.special_text)
        self.matcher = engine.grammars.matcher(params.constraint) if params.constraint is not None else None
        self.sampler = Sampler(params.sampling, self.matcher)     # the grammar's mask, penalties, bias, draw
        self.scores: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.stops = StopMatcher(params.stop)
        self.loops = LoopGuard() if params.stop_loops else None
        self.usage = Usage(prompt_tokens=len(ids))
        self.history = list(ids)
        self.limit = params.max_tokens or engine.max_ctx
        self.pending: list[int] = []
        self.done = False
        self.spec = Speculator(engine.new_drafter()) if params.speculate else None
        self.sampled: int | None = None      # the token the last `take` sampled (eos included)
        self.drafted_end = 0                 # rows up to here may hold a rejected draft's K/V

    def occupy(self, slot: Slot) -> None:
        """Run in `slot`, keeping the whole aligned chunks of its cache that the prompt starts
        with (the same answer as from an empty cache)."""
        self.slot, self.t0 = slot, time.perf_counter()
        cached = self.engine.model.reusable(self.history, slot.cache)
        slot.cache.truncate(cached)
        self.usage.cached_tokens = cached
        self.pending = self.history[cached:]

    @property
    def decoding(self) -> bool:
        return self.t_first is not None

    def fork(self) -> None:
        """Take the twin's prompt KV (another choice of the same request, n > 1) instead of
        reading the prompt again: its whole aligned chunks, so the rest (at most a chunk)
        runs as it would from an empty cache."""
        twin, self.twin = self.twin, None
        m = twin.engine.model.reusable(self.history[:self.usage.prompt_tokens], twin.slot.cache)
        if m <= self.usage.cached_tokens:
            return
        cache, src = self.slot.cache, twin.slot.cache
        cache.truncate(0)
        cache.k[:, :, :m] = src.k[:, :, :m]
        cache.v[:, :, :m] = src.v[:, :, :m]
        cache.append(self.history[:m])
        cache.canonical = m
        self.usage.cached_tokens = m
        self.pending = self.history[m:self.usage.prompt_tokens]

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def take(self, logits: np.ndarray) -> list[Event]:
        """The model's logits after the last pending token: sample (within the grammar, when
        there is one), and say what came out."""
        token = self.sampler.sample(logits, self.history)
        self.sampled = token
        u = self.usage
        u.completion_tokens += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()
            u.time_to_first_token = self.t_first - self.t0
        if token in self.engine.eos_ids:
            return self.finish("stop")
        self.history.append(token)
        if self.scores is not None:
            self.scores.append(self.engine.token_logprob(logits, token, self.params.logprobs))
        text, stopped = self.stops.feed(self.decoder.push(token))
        events = [Event(text=text, token_id=token, logprobs=self._take_scores())] if text else []
        if stopped:
            return events + self.finish("stop", flush=False)
        if self.matcher is not None:
            self.matcher.advance(token)
            if self.matcher.stopped:                  # the grammar is complete: nothing may follow
                return events + self.finish("stop")
        if (self.slot.cache.length + 1 >= self.engine.max_ctx or u.completion_tokens >= self.limit
                or (self.loops is not None and self.loops.feed(token))):
            return events + self.finish("length")       # context full, enough tokens, or a loop: "length"
        self.pending = [token]
        return events

    def finish(self, reason: str, flush: bool = True) -> list[Event]:
        tail = self.stops.feed(self.decoder.flush())[0] + self.stops.flush() if flush else ""
        if self.t_first is not None:
            self.usage.decode_seconds = time.perf_counter() - self.t_first
        self.done, self.pending = True, []
        self.engine.release(self)
        return [Event(text=tail, finish_reason=reason, usage=self.usage, logprobs=self._take_scores())]

    def fail(self, error: BaseException) -> list[Event]:
        """End this sequence alone after `error`; its slot is given back emptied (its K/V,
        e.g. a damaged restored prefix, are not to be reused)."""
        log.warning("a request failed and was ended alone: %s: %s", type(error).__name__, error)
        if self.t_first is not None:
            self.usage.decode_seconds = time.perf_counter() - self.t_first
        self.done, self.pending = True, []
        if self.slot is not None:
            self.engine.slot_pool.release(self.slot, self, self.drafted_end, forget=True)
        kind = RequestFailed if isinstance(error, ConstraintError) else SequenceFailed
        failure = error if isinstance(error, SequenceFailed) else kind(
            f"generation failed: {error or type(error).__name__}")
        failure.__cause__ = failure.__cause__ if failure is error else error
        return [Event(finish_reason="error", usage=self.usage, error=failure)]

    def _take_scores(self) -> list | None:
        """The scores gathered so far, handed over once."""
        if self.scores is None:
            return None
        taken, self.scores = self.scores, []
        return taken


class Engine:
    def __init__(self, bundle: Bundle, *, max_ctx: int, backend: str = "auto", threads: int | None = None,
                 weight_cache: Path | None = None, parallel: int = 1, kv_type: str = "f32",
                 prompt_cache: PromptCache | None = None, kv_pool_bytes: int | None = None):
        """`max_ctx`: tokens per sequence; `kv_pool_bytes`: the KV memory all slots share
        (None: room for every slot at `max_ctx` at once). A sequence never exceeds the pool."""
        self.bundle = bundle
        self.config = cfg = bundle.config
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.kv_pool = KVPool.sized(cfg, KV_TYPES[kv_type], parallel, max_ctx, kv_pool_bytes)
        self.max_ctx = min(max_ctx, cfg.max_position_embeddings, self.kv_pool.budget)
        self.tokenizer = bundle.tokenizer()
        m = bundle.manifest
        sp = m.get("special_tokens", {})
        self.template = ChatTemplate(m.get("chat_template") or DEFAULT_CHATML,
                                     bos_token=sp.get("bos_token", ""), eos_token=sp.get("eos_token", ""))
        self.chat = ChatEncoder(self.tokenizer, self.template)
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self.model = load_backend(bundle, backend, self.max_ctx, threads, weight_cache)
        self.slot_pool = Slots([self.model.new_cache(KV_TYPES[kv_type]) for _ in range(parallel)],
                               self.kv_pool, prompt_cache)
        self.slots = self.slot_pool.all
        self._step_lock = threading.Lock()
        self.last_step = time.monotonic()        # when a step last finished (liveness)
        self._longest: int | None = None     # 0: the tokenizer drops bytes, no bound from size
        self._grammars: Grammars | None = None
        self._token_bytes: TokenBytes | None = None
        self.prompt_cache = prompt_cache
        self.new_drafter = PromptLookup          # one drafter per speculating sequence (tests swap it)
        self.spec_max_batch = SPEC_MAX_BATCH
        self.verify_cost = VerifyCost()           # step time by row count, measured as we go

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this model's tokenizer (built on first use)."""
        if self._grammars is None:
            self._grammars = Grammars.of_bundle(self.bundle, self.eos_ids, self.tokenizer)
        return self._grammars

    def check_grammar(self, grammar: Grammar) -> None:
        """Raise ConstraintError (a ValueError) naming the problem if `grammar` cannot be compiled."""
        self.grammars.check(grammar)

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

    @property
    def parallel(self) -> int:
        return len(self.slots)

    @property
    def kv_cache_bytes(self) -> int:
        """The KV pool's budget in bytes (the most the slots' caches take together)."""
        return self.kv_pool.budget_bytes

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

    def reset(self) -> None:
        """Forget every idle slot's cached tokens."""
        self.slot_pool.reset()

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
            self._longest = longest_token_bytes(self.tokenizer)
        if self._longest:
            at_least = -(-nbytes // self._longest)
            if at_least >= self.max_ctx:
                raise ContextFull(at_least, self.max_ctx)

    def start(self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event | None = None,
              wait: bool = True, twin: Sequence | None = None) -> Sequence | None:
        """A sequence in the best free slot (`check_fits` first). Without `wait`, None when
        every slot is busy. A `twin` (another choice of the same prompt, already started)
        lends its prompt's KV once it has read it, so the prompt is read once for all choices.
        All or nothing: the sequence (stop strings, sampler, grammar) is built before a slot
        is claimed, and a failure after the claim gives the slot back before it is raised."""
        self.check_fits(prompt_ids)
        seq = Sequence(self, list(prompt_ids), params, cancel, twin)
        slot = self.slot_pool.claim(prompt_ids, seq, wait)
        if slot is None:
            return None
        try:
            self.slot_pool.restore_prefix(slot, prompt_ids)
            seq.occupy(slot)
        except BaseException:
            self.slot_pool.release(slot, seq, forget=True)
            raise
        return seq

    def release_buffers(self) -> None:
        """Between requests: the model's buffers for prompt chunks go (made again by the next
        prompt in about a millisecond; docs/MODELS.md, "Where the runtime's memory goes")."""
        with self._step_lock:
            self.model.release_buffers()

    def free_slots(self) -> int:
        return self.slot_pool.free()

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            long_prompt = seq.usage.prompt_tokens - seq.usage.cached_tokens >= PERSIST_MIN_TOKENS
            self.slot_pool.release(seq.slot, seq, seq.drafted_end, persist=long_prompt and seq.decoding)
        seq.drafted_end = 0
        seq.done = True

    def persist(self) -> None:
        """Store every idle slot's tokens and wait until everything is on disk (at shutdown)."""
        self.slot_pool.persist_idle()

    def wait_for_writes(self) -> None:
        """Block until the prompt-cache writes queued so far are done."""
        self.slot_pool.wait_for_writes()

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[Event]]]:
        """One model pass for the running sequences: a row for each decoding one, chunks of
        prompt for the others (one aligned chunk a step, oldest request first). Returns the
        events of each sequence that moved; finished ones have released their slots.

        A failure of one sequence's own work (its grammar, sampler, stop strings, restored
        prefix) ends that sequence alone, with an "error" event; the others' results are
        those of the same step without it. Only a failure of the shared pass raises, and then
        every cache is as it was before the step."""
        out: list[tuple[Sequence, list[Event]]] = []
        batch: list[tuple[Sequence, int]] = []
        budget = PREFILL_CHUNK
        for seq in seqs:
            try:
                if seq.twin is not None and not seq.twin.done and not seq.twin.decoding:
                    continue                                # its twin is still reading the prompt
                if seq.twin is not None:
                    seq.fork()
                if seq.done:
                    continue
                if seq.cancelled:
                    out.append((seq, seq.finish("cancelled")))
                elif seq.decoding:
                    batch.append((seq, 1))
                elif budget > 0:
                    # one whole aligned chunk (as `prefill` would run it), or none this step
                    n = chunk_rows(seq.slot.cache.length, len(seq.pending))
                    batch.append((seq, n))
                    budget -= PREFILL_CHUNK
            except Exception as e:
                out.append((seq, seq.fail(e)))
        batch, drafts, stalled = self.slot_pool.fit_step(batch, self._drafts(batch))
        if stalled and not batch and not out:       # each waits for memory another holds: one ends
            log.warning("KV pool full: a reply ends at %d tokens so the others can go on", stalled[-1].slot.cache.length)
            out.append((stalled[-1], stalled[-1].finish("length")))
        if not batch:
            self.last_step = time.monotonic()
            return out
        verifying = any(drafts)
        if verifying:
            batch = [(seq, n + len(d)) for (seq, n), d in zip(batch, drafts)]
            for (seq, _), d in zip(batch, drafts):
                seq.pending = seq.pending + d
        whole = [whole_chunk(seq.slot.cache, n) for seq, n in batch]
        t0 = time.perf_counter()
        logits = self._forward(batch, drafts if verifying else None)
        if len(batch) == 1 and batch[0][0].decoding:
            self.verify_cost.observe(batch[0][1], time.perf_counter() - t0)
        for (seq, n), lg, d, w in zip(batch, logits, drafts if verifying else [None] * len(batch), whole):
            try:
                if isinstance(lg, BaseException):
                    raise lg
                if w:
                    seq.slot.cache.canonical = seq.slot.cache.length
                if d:
                    out.append((seq, self._verify(seq, lg, d)))
                elif n < len(seq.pending):
                    seq.pending = seq.pending[n:]           # more prompt to read: no token yet
                    out.append((seq, []))
                else:
                    if seq.spec is not None and seq.decoding:
                        seq.spec.update(0, 0)               # a step without a draft
                    out.append((seq, seq.take(lg[-1] if verifying else lg)))
            except Exception as e:
                out.append((seq, seq.fail(e)))
        self.last_step = time.monotonic()
        return out

    def _forward(self, batch: list[tuple[Sequence, int]], drafts: list[list[int]] | None) -> list:
        """The model pass for `batch`: each sequence's logits. When the batched pass fails,
        each sequence runs alone, so that one whose own rows fail (its cache) gets its error
        in place of logits and the others their logits; if every one fails alone the pass
        itself is broken and the error is raised, with every cache as before."""
        items = [(seq.pending[:n], seq.slot.cache) for seq, n in batch]
        kept = [(c.length, c.canonical) for _, c in items]

        def run(part, flags):
            with self._step_lock:
                if drafts is None:
                    return self.model.forward_batch(part)
                return self.model.forward_batch(part, all_logits=True, stepwise=flags)

        def undo(cache, was):
            cache.truncate(was[0])
            cache.canonical = was[1]
        flags = [bool(d) for d in drafts] if drafts is not None else None
        try:
            return run(items, flags)
        except Exception as e:
            for (_, cache), was in zip(items, kept):
                undo(cache, was)
            if len(items) == 1:
                raise
            shared = e
        logits = []
        for i, item in enumerate(items):
            try:
                logits.append(run([item], None if flags is None else [flags[i]])[0])
            except Exception as e:
                undo(item[1], kept[i])
                logits.append(e)
        if all(isinstance(lg, BaseException) for lg in logits):
            for (_, cache), was in zip(items, kept):
                undo(cache, was)
            raise shared
        return logits

    def _drafts(self, batch: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Each decoding sequence's draft for this step ([] for none): only when every row of
        the step is a decode row and at most `spec_max_batch` sequences share it (a prompt
        chunk or a busy batch already fills the pass). A drafter that fails is dropped: the
        sequence goes on undrafted (drafts never change the output)."""
        if len(batch) > self.spec_max_batch or any(not seq.decoding or n != 1 for seq, n in batch):
            return []
        drafts = []
        for seq, _ in batch:
            length = seq.slot.cache.length + 1            # once the pending token is read
            room = min(self.max_ctx - length - 1, seq.limit - seq.usage.completion_tokens - 1)
            try:
                drafts.append(seq.spec.draft(seq.history, room, self.verify_cost)
                              if seq.spec is not None and room > 0 else [])
            except Exception as e:
                log.warning("drafting failed; the request goes on without drafts: %s", e)
                seq.spec = None
                drafts.append([])
        return drafts

    def _verify(self, seq: Sequence, rows: np.ndarray, draft: list[int]) -> list[Event]:
        """Rows [k+1, V] for [pending token] + draft: take row i's token as a plain step would,
        go on while it equals draft[i]; the cache keeps the rows of what was taken."""
        cache = seq.slot.cache
        start = cache.length - len(rows)
        seq.drafted_end = cache.length
        cache.truncate(start + 1)                     # draft rows are recorded as they are accepted
        events: list[Event] = []
        for i, lg in enumerate(rows):
            if i:
                cache.append([draft[i - 1]])
            events += seq.take(lg)
            if seq.done or i == len(draft) or seq.sampled != draft[i]:
                break
        seq.spec.update(len(draft), i)
        if not seq.done:
            cache.erase(cache.length, seq.drafted_end)
            seq.drafted_end = 0
        return events

    def generate(self, prompt_ids: list[int], params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        """Stream events for one request; `check_fits` runs before any work."""
        seq = self.start(prompt_ids, params, cancel)
        try:
            while not seq.done:
                for _, events in self.step([seq]):
                    for ev in events:
                        if ev.error is not None:
                            raise ev.error
                        yield ev
        finally:
            self.release(seq)      # a reader that stopped early frees the slot
