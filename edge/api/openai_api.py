"""The OpenAI-compatible HTTP API: `create_app(state)` builds the FastAPI app.

It talks to the model only through `Engine.encode_chat/encode_text` and the shared
`Scheduler` (submit a job, read its events, cancel it); it knows nothing of tensors.

- One request = one scheduler job per choice (n > 1: one after the other). A full queue
  answers 429 with Retry-After.
- Tools, tool results and `response_format` go to the chat layer (`edge.engine.tool_calls`),
  which gives back the prompt and the grammar the engine holds the output to; replies are
  parsed back into `tool_calls` there too (streamed: held back from the first `{`).
- A client that goes away (mid-stream, or while waiting for a non-streamed answer) cancels
  its job at once, so the engine moves on to the next request.
- Every error, whoever raises it (validation, auth, routing, body cap, the engine), is
  answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
- One log line per request (id, tokens, cached tokens, ttft, tokens/s, status); prompt
  text only with `log_prompts`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge.engine.engine import GenerationParams, Usage
from edge.engine.tool_calls import ChatRequest, ToolError, ToolUse, prepare_chat
from edge.launch.request import RequestDefaults
from edge.model.kv_cache import ContextFull
from edge.api import chat_page
from edge.api.metrics import Metrics
from edge.api.openai_schema import (ChatCompletionRequest, CompletionRequest, GenerationRequest, chat_choice,
                                chat_delta, chat_logprobs, envelope, error_body, model_card, text_choice,
                                text_logprobs, usage_dict)
from edge.engine.scheduler import Job, QueueFull

log = logging.getLogger("edge.http")

MAX_BODY_BYTES = 1 << 20
QUIET_PATHS = ("/health", "/metrics")     # logged at DEBUG: probes and scrapes come every few seconds
OPEN_PATHS = ("/health", *chat_page.PAGE_PATHS)   # without the API key: probes, and the chat page (its JS sends the key)
CLIENT_GONE = 499                         # nginx's "client closed request", for logs and metrics


@dataclass
class ServerConfig:
    api_key: str | None = None
    request_timeout: float | None = 300.0     # seconds in queue + generating; None = no limit
    max_body_bytes: int = MAX_BODY_BYTES
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    # Host header names accepted (None = any): a loopback bind allows only loopback names, so
    # that a web page cannot reach the API through DNS rebinding (its Host is its own name)
    allowed_hosts: frozenset[str] | None = None
    # serve's flags over the product defaults; max_tokens None = the rest of the context
    defaults: RequestDefaults = field(default_factory=lambda: RequestDefaults(max_tokens=None))


class ServerState:
    """What the routes need. The model arrives later: it loads in the background."""

    def __init__(self, model_id: str, config: ServerConfig | None = None, metrics: Metrics | None = None):
        self.model_id = model_id
        self.config = config or ServerConfig()
        self.metrics = metrics or Metrics()
        self.metrics.loaded = lambda: self.ready
        self.engine = None
        self.scheduler = None
        self.error: str | None = None
        self.draining = False          # shutting down: open requests end with an error
        self.created = int(time.time())
        self._limiter: anyio.CapacityLimiter | None = None
        self._tokenizing: anyio.Semaphore | None = None

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def set_ready(self, engine, scheduler) -> None:
        scheduler.listeners.append(self.metrics.on_event)
        self.metrics.queue_depth = lambda: scheduler.queue_depth
        self.metrics.running = lambda: scheduler.running
        self.model_id = engine.name
        self.engine, self.scheduler = engine, scheduler

    def set_failed(self, message: str) -> None:
        self.error = message

    def drain(self) -> None:
        """Shutdown begins: every running or waiting job ends now; its client gets a 503 or,
        mid-stream, an error event and [DONE]."""
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.cancel_all()

    @property
    def tokenizing(self) -> anyio.Semaphore:
        if self._tokenizing is None:
            self._tokenizing = anyio.Semaphore(1)
        return self._tokenizing

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """Threads reading job events: one per waiting or running job, plus a few abandoned
        by clients that left (they end at their job's next event)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.scheduler.max_queue + self.engine.parallel + 8)
        return self._limiter


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **kw) -> JSONResponse:
    return ApiError(status, message, **kw).response()


