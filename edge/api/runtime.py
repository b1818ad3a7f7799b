"""The HTTP runtime both APIs (OpenAI, Ollama) run on: server state and config, the error
type, admission, tokenizing, the request builder and a request's jobs and their events.

It talks to the model only through `Engine.encode_chat/encode_text` and the shared
`Scheduler` (submit a job, read its events, cancel it); it knows nothing of tensors.

- A request takes a queue place before any work (`admit`); a full queue is `QueueFull`,
  which each adapter's table answers (429 with Retry-After).
- One prompt is tokenized at a time, and only by requests holding a queue place; job events
  are read on a bounded pool of threads: the scheduler's, shared with Wyoming and serial.
- One request = one scheduler job per choice (`Jobs`; n > 1 decode together).
- A client that goes away cancels its jobs at once (`JobStream`, `cancel_on_disconnect`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Annotated, AsyncIterator

from fastapi import Depends, Request
from fastapi.responses import StreamingResponse

from edge.api.metrics import Metrics
from edge.engine import ContextFull, QueueFull
from edge.engine.engine import GenerationParams
from edge.engine.replies import Answer, acollect
from edge.engine.sampler import check_vocab
from edge.engine.scheduler import Job
from edge.engine.tool_calls import ChatRequest, ToolError, prepare_chat
from edge.launch.loaded_models import LoadedModels, loader_like, model_bytes, model_key, parse_keep_alive
from edge.launch.memory import BIG_REQUEST as BIG_PROMPT, release_free_memory
from edge.launch.request import (DEFAULT_CLOCK_LAST, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_LOADED_MODELS,
                                 DEFAULT_REQUEST_SECONDS, DEFAULT_TOOL_LOOP_GUARD, RequestDefaults)

MAX_BODY_BYTES = 1 << 20
CLIENT_GONE = 499                         # nginx's "client closed request", for logs and metrics


@dataclass
class ServerConfig:
    api_key: str | None = None
    request_timeout: float | None = DEFAULT_REQUEST_SECONDS     # queue + generating; None = no limit
    max_body_bytes: int = MAX_BODY_BYTES
    cors_origins: list[str] = field(default_factory=list)
    # web origins allowed beyond edge.api.origins' defaults (the page's own, loopback, local apps)
    allowed_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    # Host header names accepted (None = any): a loopback bind allows only loopback names, so
    # that a web page cannot reach the API through DNS rebinding (its Host is its own name)
    allowed_hosts: frozenset[str] | None = None
    # serve's flags over the product defaults; max_tokens None = the rest of the context
    defaults: RequestDefaults = field(default_factory=lambda: RequestDefaults(max_tokens=None))
    tool_loop_guard: bool = DEFAULT_TOOL_LOOP_GUARD      # a request's own `tool_loop_guard` wins
    clock_last: bool = DEFAULT_CLOCK_LAST                # serve --clock-line last|keep


class ServerState:
    """What the routes need. The model arrives later: it loads in the background. Once it has,
    `models` holds what is loaded (the served default model and any other a request named);
    `engine` and `scheduler` are the default model's while it is loaded. A route works on the
    model its request named through `edge.api.models.using`."""

    def __init__(self, model_id: str, config: ServerConfig | None = None, metrics: Metrics | None = None):
        self.model_id = model_id
        self.config = config or ServerConfig()
        self.metrics = metrics or Metrics()
        self.metrics.loaded = lambda: self.ready
        self.models: LoadedModels | None = None
        self.default_key: str | None = None
        self.error: str | None = None
        self.draining = False          # shutting down: open requests end with an error
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return self.models is not None

    def set_ready(self, engine, scheduler, models: LoadedModels | None = None) -> None:
        """The default model is loaded. `models`: the registry that loads others (serve's, with
        its flags); by default one that loads them as the default model was loaded."""
        self.model_id = engine.name
        models = models or LoadedModels(loader_like(engine, scheduler), DEFAULT_MAX_LOADED_MODELS,
                                        parse_keep_alive(DEFAULT_KEEP_ALIVE))
        models.listeners.append(self._on_model)
        self.metrics.queue_depth = lambda: sum(e.scheduler.queue_depth for e in self._loaded())
        self.metrics.running = lambda: sum(e.scheduler.running for e in self._loaded())
        self.metrics.kv_pool = self._kv_pool
        self.default_key = model_key(engine.bundle.path)
        scheduler.listeners.append(self.metrics.on_event)
        models.add(self.default_key, engine, scheduler, model_bytes(engine), default=True)
        self.models = models

    def _on_model(self, what: str, entry) -> None:
        if what == "loaded" and not entry.default:
            entry.scheduler.listeners.append(self.metrics.on_event)

    def _kv_pool(self) -> tuple[int, int]:
        """(bytes in use, budget) of the loaded models' KV pools together."""
        pools = [e.engine.kv_pool for e in self._loaded()]
        return sum(p.used_bytes for p in pools), sum(p.budget_bytes for p in pools)

    def _loaded(self) -> list:
        return self.models.loaded() if self.models is not None else []

    @property
    def default(self):
        """The default model's registry entry while it is loaded, else None."""
        return self.models.get(self.default_key) if self.models is not None else None

    @property
    def engine(self):
        return e.engine if (e := self.default) is not None else None

    @property
    def scheduler(self):
        return e.scheduler if (e := self.default) is not None else None

    def healthy(self) -> bool:
        """Every loaded model's engine makes progress (the systemd watchdog's question)."""
        return all(e.scheduler.healthy() for e in self._loaded())

    def set_failed(self, message: str) -> None:
        self.error = message

    def drain(self) -> None:
        """Shutdown begins: every running or waiting job ends now; its client gets a 503 or,
        mid-stream, an error event."""
        self.draining = True
        for e in self._loaded():
            e.scheduler.cancel_all()


