"""The OpenAI-compatible HTTP API: `create_app(state)` builds the FastAPI app.

A thin adapter over the HTTP runtime (`runtime`): the routes map OpenAI's request bodies
(`openai_schema`) onto the launch layer's request, and the job's pieces (`edge.engine.replies`)
back onto OpenAI's replies, streamed as SSE or whole.

- Tools, tool results and `response_format` go to the chat layer (`edge.engine.tool_calls`),
  which gives back the prompt and the grammar the engine holds the output to; replies are
  parsed back into `tool_calls` there too (streamed: held back from the first `{`).
- Every error, whoever raises it (validation, auth, routing, body cap, the engine), is
  answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from edge.api import chat_page
from edge.api import responses_api
from edge.api.middleware import Contained, new_app
from edge.api.origins import guard_origins
from edge.api.openai_schema import (ERRORS, ChatCompletionRequest, CompletionRequest, chat_choice, chat_delta,
                                    chat_logprobs, envelope, error_body, model_card, text_choice, text_logprobs,
                                    usage_dict)
from edge.api.models import ReleaseModels, live, model_error, resolve_key, using
from edge.api.runtime import (CLIENT_GONE, ApiError, Jobs, JobStream, ServerState, StateDep, admit,
                              api_error, cancel_on_disconnect, chat_prompt, check_bytes, checked_token_ids, collect,
                              job_events, loop_guard, message_bytes, note_prompt, request_params, tokenize)
from edge.engine import ContextFull, SequenceFailed
from edge.engine.engine import Usage
from edge.engine.replies import Piece, astream
from edge.engine.tool_calls import ToolUse

log = logging.getLogger("edge.http")



def render(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                        status_code=exc.status, headers=exc.headers)


def error_response(status: int, message: str, **kw) -> JSONResponse:
    return render(ApiError(status, message, **kw))


def create_app(state: ServerState) -> FastAPI:
    app = new_app(state, "edge-llm", [router, responses_api.router, chat_page.router], render, error_response)
    if state.config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.config.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    return ReleaseModels(guard_origins(Contained(app), state.config, error_response), state)


router = APIRouter()


@router.get("/health")
def health(state: StateDep):
    if state.error:
        return _health(503, "error", state, state.error, "model_load_failed")
    if not state.ready:
        return _health(503, "loading", state, "the model is loading", "model_loading")
    loaded = live(state)
    stalled = next((e for e in loaded if not e.scheduler.healthy()), None)
    if stalled is not None:
        return _health(503, "stalled", state, f"the engine of {stalled.name} has made no progress for "
                       f"{stalled.scheduler.stall_seconds:g} s", "engine_stalled")
    default = state.default
    return {"status": "ok", "model": state.model_id, "queue_depth": sum(e.scheduler.queue_depth for e in loaded),
            "busy": any(e.scheduler.busy for e in loaded),
            "max_context": default.engine.max_ctx if default is not None else None,
            "loaded": [e.name for e in loaded]}


def _health(status: int, word: str, state: ServerState, message: str, code: str) -> JSONResponse:
    body = {"status": word, "model": state.model_id, **error_body(message, "unavailable_error", None, code)}
    return JSONResponse(body, status_code=status)


@router.get("/metrics")
def metrics(state: StateDep):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
def list_models(state: StateDep):
    """The served model first, then the other loaded ones."""
    names = [state.model_id] + [e.name for e in live(state) if e.name != state.model_id]
    return {"object": "list", "data": [model_card(n, state.created) for n in names]}


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, state: StateDep):
    if (err := model_error(state, model_id)) is not None:
        raise err
    served = resolve_key(state, model_id) == state.default_key
    return model_card(state.model_id if served else model_id, state.created)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep):
    state = await using(request, state, body.model or None)      # a name this server does not run: 404
    engine = state.engine
    messages = [m.as_dict() for m in body.messages]
    nbytes = message_bytes(messages)
    check_bytes(engine, nbytes, "messages")
    with admit(state, ERRORS) as ticket:
        prompt = functools.partial(chat_prompt, engine, tools=body.tools, tool_choice=body.tool_choice,
                                   parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format,
                                   tool_loop_guard=loop_guard(state, body.tool_loop_guard), clock_last=state.config.clock_last)
        chat = await tokenize(state, prompt, messages, "messages", nbytes)
        note_prompt(request, state, messages)
        return await _respond(state, request, body, chat.ids, ChatShape(chat.tool_use), "messages", ticket,
                              **chat.overrides())


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep):
    state = await using(request, state, body.model or None)
    engine = state.engine
    with admit(state, ERRORS) as ticket:
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
            ids = checked_token_ids(body.prompt, engine)
        else:
            text = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
            nbytes = len(text.encode())
            check_bytes(engine, nbytes, "prompt")
            ids = await tokenize(state, engine.encode_text, text, "prompt", nbytes)
        note_prompt(request, state, body.prompt)
        return await _respond(state, request, body, ids, TEXT, "prompt", ticket)


async def _respond(state, request, body, ids, shape, param, ticket, **extra):
    params = request_params(state, ids, param, max_tokens=body.token_limit, stop=body.stop or None,
                            logprobs=body.logprobs_top, **body.sampling_overrides(), **extra)
    jobs = Jobs(state, ids, params, body.n, ticket).start(ERRORS)     # a full queue is a 429 here
    reply = Reply(shape, f"{shape.id_prefix}-{request.state.request_id}", state.model_id, request)
    if body.stream:
        return JobStream(jobs, reply.stream(jobs, state.scheduler, body.include_usage))
    return await reply.whole(jobs)


# --- pieces -> OpenAI's choices ------------------------------------------------------------

class ChatShape:
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tool_use: ToolUse | None = None):
        self.tool_use = tool_use if tool_use is not None and tool_use.active else None

    def choice(self, index: int) -> ChatChoice:
        return ChatChoice(index)


ARGUMENT_CHUNK = 24      # characters of a streamed call's arguments per delta


class ChatChoice:
    """One choice of a chat answer: its deltas while streaming (tool calls sent by index, the
    name first, then the arguments in pieces), or its whole message."""

    def __init__(self, index: int):
        self.index = index
        self._scores: list | None = None

    def opening(self) -> list[dict]:
        return [chat_delta({"role": "assistant", "content": ""}, index=self.index)]

    def piece(self, piece: Piece) -> list[dict]:
        if piece.logprobs is not None:
            self._scores = (self._scores or []) + piece.logprobs
        return [self._content(piece.text)] if piece.text else []

    def closing(self, last: Piece, finish: str) -> list[dict]:
        out = [self._content(last.text)] if last.text else []
        for k, call in enumerate(last.tool_calls):
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append(chat_delta({"tool_calls": [head]}, index=self.index))
            args = call.arguments_json
            out += [chat_delta({"tool_calls": [{"index": k, "function": {"arguments": args[i:i + ARGUMENT_CHUNK]}}]},
                               index=self.index) for i in range(0, len(args), ARGUMENT_CHUNK)]
        out.append(chat_delta({}, "tool_calls" if last.tool_calls else finish, index=self.index,
                              logprobs=self._take()))
        return out

    def whole(self, answer, finish: str) -> dict:
        calls = answer.tool_calls
        return chat_choice(answer.content, "tool_calls" if calls else finish, self.index,
                           [c.openai() for c in calls] or None,
                           chat_logprobs(answer.logprobs) if answer.logprobs is not None else None)

    def _take(self) -> dict | None:
        scores, self._scores = self._scores, ([] if self._scores is not None else None)
        return chat_logprobs(scores) if scores is not None else None

    def _content(self, text: str) -> dict:
        return chat_delta({"content": text}, index=self.index, logprobs=self._take())


class TextShape:
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"
    tool_use = None

    def choice(self, index: int) -> TextChoice:
        return TextChoice(index)


class TextChoice:
    def __init__(self, index: int):
        self.index, self.offset = index, 0

    def opening(self) -> list[dict]:
        return []

    def piece(self, piece: Piece) -> list[dict]:
        logprobs = None
        if piece.logprobs is not None:
            logprobs = text_logprobs(piece.logprobs, self.offset)
            self.offset += sum(len(e.token) for e in piece.logprobs)
        return [text_choice(piece.text, None, self.index, logprobs)]

    def closing(self, last: Piece, finish: str) -> list[dict]:
        return [text_choice("", finish, self.index)]

    def whole(self, answer, finish: str) -> dict:
        return text_choice(answer.text, finish, self.index,
                           text_logprobs(answer.logprobs) if answer.logprobs is not None else None)


TEXT = TextShape()


def _total(usage: Usage | None, more: Usage | None) -> Usage | None:
    """Usage over a request's choices: the prompt once, every choice's tokens."""
    if more is None:             # a choice that never started
        return usage
    if usage is None:
        return dataclasses.replace(more)
    return dataclasses.replace(usage, completion_tokens=usage.completion_tokens + more.completion_tokens,
                               decode_seconds=usage.decode_seconds + more.decode_seconds)


class Reply:
    """One request's answer (its n choices), streamed as SSE or returned whole."""

    def __init__(self, shape, id_: str, model: str, request: Request):
        self.shape, self.id, self.model, self.request = shape, id_, model, request
        self.created = int(time.time())
        self.state: ServerState = request.app.state.server

    def finish_reason(self, last) -> str:
        self.request.state.usage = last.usage
        self.request.state.finish = last.finish_reason
        if last.finish_reason == "cancelled" and self.state.draining:
            raise ApiError(503, "the server is shutting down; retry in a moment", "unavailable_error",
                           code="server_shutdown", headers={"Retry-After": "10"})
        if last.finish_reason == "cancelled":    # the client is still here: the time limit hit
            limit = self.state.config.request_timeout
            raise ApiError(504, f"the request took longer than the server's time limit of {limit or 0:g} s "
                           "(waiting in the queue + generating); ask for fewer tokens or retry later",
                           "timeout_error", code="request_timeout")
        return last.finish_reason

    async def whole(self, jobs: Jobs) -> Response:
        choices, usage = [], None
        async with cancel_on_disconnect(self.request, jobs):
            for index in range(jobs.n):
                answer = await collect(self.state, ERRORS, jobs.next(), self.shape.tool_use)
                if getattr(self.request.state, "client_gone", False):
                    return Response(status_code=CLIENT_GONE)    # nobody reads it; the log says who left
                finish = self.finish_reason(answer.final)
                choices.append(self.shape.choice(index).whole(answer, finish))
                usage = self.request.state.usage = _total(usage, answer.usage)
        return JSONResponse(envelope(self.id, self.shape.object, self.model, choices, self.created,
                                     usage=usage_dict(usage)))

    async def stream(self, jobs: Jobs, scheduler, include_usage: bool) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        usage = None
        try:
            for index in range(jobs.n):
                choice = self.shape.choice(index)
                job = jobs.next()
                for c in choice.opening():
                    yield self.chunk(c, **extra)
                async for piece in astream(job_events(job, scheduler), self.shape.tool_use):
                    if piece.final is None:
                        for c in choice.piece(piece):
                            yield self.chunk(c, **extra)
                        continue
                    for c in choice.closing(piece, self.finish_reason(piece.final)):
                        yield self.chunk(c, **extra)
                    usage = self.request.state.usage = _total(usage, piece.final.usage)
            if include_usage:
                yield self.chunk_dict([], usage=usage_dict(usage))
        except (ApiError, ContextFull, SequenceFailed) as e:
            e = e if isinstance(e, ApiError) else api_error(self.state, ERRORS, e)
            yield _sse(error_body(e.message, e.type, e.param, e.code))
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