# --- the app ---------------------------------------------------------------------------

def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="edge-llm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.include_router(router)
    app.include_router(chat_page.router)
    app.add_exception_handler(ApiError, lambda req, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Guard, state=state)          # innermost of the three
    app.add_middleware(RequestLog, state=state)
    if state.config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.config.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    return app


router = APIRouter()


def server_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(server_state)]


@router.get("/health")
def health(state: StateDep):
    if state.error:
        return _health(503, "error", state, state.error, "model_load_failed")
    if not state.ready:
        return _health(503, "loading", state, "the model is loading", "model_loading")
    if not state.scheduler.healthy():
        return _health(503, "stalled", state, f"the engine has made no progress for "
                       f"{state.scheduler.stall_seconds:g} s", "engine_stalled")
    return {"status": "ok", "model": state.model_id, "queue_depth": state.scheduler.queue_depth,
            "busy": state.scheduler.busy, "max_context": state.engine.max_ctx}


def _health(status: int, word: str, state: ServerState, message: str, code: str) -> JSONResponse:
    body = {"status": word, "model": state.model_id, **error_body(message, "unavailable_error", None, code)}
    return JSONResponse(body, status_code=status)


@router.get("/metrics")
def metrics(state: StateDep):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
def list_models(state: StateDep):
    return {"object": "list", "data": [model_card(state.model_id, state.created)]}


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, state: StateDep):
    if model_id != state.model_id:
        raise ApiError(404, f"the model {model_id!r} does not exist; this server runs {state.model_id!r}",
                       param="model", code="model_not_found")
    return model_card(state.model_id, state.created)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep):
    engine = _engine(state)
    messages = [m.as_dict() for m in body.messages]
    nbytes = sum(len(m["content"].encode()) for m in messages if isinstance(m.get("content"), str))
    _check_bytes(engine, nbytes, "messages")
    with admit(state) as ticket:
        prompt = functools.partial(chat_prompt, engine, tools=body.tools, tool_choice=body.tool_choice,
                                   parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format)
        chat = await tokenize(state, prompt, messages, "messages", nbytes)
        _note_prompt(request, state, messages)
        return await _respond(state, request, body, chat.ids, ChatShape(chat.tool_use), "messages", ticket,
                              **chat.overrides())


def chat_prompt(engine, messages: list[dict], tools=None, tool_choice=None, parallel_tool_calls=None,
                response_format=None) -> ChatRequest:
    """The chat layer's prompt ids, tool use and grammar (OpenAI-shaped fields, which the Ollama
    API maps its own onto); its errors become 400s naming the field."""
    try:
        chat = prepare_chat(engine, messages, tools, tool_choice, parallel_tool_calls, response_format)
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from e
    except ValueError as e:       # the chat template's own raise_exception
        raise ApiError(400, str(e), param="messages") from e
    if not chat.ids:
        raise ApiError(400, "messages is empty: there is nothing to complete", param="messages")
    return chat


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep):
    engine = _engine(state)
    with admit(state) as ticket:
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
            ids = _checked_token_ids(body.prompt, engine)
        else:
            text = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
            nbytes = len(text.encode())
            _check_bytes(engine, nbytes, "prompt")
            ids = await tokenize(state, engine.encode_text, text, "prompt", nbytes)
        _note_prompt(request, state, body.prompt)
        return await _respond(state, request, body, ids, TEXT, "prompt", ticket)


# --- requests -> jobs ------------------------------------------------------------------

def _engine(state: ServerState):
    if state.error:
        raise ApiError(503, f"the model failed to load: {state.error}", "unavailable_error", code="model_load_failed")
    if not state.ready:
        raise ApiError(503, "the model is still loading; retry in a few seconds", "unavailable_error",
                       code="model_loading", headers={"Retry-After": "5"})
    return state.engine


def admit(state: ServerState):
    """A place in the queue before any work (tokenizing included); 429 when none is left.
    The ticket goes back if the request fails before its job is queued."""
    try:
        return state.scheduler.admit()
    except QueueFull as e:
        wait = max(1, math.ceil(state.metrics.last_duration))
        raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(wait)}) from e