def server_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(server_state)]


class ApiError(Exception):
    """An HTTP error in no API's shape: each adapter renders it (OpenAI's error object,
    Ollama's {"error": ...})."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


# exception -> (status, type, code): an adapter's table of the engine's refusals
ErrorTable = dict[type, tuple[int, str, str | None]]


def api_error(state: ServerState, table: ErrorTable, exc: Exception) -> ApiError:
    """The engine's refusal `exc` as the adapter's table says; a 429 says when to retry."""
    status, type_, code = next(v for k, v in table.items() if isinstance(exc, k))
    message = f"the server is busy: {exc}" if isinstance(exc, QueueFull) else str(exc)
    headers = {"Retry-After": str(max(1, math.ceil(state.metrics.last_duration)))} if status == 429 else None
    return ApiError(status, message, type_, code=code, headers=headers)


@contextlib.contextmanager
def refusals(state: ServerState, table: ErrorTable):
    """Within: the engine's refusals named in `table` become ApiErrors."""
    try:
        yield
    except tuple(table) as e:
        raise api_error(state, table, e) from e


# --- requests -> jobs ------------------------------------------------------------------

def admit(state: ServerState, table: ErrorTable):
    """A place in the queue before any work (tokenizing included); the table's answer to
    QueueFull when none is left. The ticket goes back if the request fails before its job is
    queued."""
    with refusals(state, table):
        return state.scheduler.admit()


def check_bytes(engine, nbytes: int, param: str) -> None:
    """Refuse a prompt that cannot fit from its size alone, before a queue place or tokenizer."""
    try:
        engine.check_fits_bytes(nbytes)
    except ContextFull as e:
        raise too_long(e, f"the {param} ({nbytes} bytes) have at least {e.needed} tokens", param) from e


def too_long(e: ContextFull, what: str, param: str) -> ApiError:
    """The 400 for a prompt that does not fit: `what` says how long it is."""
    return ApiError(400, f"This model's maximum context length is {e.max_ctx} tokens, but {what}. Shorten the "
                    f"{param}.", param=param, code="context_length_exceeded")


def message_bytes(messages: list[dict]) -> int:
    return sum(len(m["content"].encode()) for m in messages if isinstance(m.get("content"), str))


async def tokenize(state: ServerState, encode, value, param: str, nbytes: int) -> list[int]:
    """On the scheduler's one tokenizer thread, shared with every interface (one prompt at a
    time), and only by requests holding a queue place: memory stays bounded whatever arrives."""
    return await state.scheduler.atokenize(_encode, encode, value, param, nbytes >= BIG_PROMPT)


def _encode(encode, value, param: str, big: bool) -> list[int]:
    try:
        ids = encode(value)
    except ValueError as e:       # includes the chat template's own raise_exception
        raise ApiError(400, str(e), param=param) from e
    finally:
        if big:
            release_free_memory()
    if not ids:
        raise ApiError(400, f"{param} is empty: there is nothing to complete", param=param)
    return ids


