"""One queue in front of the engine, shared by every interface (HTTP, serial, ...).

The engine runs one sequence at a time, so requests wait in a bounded FIFO and a single
worker thread feeds them to the engine. Each submitted `Job` streams the engine's events
back through its own queue; cancelling a job (client gone, Ctrl-C, time limit) stops its
generation at the next token and frees the engine for the next job.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from edge.engine.engine import Engine, Event, GenerationParams

_END = object()


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
        with self._scheduler._lock:
            if self._held:
                self._held = False
                self._scheduler._waiting -= 1

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
    ticket: Ticket | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.ticket is not None:
            self.ticket.release()      # still waiting: its place is free at once

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def events(self) -> Iterator[Event]:
        """Blocking stream of events; re-raises the engine's error if the job failed."""
        while (item := self._events.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 8, time_limit: float | None = 300.0,
                 stall_seconds: float = 60.0):
        self.engine = engine
        self.stall_seconds = stall_seconds      # busy this long without a prefill chunk or token = wedged
        self.max_queue = max_queue
        self.time_limit = time_limit
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.busy = False
        self._current: Job | None = None
        self.last_progress = time.monotonic()    # for health checks (watchdog)
        self.listeners: list[Callable[[Job, Event], None]] = []   # e.g. metrics
        self._worker = threading.Thread(target=self._run, name="edge-llm-engine", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def admit(self) -> Ticket:
        """Take a place in the queue (QueueFull when none is left)."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting; try again shortly")
            self._waiting += 1
        return Ticket(self)

    def submit(self, prompt_ids: list[int], params: GenerationParams, time_limit: float | None = None,
               cancel: threading.Event | None = None, ticket: Ticket | None = None) -> Job:
        """Queue a job, in the place `ticket` holds (or a new one)."""
        job = Job(list(prompt_ids), params, time_limit if time_limit is not None else self.time_limit,
                  ticket=ticket or self.admit())
        if cancel is not None:
            job.cancel_event = cancel
        self._jobs.put(job)
        return job

    def stream(self, prompt_ids: list[int], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Event]:
        """submit + events, with the signature of Engine.generate (for Conversation)."""
        return self.submit(prompt_ids, params, cancel=cancel).events()

    def healthy(self) -> bool:
        """Idle, or busy and still making progress: a prefill chunk or a token within the last
        `stall_seconds` (what the systemd watchdog is fed on)."""
        return not self.busy or time.monotonic() - self.last_progress < self.stall_seconds

    def cancel_all(self) -> None:
        """Cancel the running job and every waiting one (shutdown): each ends at once with
        finish_reason "cancelled"."""
        with self._jobs.mutex:
            waiting = list(self._jobs.queue)
        current = self._current
        for job in waiting + ([current] if current is not None else []):
            job.cancel()

    def _progress(self, done: int, total: int) -> None:
        """Called by the engine after each prefill chunk: a long prompt is work, not a stall."""
        self.last_progress = time.monotonic()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            job.ticket.release()
            if job.cancelled:
                job._events.put(Event(finish_reason="cancelled"))
                job._events.put(_END)
                continue
            self.busy, self.last_progress, self._current = True, time.monotonic(), job
            try:
                self._serve(job)
            except BaseException as e:   # reported to the job's reader; the worker lives on
                job._events.put(e)
            finally:
                self.busy, self._current = False, None
                job._events.put(_END)

    def _serve(self, job: Job) -> None:
        deadline = job.submitted + job.time_limit if job.time_limit else None
        for ev in self.engine.generate(job.prompt_ids, job.params, job.cancel_event, progress=self._progress):
            self.last_progress = time.monotonic()
            if deadline is not None and self.last_progress > deadline:
                job.cancel()     # the engine ends the stream with finish_reason "cancelled"
            for listener in self.listeners:
                listener(job, ev)
            job._events.put(ev)
