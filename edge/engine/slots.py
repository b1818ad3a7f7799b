"""The engine's sequence slots: which slot a request takes, giving it back, and the prompt
cache on disk behind them.

Each slot is a KV cache of its own that keeps its tokens after a request, so a later request
sharing their prefix only reads the rest. A new request takes the idle slot with the longest
common prefix, then the least recently used. Before it runs, the stored prefix (prompt cache)
sharing most with its prompt is loaded when that beats what the slot holds; a long prompt read
fresh is stored once its request has decoded, by a writer thread of its own, so running
streams never wait on the disk.

The slots' KV memory comes from one pool (kv_pool.py): a request takes a slot only when the
pool can grant its prompt, evicting idle slots' prefixes if it must; otherwise it waits as
when every slot is busy.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from edge.engine.kv_pool import KVPool
from edge.engine.prompt_cache import PromptCache, snapshot
from edge.model.forward import PREFILL_CHUNK
from edge.model.kv_cache import KVCache, common_prefix

PERSIST_MIN_TOKENS = 256    # a prompt this long, read fresh, is worth keeping on disk
log = logging.getLogger("edge.engine")


@dataclass
class Slot:
    cache: KVCache
    busy: bool = False
    last_used: float = 0.0
    owner: object = None        # the sequence holding it: only its owner gives it back


class Slots:
    """The slots of one engine (`all`, a list) and the prompt cache they share."""

    def __init__(self, caches: list[KVCache], pool: KVPool, prompt_cache: PromptCache | None = None):
        self.pool = pool
        self.all = [Slot(pool.adopt(c)) for c in caches]
        self._free = threading.Condition()
        self.prompt_cache = prompt_cache
        self._stored = prompt_cache.entries() if prompt_cache else []    # what is on disk, newest first
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []

    # --- taking and giving back ---------------------------------------------------------
    def claim(self, ids: list[int], owner: object, wait: bool = True) -> Slot | None:
        """The best free slot for a prompt, now `owner`'s, with KV memory granted for the
        prompt and one more token; without `wait`, None when every slot is busy or running
        sequences hold the memory it needs."""
        with self._free:
            while (slot := self._pick(ids)) is None or not self._grant(slot, ids):
                if not wait:
                    return None
                self._free.wait()
            slot.busy, slot.owner = True, owner
        return slot

    def _grant(self, slot: Slot, ids: list[int]) -> bool:
        """Memory for a prompt and one more token in a free slot, evicting idle slots when
        short. A slot holding more than that keeps only what the prompt can reuse."""
        cache, tokens = slot.cache, len(ids) + 1
        if cache.committed > self.pool.rows(tokens):
            cache.truncate(cache.common_prefix(ids))
            self.pool.shrink(cache, tokens)
            return True
        return self.pool.reserve(cache, tokens, self._idle(slot))

    def _idle(self, but: Slot) -> list[KVCache]:
        """Idle slots' caches, least recently used first (what may be evicted)."""
        return [s.cache for s in sorted(self.all, key=lambda s: s.last_used) if not s.busy and s is not but]

    def grow(self, slot: Slot, tokens: int) -> bool:
        """Memory for `tokens` in a running slot, evicting idle slots when short; False when
        running sequences hold what it needs."""
        with self._free:
            return self.pool.reserve(slot.cache, tokens, self._idle(slot))

    def _pick(self, ids: list[int]) -> Slot | None:
        free = [s for s in self.all if not s.busy]
        if not free:
            return None
        return max(free, key=lambda s: (s.cache.common_prefix(ids), -s.last_used))

    def fit_step(self, batch: list, drafts: list[list[int]]) -> tuple[list, list[list[int]], list]:
        """Memory for one engine step: `batch` is (sequence, rows) pairs, `drafts` each one's
        draft (or [] for no drafting). A draft that does not fit is dropped; a sequence whose
        rows do not fit sits the step out (returned as stalled) until another gives room."""
        kept, kept_drafts, stalled = [], [], []
        for (seq, n), d in zip(batch, drafts or [[]] * len(batch)):
            length = seq.slot.cache.length
            if d and not self.grow(seq.slot, length + n + len(d)):
                d = []
            if d or self.grow(seq.slot, length + n):
                kept.append((seq, n))
                kept_drafts.append(d)
            else:
                stalled.append(seq)
        return kept, (kept_drafts if drafts else []), stalled

    def release(self, slot: Slot, owner: object, erase_to: int = 0, persist: bool = False,
                forget: bool = False) -> None:
        """`owner` gives its slot back (a no-op when it no longer holds it). Rows past the
        cache's length up to `erase_to` (a rejected draft's) are erased first; `persist` stores
        its prompt on disk; `forget` drops everything it holds (after a failure its K/V are
        not to be trusted)."""
        with self._free:
            if not slot.busy or slot.owner is not owner:
                return
            cache = slot.cache
            if forget:
                cache.truncate(0)
            if erase_to > cache.length:
                cache.erase(cache.length, erase_to)
            if persist and not forget:
                self._persist(slot)
            self.pool.shrink(cache, cache.length)          # keep its tokens, give back the rest
            slot.busy, slot.owner, slot.last_used = False, None, time.monotonic()
            self._free.notify_all()         # a waiter may need this slot, or only the memory

    def free(self) -> int:
        with self._free:
            return sum(not s.busy for s in self.all)

    def reset(self) -> None:
        """Forget every idle slot's cached tokens and give their memory back."""
        with self._free:
            for slot in self.all:
                if not slot.busy:
                    slot.cache.truncate(0)
                    self.pool.shrink(slot.cache, 0)
            self._free.notify_all()

    # --- the prompt cache on disk ---------------------------------------------------------
    def restore_prefix(self, slot: Slot, ids: list[int]) -> None:
        """Load the stored prefix that shares most with `ids`, when it beats the slot's own.
        An entry that fails its checks is removed (by the prompt cache) and forgotten here."""
        if not self._stored:
            return
        have = slot.cache.common_prefix(ids)
        best = max(self._stored, key=lambda e: common_prefix(e.tokens, ids))
        if common_prefix(best.tokens, ids) < have + PREFILL_CHUNK:
            return
        try:
            self.prompt_cache.restore(best, slot.cache, limit=len(ids))
        except (OSError, ValueError) as e:
            log.warning("prompt cache: not restored (%s); the prompt is read instead", e)
            if best in self._stored:
                self._stored.remove(best)
            slot.cache.truncate(0)

    def _persist(self, slot: Slot) -> None:
        """Store a slot's whole aligned prompt chunks, if a cache is set: restored, they give
        what reading the prompt again would. The K/V are copied here and written by a thread
        of their own."""
        if not self.prompt_cache or slot.cache.canonical == 0:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="edge-llm-prompt-cache")
        self._writes = [f for f in self._writes if not f.done()]
        self._writes.append(self._writer.submit(self._write, snapshot(slot.cache, slot.cache.canonical)))

    def _write(self, taken) -> None:
        try:
            path = self.prompt_cache.write(*taken)
        except OSError as e:
            log.warning("prompt cache: not saved: %s", e)
            return
        if path is not None:
            self._stored = self.prompt_cache.entries()

    def persist_idle(self) -> None:
        """Store every idle slot's tokens and wait until everything is on disk (at shutdown)."""
        with self._free:
            for slot in self.all:
                if not slot.busy and slot.cache.canonical >= PERSIST_MIN_TOKENS:
                    self._persist(slot)
        self.wait_for_writes()

    def wait_for_writes(self) -> None:
        """Block until the prompt-cache writes queued so far are done."""
        while self._writes:
            self._writes.pop(0).result()