def _check_bytes(engine, nbytes: int, param: str) -> None:
    """Refuse a prompt that cannot fit from its size alone, before a queue place or tokenizer."""
    try:
        engine.check_fits_bytes(nbytes)
    except ContextFull as e:
        raise ApiError(400, f"This model's maximum context length is {e.max_ctx} tokens, but the {param} "
                       f"({nbytes} bytes) have at least {e.needed} tokens. Shorten the {param}.",
                       param=param, code="context_length_exceeded") from e


async def tokenize(state: ServerState, encode, value, param: str, nbytes: int) -> list[int]:
    """One prompt tokenized at a time (1 MB of text took ~600 MB while it was encoded), and
    only by requests holding a queue place: memory stays bounded whatever arrives."""
    async with state.tokenizing:
        try:
            return await run_in_threadpool(_encode, encode, value, param)
        finally:
            if nbytes >= BIG_PROMPT:
                await run_in_threadpool(_release_free_memory)


BIG_PROMPT = 1 << 16        # bytes: after tokenizing this much, give the memory back


def _release_free_memory() -> None:
    """glibc keeps what the tokenizer freed (~600 MB peak for a 1 MB prompt) in its arenas;
    malloc_trim hands it back to the system, so RSS falls back after a huge prompt."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _encode(encode, value, param: str) -> list[int]:
    try:
        ids = encode(value)
    except ValueError as e:       # includes the chat template's own raise_exception
        raise ApiError(400, str(e), param=param) from e
    if not ids:
        raise ApiError(400, f"{param} is empty: there is nothing to complete", param=param)
    return ids


def _checked_token_ids(ids: list[int], engine) -> list[int]:
    vocab = engine.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return ids


def _note_prompt(request: Request, state: ServerState, prompt) -> None:
    if state.config.log_prompts:
        request.state.prompt = prompt


def generation_params(state: ServerState, body: GenerationRequest, ids: list[int], param: str,
                      **extra) -> GenerationParams:
    return request_params(state, ids, param, max_tokens=body.token_limit, stop=body.stop or None,
                          **body.sampling_overrides(), **extra)


def request_params(state: ServerState, ids: list[int], param: str, **overrides) -> GenerationParams:
    """The server's defaults with a request's fields (`RequestDefaults` names), once the
    prompt is known to fit; every API's routes build their requests here."""
    try:
        state.engine.check_fits(ids)
    except ContextFull as e:
        raise ApiError(400, f"This model's maximum context length is {e.max_ctx} tokens, but the prompt has "
                       f"{e.needed} tokens (at least one more is needed to answer). Shorten the {param}.",
                       param=param, code="context_length_exceeded") from e
    try:
        return state.config.defaults.build(**overrides)
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from e


async def _respond(state, request, body, ids, shape, param, ticket, **extra):
    params = generation_params(state, body, ids, param, logprobs=body.logprobs_top, **extra)
    jobs = Jobs(state, ids, params, body.n, ticket)
    jobs.start()                 # a full queue is a 429 here, not a broken stream
    reply = Reply(shape, f"{shape.id_prefix}-{request.state.request_id}", state.model_id, request)
    if body.stream:
        return JobStream(jobs, reply.stream(jobs, state.limiter, body.include_usage))
    return await reply.whole(jobs, state.limiter)


class Jobs:
    """A request's n choices. n > 1 goes to the scheduler as one group: the prompt is read once
    and the choices decode together (Scheduler.submit_choices); with a seed, choice i uses
    seed + i. The reply reads them in order."""

    def __init__(self, state: ServerState, ids: list[int], params: GenerationParams, n: int, ticket):
        self.state, self.ids, self.params, self.n, self.ticket = state, ids, params, n, ticket
        self.started: list[Job] = []
        self._next = 0

    def start(self) -> None:
        sched, limit = self.state.scheduler, self.state.config.request_timeout
        if self.n == 1:
            self.started = [sched.submit(self.ids, self.params, time_limit=limit, ticket=self.ticket)]
            return
        self.ticket.release()            # the group takes its n places itself
        try:
            self.started = sched.submit_choices(self.ids, [self._seeded(i) for i in range(self.n)], limit)
        except QueueFull as e:
            wait = max(1, math.ceil(self.state.metrics.last_duration))
            raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(wait)}) from e

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


