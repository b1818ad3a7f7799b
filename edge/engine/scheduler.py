"""One queue in front of the engine, shared by every interface (HTTP, serial, ...).

A single worker thread runs the engine: it moves waiting jobs into free slots and calls
`Engine.step` for all running ones, so up to `engine.parallel` requests generate together
(one model pass per step for all of them) while the rest wait in a bounded FIFO. Each
submitted `Job` streams its events back through its own queue; cancelling a job (client gone,
Ctrl-C, time limit) ends its sequence at the next step and frees its slot; the others go on.
A request that fails on its own (the engine ends it with an "error" event) has the error
raised to its reader alone; a failed model pass is raised to every running job's reader, and
the worker goes on with the next requests.

Admission, shared by every interface: a request takes a queue place (`admit`) before any
work; prompts are tokenized one at a time, by one thread (`tokenize`: 1 MB of text took
~600 MB while it was encoded, so memory stays bounded whatever arrives on HTTP, Wyoming and
the serial console together); job events are read on one bounded pool of threads
(`readers`: one per waiting or running job, plus a few left by clients that went away,
which end at their job's next event). The caller gives the queue bound and the time limit
(the product's defaults are edge.launch.request's).

Liveness: `healthy()` is False once work is pending (running or waiting) and neither a step
nor an admission has happened for `stall_seconds`: a step that never returns, or waiting
requests that can never get a slot. /health and the systemd watchdog read it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from edge.engine.engine import Engine, Event, GenerationParams, Sequence
from edge.engine.replies import aevents

_END = object()
log = logging.getLogger("edge.engine")
SPARE_READERS = 8          # reader threads beyond one per queue place and slot: left by clients gone


class QueueFull(RuntimeError):
    """Too many requests waiting; try again later."""


class Ticket:
    """A place in the queue, taken before any work is done for a request (tokenizing a
    prompt included), held while the job waits, and given back once: when the worker takes
    the job, when the job is cancelled while waiting, or when the request fails before it is
    submitted. So the queue bound also bounds the prompts being tokenized, and a request that
    has left never counts against the queue (no ghost 429s)."""

    def __init__(self, scheduler: "Scheduler"):
        self._scheduler = scheduler
        self._held = True

    def release(self) -> None:
        with self._scheduler._cond:
            if self._held:
                self._held = False
                self._scheduler._held -= 1

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.release()


@dataclass
class Job:
    prompt_ids: list[int]
    params: GenerationParams
    time_limit: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    ticket: Ticket | None = None          # its place in the queue while it waits
    twin_of: Job | None = None            # another choice of the same prompt (n > 1)
    sequence: Sequence | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.ticket is not None:
            self.ticket.release()      # still waiting: its place is free at once

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def deadline(self) -> float | None:
        return self.submitted + self.time_limit if self.time_limit else None

    def events(self) -> Iterator[Event]:
        """Blocking stream of events; re-raises the engine's error if the job failed."""
        while (item := self._events.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int, time_limit: float | None,
                 stall_seconds: float | None = None, on_idle: Callable[[], None] | None = None):
        """`max_queue`: requests waiting beyond the running ones; `time_limit`: a request's
        seconds in the queue + generating (None: no limit); `on_idle`: called on the worker
        each time the last running request has ended and none waits, after the engine's
        buffers for prompt chunks are let go (e.g. to hand freed memory back)."""
        self.engine = engine
        self.on_idle = on_idle
        self.stall_seconds = stall_seconds      # work pending this long without progress = wedged (None: never)
        self.max_queue = max_queue
        self.time_limit = time_limit
        self.readers = ThreadPoolExecutor(max_queue + engine.parallel + SPARE_READERS,
                                          thread_name_prefix="edge-llm-reader")
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix="edge-llm-tokenizer")
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[Sequence, Job] = {}
        self._held = 0                           # queue places taken (waiting jobs, prompts being tokenized)
        self._cond = threading.Condition()       # reentrant: a ticket is given back under it
        self.last_progress = time.monotonic()    # the last step or admission, or when work arrived
        self.listeners: list[Callable[[Job, Event], None]] = []   # e.g. metrics
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="edge-llm-engine", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot (one that left is dropped at the worker's next turn)."""
        return sum(not job.cancelled for job in list(self._waiting))

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def pending(self) -> bool:
        """Requests running or waiting for a slot."""
        return bool(self._running) or any(not job.cancelled for job in list(self._waiting))

    @property
    def running(self) -> int:
        return len(self._running)

    def admit(self) -> Ticket:
        """Take a place in the queue before any work is done for a request (QueueFull when
        every slot is busy and `max_queue` places are taken)."""
        with self._cond:
            free = self.engine.parallel - len(self._running)
            if self._held >= self.max_queue + max(free, 0):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again shortly")
            self._held += 1
        return Ticket(self)

    def tokenize(self, encode: Callable, *args) -> Future:
        """`encode(*args)` on the one tokenizer thread, after the prompts before it."""
        return self._tokenizer.submit(encode, *args)

    async def atokenize(self, encode: Callable, *args):
        """`tokenize` for an event loop: waits without blocking it."""
        return await asyncio.wrap_future(self.tokenize(encode, *args))

    async def aread(self, fn: Callable, *args):
        """`fn(*args)` on a reader thread. If the awaiting task is cancelled (client gone)
        the thread is left to end by itself (at the job's next event)."""
        return await asyncio.get_running_loop().run_in_executor(self.readers, fn, *args)

    def aevents(self, job: Job) -> AsyncIterator[Event]:
        """The job's events for an event loop, read on the reader threads."""
        return aevents(job.events(), self.aread)

    def submit(self, prompt_ids: list[int], params: GenerationParams, time_limit: float | None = None,
               cancel: threading.Event | None = None, ticket: Ticket | None = None) -> Job:
        """Queue a request, in the place `ticket` holds (or a new one)."""
        job = Job(list(prompt_ids), params, time_limit if time_limit is not None else self.time_limit,
                  ticket=ticket or self.admit())
        if cancel is not None:
            job.cancel_event = cancel
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()
        return job

    def submit_choices(self, prompt_ids: list[int], params: list[GenerationParams],
                       time_limit: float | None = None) -> list[Job]:
        """n choices of one prompt (OpenAI's `n`): one job each, decoded together; the prompt
        is read once and its KV shared. QueueFull unless all n fit."""
        jobs = []
        with self._cond:
            free = self.engine.parallel - len(self._running)
            if self._held + len(params) > self.max_queue + max(free, 0):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting and this one asks for "
                                f"{len(params)} choices; try again shortly")
            for p in params:
                self._held += 1
                job = Job(list(prompt_ids), p, time_limit if time_limit is not None else self.time_limit,
                          ticket=Ticket(self), twin_of=jobs[0] if jobs else None)
                jobs.append(job)
                self._waiting.append(job)
            self._cond.notify()
        return jobs

    def stream(self, prompt_ids: list[int], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Event]:
        """submit + events, with the signature of Engine.generate (for Conversation)."""
        return self.submit(prompt_ids, params, cancel=cancel).events()

    def cancel_all(self) -> None:
        """Cancel every running and waiting job (shutdown): each ends at once with
        finish_reason "cancelled"."""
        with self._cond:
            jobs = list(self._waiting) + list(self._running.values())
        for job in jobs:
            job.cancel()

    def close(self, timeout: float | None = None) -> bool:
        """End the worker once nothing runs or waits (its model is being unloaded) and the
        idle reader and tokenizer threads, so that nothing holds the engine any more. False
        when the worker is still busy after `timeout` seconds (None: wait for it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if self._worker.is_alive():
            return False
        self.readers.shutdown(wait=False)
        self._tokenizer.shutdown(wait=False)
        return True

    def healthy(self) -> bool:
        """Nothing pending, or progress (a step, an admission) within `stall_seconds`: what
        /health reports and the systemd watchdog is fed on."""
        if self.stall_seconds is None or not (self.busy or self.pending):
            return True
        return time.monotonic() - self.last_progress < self.stall_seconds

    # --- the worker ------------------------------------------------------------------------
    def _end(self, job: Job, last) -> None:
        job._events.put(last)
        job._events.put(_END)

    def _admit(self) -> None:
        """Waiting jobs into free slots, oldest first."""
        while self._waiting and self.engine.free_slots():
            job = self._waiting.popleft()
            job.ticket.release()
            if job.cancelled:
                self._end(job, Event(finish_reason="cancelled"))
                continue
            twin = job.twin_of.sequence if job.twin_of is not None else None
            try:
                seq = self.engine.start(job.prompt_ids, job.params, job.cancel_event, wait=False, twin=twin)
            except Exception as e:         # e.g. ContextFull: reported to the job's reader; no slot kept
                self._end(job, e)
                continue
            if seq is None:                # a slot taken outside the queue meanwhile (engine.generate)
                self._waiting.appendleft(job)
                break
            job.sequence = seq
            self._running[seq] = job
            self.last_progress = time.monotonic()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._waiting and not self._running:
                    while not self._waiting and not self._running:
                        if self._closed:
                            return
                        self._cond.wait()
                    self.last_progress = time.monotonic()       # work arrived: the stall clock starts
                for job in [j for j in self._waiting if j.cancelled]:     # left while waiting
                    self._waiting.remove(job)
                    job.ticket.release()     # its cancel event may have been set by its reader
                    self._end(job, Event(finish_reason="cancelled"))
                self._admit()
                if not self._running:          # every slot taken outside the queue (engine.generate)
                    self.last_progress = max(self.last_progress, self.engine.last_step)    # its steps count
                    self._cond.wait(0.05)
                    continue
            now = time.monotonic()
            for job in self._running.values():
                if job.deadline is not None and now > job.deadline:
                    job.cancel()     # the engine ends the sequence with finish_reason "cancelled"
            try:
                moved = self.engine.step(list(self._running))
            except BaseException as e:    # reported to every running job's reader; the worker lives on
                for seq, job in list(self._running.items()):
                    self.engine.release(seq)
                    self._end(job, e)
                with self._cond:
                    self._running.clear()
                continue
            self.last_progress = time.monotonic()
            for seq, events in moved:
                job = self._running[seq]
                if seq.done:       # its place is free before its reader sees the end, so a client
                    with self._cond:        # that sends the next request on "done" is not refused
                        del self._running[seq]
                for ev in events:
                    for listener in self.listeners:
                        listener(job, ev)
                    job._events.put(ev if ev.error is None else ev.error)
                if seq.done:
                    job._events.put(_END)
            if not self._running and not self._waiting:
                self._idle()

    def _idle(self) -> None:
        """Nothing runs or waits: memory that only running requests use goes back (a request
        arriving meanwhile waits for it: milliseconds)."""
        try:
            self.engine.release_buffers()
            if self.on_idle is not None:
                self.on_idle()
        except Exception as e:           # the worker goes on; the memory stays taken
            log.warning("could not release memory between requests: %s", e)