def chat_prompt(engine, messages: list[dict], tools=None, tool_choice=None, parallel_tool_calls=None,
                response_format=None, tool_loop_guard: bool = DEFAULT_TOOL_LOOP_GUARD,
                clock_last: bool = DEFAULT_CLOCK_LAST) -> ChatRequest:
    """The chat layer's prompt ids, tool use and grammar; its errors become 400s naming the field.
    `response_format` is OpenAI's object or a Grammar an adapter built from its own field."""
    try:
        chat = prepare_chat(engine, messages, tools, tool_choice, parallel_tool_calls, response_format,
                            tool_loop_guard=tool_loop_guard, clock_last=clock_last)
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from e
    except ValueError as e:       # the chat template's own raise_exception
        raise ApiError(400, str(e), param="messages") from e
    if not chat.ids:
        raise ApiError(400, "messages is empty: there is nothing to complete", param="messages")
    return chat


def loop_guard(state: ServerState, asked: bool | None) -> bool:
    """The tool-loop guard for a request: its own `tool_loop_guard`, else the server's."""
    return state.config.tool_loop_guard if asked is None else asked


def checked_token_ids(ids: list[int], engine) -> list[int]:
    vocab = engine.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return ids


def note_prompt(request: Request, state: ServerState, prompt) -> None:
    if state.config.log_prompts:
        request.state.prompt = prompt


def request_params(state: ServerState, ids: list[int], param: str, **overrides) -> GenerationParams:
    """The server's defaults with a request's fields (`RequestDefaults` names), once the
    prompt is known to fit; every API's routes build their requests here."""
    try:
        state.engine.check_fits(ids)
    except ContextFull as e:
        raise too_long(e, f"the prompt has {e.needed} tokens (at least one more is needed to answer)", param) from e
    try:
        params = state.config.defaults.build(**overrides)
        check_vocab(params.sampling, state.engine.config.vocab_size)
        return params
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from e


class Jobs:
    """A request's n choices. n > 1 goes to the scheduler as one group: the prompt is read once
    and the choices decode together (Scheduler.submit_choices); with a seed, choice i uses
    seed + i. The reply reads them in order."""

    def __init__(self, state: ServerState, ids: list[int], params: GenerationParams, n: int, ticket):
        self.state, self.ids, self.params, self.n, self.ticket = state, ids, params, n, ticket
        self.started: list[Job] = []
        self._next = 0

    def start(self, table: ErrorTable) -> Jobs:
        sched, limit = self.state.scheduler, self.state.config.request_timeout
        if self.n == 1:
            self.started = [sched.submit(self.ids, self.params, time_limit=limit, ticket=self.ticket)]
            return self
        self.ticket.release()            # the group takes its n places itself
        with refusals(self.state, table):
            self.started = sched.submit_choices(self.ids, [self._seeded(i) for i in range(self.n)], limit)
        return self

    def _seeded(self, i: int) -> GenerationParams:
        p = self.params
        if i == 0 or p.sampling.seed is None:
            return p
        return dataclasses.replace(p, sampling=dataclasses.replace(p.sampling, seed=p.sampling.seed + i))

    def next(self) -> Job:
        job = self.started[self._next]
        self._next += 1
        return job

    def cancel(self) -> None:
        for job in self.started:
            job.cancel()


class JobStream(StreamingResponse):
    """A stream (SSE, or NDJSON for Ollama) whose job is cancelled however the response ends,
    even when the client leaves before the body generator has started (then the generator's
    own cleanup never runs)."""

    def __init__(self, job: Job | Jobs, content, media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def job_events(job: Job, scheduler) -> AsyncIterator:
    """The job's events without blocking the event loop, read on the scheduler's reader
    threads (shared with every interface). If the awaiting task is cancelled (client gone)
    the reading thread ends by itself at the job's next event."""
    return scheduler.aevents(job)


async def collect(state: ServerState, table: ErrorTable, job: Job, tool_use) -> Answer:
    """A job's whole answer; the engine's refusals become the table's ApiErrors."""
    with refusals(state, table):
        return await acollect(job_events(job, state.scheduler), tool_use)


async def whole_answer(request: Request, state: ServerState, table: ErrorTable, job: Job, tool_use) -> Answer:
    """`collect` for a request of one job, which the client leaving cancels at once."""
    try:
        async with cancel_on_disconnect(request, job):
            return await collect(state, table, job, tool_use)
    finally:
        job.cancel()          # a no-op for a finished job


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, job: Job | Jobs):
    """Cancel the job as soon as the client disconnects (the request body is already read,
    so the next ASGI message can only be the disconnect)."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        request.state.client_gone = True
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