async def job_events(job: Job, limiter: anyio.CapacityLimiter) -> AsyncIterator:
    """The job's events without blocking the event loop. If the awaiting task is cancelled
    (client gone) the reading thread is abandoned; it ends at the job's next event."""
    events = job.events()
    while (ev := await anyio.to_thread.run_sync(next, events, None, abandon_on_cancel=True,
                                                limiter=limiter)) is not None:
        yield ev


# --- jobs -> OpenAI responses ----------------------------------------------------------

class ChatShape:
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tool_use: ToolUse | None = None):
        self.tool_use = tool_use if tool_use is not None and tool_use.active else None

    def choice(self, index: int) -> ChatChoice:
        return ChatChoice(index, self.tool_use)


ARGUMENT_CHUNK = 24      # characters of a streamed call's arguments per delta


class ChatChoice:
    """One choice of a chat answer: its deltas while streaming (tool calls held back and sent
    by index, the name first, then the arguments in pieces), or its whole message."""

    def __init__(self, index: int, tool_use: ToolUse | None):
        self.index, self.tool_use = index, tool_use
        self.calls = tool_use.stream() if tool_use is not None else None
        self._scores: list | None = None

    def opening(self) -> list[dict]:
        return [chat_delta({"role": "assistant", "content": ""}, index=self.index)]

    def piece(self, text: str, scores) -> list[dict]:
        self._gather(scores)
        if self.calls is not None:
            text = self.calls.feed(text)
        return [self._content(text)] if text else []

    def closing(self, finish: str) -> list[dict]:
        out, calls = [], []
        if self.calls is not None:
            content, calls = self.calls.finish()
            if content:
                out.append(self._content(content))
        for k, call in enumerate(calls):
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append(chat_delta({"tool_calls": [head]}, index=self.index))
            args = call.arguments_json
            out += [chat_delta({"tool_calls": [{"index": k, "function": {"arguments": args[i:i + ARGUMENT_CHUNK]}}]},
                               index=self.index) for i in range(0, len(args), ARGUMENT_CHUNK)]
        out.append(chat_delta({}, "tool_calls" if calls else finish, index=self.index, logprobs=self._take()))
        return out

    def whole(self, text: str, finish: str, scores) -> dict:
        content, calls = self.tool_use.parse(text) if self.tool_use is not None else (text, [])
        return chat_choice(content, "tool_calls" if calls else finish, self.index,
                           [c.openai() for c in calls] or None, chat_logprobs(scores) if scores is not None else None)

    def _gather(self, scores) -> None:
        if scores is not None:
            self._scores = (self._scores or []) + scores

    def _take(self) -> dict | None:
        scores, self._scores = self._scores, ([] if self._scores is not None else None)
        return chat_logprobs(scores) if scores is not None else None

    def _content(self, text: str) -> dict:
        return chat_delta({"content": text}, index=self.index, logprobs=self._take())


class TextShape:
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, index: int) -> TextChoice:
        return TextChoice(index)


class TextChoice:
    def __init__(self, index: int):
        self.index, self.offset = index, 0

    def opening(self) -> list[dict]:
        return []

    def piece(self, text: str, scores) -> list[dict]:
        logprobs = None
        if scores is not None:
            logprobs = text_logprobs(scores, self.offset)
            self.offset += sum(len(e.token) for e in scores)
        return [text_choice(text, None, self.index, logprobs)] if text or scores else []

    def closing(self, finish: str) -> list[dict]:
        return [text_choice("", finish, self.index)]

    def whole(self, text: str, finish: str, scores) -> dict:
        return text_choice(text, finish, self.index, text_logprobs(scores) if scores is not None else None)


TEXT = TextShape()


def _total(usage: Usage | None, more: Usage) -> Usage:
    """Usage over a request's choices: the prompt once, every choice's tokens."""
    if usage is None:
        return dataclasses.replace(more)
    return dataclasses.replace(usage, completion_tokens=usage.completion_tokens + more.completion_tokens,
                               decode_seconds=usage.decode_seconds + more.decode_seconds)


class Reply:
    """One request's answer (its n choices), streamed as SSE or returned whole."""

    def __init__(self, shape, id_: str, model: str, request: Request):
        self.shape, self.id, self.model, self.request = shape, id_, model, request
        self.created = int(time.time())

    def finish_reason(self, last) -> str:
        self.request.state.usage = last.usage
        self.request.state.finish = last.finish_reason
        if last.finish_reason == "cancelled" and self.request.app.state.server.draining:
            raise ApiError(503, "the server is shutting down; retry in a moment", "unavailable_error",
                           code="server_shutdown", headers={"Retry-After": "10"})
        if last.finish_reason == "cancelled":    # the client is still here: the time limit hit
            limit = self.request.app.state.server.config.request_timeout
            raise ApiError(504, f"the request took longer than the server's time limit of {limit or 0:g} s "
                           "(waiting in the queue + generating); ask for fewer tokens or retry later",
                           "timeout_error", code="request_timeout")
        return last.finish_reason

    async def whole(self, jobs: Jobs, limiter) -> Response:
        choices, usage = [], None
        async with _cancel_on_disconnect(self.request, jobs):
            for index in range(jobs.n):
                parts, scores, last = [], None, None
                try:
                    async for ev in job_events(jobs.next(), limiter):
                        parts.append(ev.text)
                        if ev.logprobs is not None:
                            scores = (scores or []) + ev.logprobs
                        last = ev
                except ContextFull as e:
                    raise ApiError(400, str(e), code="context_length_exceeded") from e
                if getattr(self.request.state, "client_gone", False):
                    return Response(status_code=CLIENT_GONE)    # nobody reads it; the log says who left
                finish = self.finish_reason(last)
                choices.append(self.shape.choice(index).whole("".join(parts), finish, scores))
                usage = self.request.state.usage = _total(usage, last.usage)
        return JSONResponse(envelope(self.id, self.shape.object, self.model, choices, self.created,
                                     usage=usage_dict(usage)))

    async def stream(self, jobs: Jobs, limiter, include_usage: bool) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        usage = None
        try:
            for index in range(jobs.n):
                choice = self.shape.choice(index)
                job = jobs.next()
                for c in choice.opening():
                    yield self.chunk(c, **extra)
                async for ev in job_events(job, limiter):
                    if ev.text or ev.logprobs:
                        for c in choice.piece(ev.text, ev.logprobs):
                            yield self.chunk(c, **extra)
                    if ev.usage is not None:
                        for c in choice.closing(self.finish_reason(ev)):
                            yield self.chunk(c, **extra)
                        usage = self.request.state.usage = _total(usage, ev.usage)
            if include_usage:
                yield self.chunk_dict([], usage=usage_dict(usage))
        except ApiError as e:
            yield _sse(error_body(e.message, e.type, e.param, e.code))
        except ContextFull as e:
            yield _sse(error_body(str(e), "invalid_request_error", None, "context_length_exceeded"))
        except (asyncio.CancelledError, GeneratorExit):
            self.request.state.client_gone = True
            raise
        except Exception:
            log.exception("request %s failed while streaming", self.request.state.request_id)
            self.request.state.failed = True
            yield _sse(error_body("internal server error (see the server log)", "server_error"))
        finally:
            jobs.cancel()         # a no-op when the jobs ended; frees the engine when the client left
        yield "data: [DONE]\n\n"

    def chunk(self, choice: dict, **extra) -> str:
        return self.chunk_dict([choice], **extra)

    def chunk_dict(self, choices: list, **extra) -> str:
        return _sse(envelope(self.id, self.shape.chunk_object, self.model, choices, self.created, **extra))


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, job: Job):
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


# --- errors in OpenAI's shape ----------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        message = f"{request.method} {request.url.path}: no such endpoint"
    elif exc.status_code == 405:
        message = f"{request.url.path} does not accept {request.method}"
    return error_response(exc.status_code, message, type_=ERROR_TYPES.get(exc.status_code, "server_error"),
                          headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc.errors())
    return error_response(400, message, param=param)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("request %s failed", getattr(request.state, "request_id", "?"), exc_info=exc)
    return error_response(500, "internal server error (see the server log)", type_="server_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_message(errors) -> tuple[str, str | None]:
    """FastAPI's error list -> one readable message naming the field, and the field path."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return (f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')} "
                f"(at character {first['loc'][-1]})"), None
    param = _param(first["loc"])
    if param is None and first["type"] in ("model_attributes_type", "model_type", "dict_type", "missing"):
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    if first["type"] == "missing":
        return f"{param} is required", param
    same = [e["msg"].removeprefix("Value error, ") for e in errors if _param(e["loc"]) == param]
    return f"{param}: {' or '.join(dict.fromkeys(same))}" if param else same[0], param


def _param(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'list[TextPart]', 0) -> 'messages.0.content'"""
    parts = []
    for x in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(x, str) and ("[" in x or x.lower() in _TYPE_TAGS or "-" in x):
            break          # pydantic names the union member it tried; not a field
        parts.append(str(x))
    return ".".join(parts) or None


# --- middleware (pure ASGI, so that streaming is untouched) --------------------------

class Guard:
    """API key and request body cap, before any route runs. `error(status, message, **kw)`
    renders a refusal in the API's own shape (OpenAI's by default)."""

    def __init__(self, app, state: ServerState, error=error_response):
        self.app, self.state, self.error = app, state, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if refusal := self.refuse_host(scope) or self.refuse_auth(scope):
            return await refusal(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            limit = self.state.config.max_body_bytes
            too_large = self.error(413, f"the request body is larger than the limit of {limit} bytes",
                                   code="request_too_large", headers={"Connection": "close"})
            if _content_length(scope) > limit:       # refused before "100 Continue" invites the body
                return await too_large(scope, receive, send)
            body = await _read_capped(receive, limit)
            if body is _GONE:
                scope.setdefault("state", {})["client_gone"] = True
                return                                   # nobody to answer (or timed out: 408 sent)
            if body is None:
                return await too_large(scope, receive, send)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def refuse_host(self, scope) -> JSONResponse | None:
        allowed = self.state.config.allowed_hosts
        if allowed is None:
            return None
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
        name = host.rpartition("]")[0] + "]" if host.startswith("[") else host.rpartition(":")[0] or host
        if name in allowed:
            return None
        return error_response(403, f"Host {host!r} is not allowed: this server is bound to loopback and answers "
                              f"only {', '.join(sorted(allowed))} (protection against DNS rebinding)",
                              type_="permission_error", code="host_not_allowed")

    def refuse_auth(self, scope) -> JSONResponse | None:
        key = self.state.config.api_key
        if not key or scope["path"] in OPEN_PATHS:
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode()):
            return None
        message = "Incorrect API key provided." if given else \
            "Missing API key: send it as 'Authorization: Bearer YOUR_KEY'."
        return self.error(401, message, type_="authentication_error", code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})


_GONE = object()


def _content_length(scope) -> int:
    try:
        return int(dict(scope["headers"]).get(b"content-length", b"0"))
    except ValueError:
        return 0                # h11 already refuses a malformed Content-Length


async def _read_capped(receive, limit: int, drain_limit: int = 64 << 20) -> bytes | None:
    """The whole body, None when it exceeds `limit`, _GONE if the client left (or its
    request timed out) before the end. An oversized body is still read (and
    dropped, up to drain_limit) so that the client gets to see the 413 instead of a reset."""
    chunks, size = [], 0
    more = True
    while more and size <= drain_limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return _GONE
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks) if size <= limit else None


def _replay(body: bytes, receive):
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed


class RequestLog:
    """Request id, one log line per request, and the request counter by status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        info = scope.setdefault("state", {})
        info["request_id"] = request_id
        t0, status = time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            code = CLIENT_GONE if info.get("client_gone") else 500 if info.get("failed") else status[0]
            self.state.metrics.count_request(code)
            self.log(scope, info, code, time.perf_counter() - t0)

    def log(self, scope, info: dict, code: int, seconds: float) -> None:
        path = scope["path"]
        level = logging.DEBUG if path in QUIET_PATHS and code < 400 else logging.INFO
        line = f"{info['request_id']} {scope['method']} {path} {code} {seconds:.3f}s"
        if (u := info.get("usage")) is not None:
            line += (f" prompt={u.prompt_tokens} cached={u.cached_tokens} generated={u.completion_tokens}"
                     f" ttft={u.time_to_first_token:.3f}s tps={u.decode_tokens_per_second:.1f}"
                     f" finish={info.get('finish')}")
        if "prompt" in info:
            line += f" prompt_text={info['prompt']!r}"
        log.log(level, line)
