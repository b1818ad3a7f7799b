"""The Ollama-compatible API: what Home Assistant's Ollama integration, Open WebUI and the
`ollama` client speak. It runs on its own port (Ollama's 11434 by default) in the same
server as the OpenAI API, over the same engine, scheduler, API key and limits: a thin
adapter over the HTTP runtime (`runtime`), side by side with the OpenAI one.

`tools` (tool calls come back with `arguments` as an object, as Ollama sends them; a `tool`
message answers the earliest open call of its `tool_name`) and `format` ("json" or a JSON
schema) go through the same chat layer and grammar engine as the OpenAI API's `tools` (with
tool_choice "auto") and `response_format`. With tools, a streamed reply shows its prose as it
is generated and holds back only what may become a call (`CallStream`); calls come in a line
of their own at the end. A call answered earlier in the turn is not generated again (the
tool-loop guard; `"tool_loop_guard": false` in the request turns it off).

Mapping onto the shared request: `options` (temperature, top_k, top_p, min_p,
repeat_penalty, presence/frequency_penalty, seed, num_predict, stop) become `RequestDefaults`
fields; `num_ctx` bounds the request's context (up to the server's `--ctx`): a conversation
that does not fit loses its oldest non-system messages, as Ollama drops them, and the log
says so. `model` names the served model or another installed one, loaded on demand
(`edge.api.models`); `keep_alive` is Ollama's (how long the model stays loaded after this
request; 0 with an empty prompt or no messages unloads it at once, as `ollama stop` asks). Options that only tune
Ollama's own runtime (threads, GPU, batch, mmap ...) and options we do not know are ignored,
the unknown ones with a log line, as Ollama ignores them. Replies stream as NDJSON by default
(`"stream": false` for one object); durations are nanoseconds, as Ollama reports them.
Errors are `{"error": "..."}`; an error after streaming started is an NDJSON line.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from edge.api.middleware import Contained, new_app
from edge.api.ollama_request import chat_messages, check_format, context_size, fitted_prompt, format_grammar, overrides
from edge.api.ollama_models import FOREVER_AT, bundle_at, details, installed_bundles, iso, model_entry, modified_at
from edge.api.origins import HttpWrapper, guard_origins
from edge.api.text import UnicodeBody
from edge.api.models import (ModelView, ReleaseModels, keep_alive_seconds, live, model_error, ready, resolve_key,
                             unload, using)
from edge.api.runtime import (CLIENT_GONE, ApiError, JobStream, ServerState, StateDep, admit, api_error,
                              chat_prompt, check_bytes, job_events, loop_guard, message_bytes,
                              request_params, tokenize, whole_answer)
from edge.engine import ContextFull, QueueFull, RequestFailed, SequenceFailed
from edge.engine.engine import Usage
from edge.engine.replies import astream
from edge.engine.tool_calls import ChatRequest
from edge.launch.request import prompt_messages

log = logging.getLogger("edge.ollama")

OLLAMA_VERSION = "0.6.2"        # the Ollama API version this mirrors (clients check it)
NDJSON = "application/x-ndjson"



class Body(UnicodeBody):
    model_config = ConfigDict(extra="ignore")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[dict] | None = None
    tool_name: str | None = None


class GenerateBody(Body):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: str | dict | None = None
    options: dict[str, Any] | None = None
    images: list[str] | None = None
    suffix: str | None = None
    keep_alive: Any = None               # Ollama's duration or seconds: edge.launch.loaded_models.parse_keep_alive
    template: str | None = None
    context: list[int] | None = None
    think: bool | str | None = None


class ChatBody(Body):
    model: str
    messages: list[Message] = Field(default_factory=list)
    stream: bool = True
    format: str | dict | None = None
    options: dict[str, Any] | None = None
    tools: list[dict] | None = None
    keep_alive: Any = None               # Ollama's duration or seconds: edge.launch.loaded_models.parse_keep_alive
    think: bool | str | None = None
    tool_loop_guard: bool | None = None     # ours: False lets a call answered in this turn be made again


class ModelBody(Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model: str | None = None
    name: str | None = None          # older clients send "name"

    @property
    def wanted(self) -> str:
        if not (self.model or self.name):
            raise ApiError(400, "model is required")
        return self.model or self.name


class PullBody(ModelBody):
    stream: bool = True
    insecure: bool = False


# --- the app -----------------------------------------------------------------------------

# the engine's refusals in Ollama's terms (its errors are one string; type and code unused)
ERRORS = {ContextFull: (400, "invalid_request_error", None), QueueFull: (429, "rate_limit_error", None),
          RequestFailed: (400, "invalid_request_error", None), SequenceFailed: (500, "server_error", None)}


def error(status: int, message: str, **_) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def named(exc: ApiError) -> str:
    """Ollama's errors are one string: it names the field the OpenAI shape carries apart."""
    return f"{exc.param}: {exc.message}" if exc.param and exc.param not in exc.message else exc.message


def render(exc: ApiError) -> JSONResponse:
    return error(exc.status, named(exc))


def create_ollama_app(state: ServerState) -> FastAPI:
    app = new_app(state, "edge-llm (Ollama API)", [router], render, error)
    return ReleaseModels(guard_origins(Contained(JsonBodies(app)), state.config, error), state)


class JsonBodies(HttpWrapper):
    """Ollama reads every POST body as JSON whatever its Content-Type, and its own examples
    (`curl ... -d '{...}'`) send form-encoded headers: say JSON where the client did not."""

    async def http(self, scope, receive, send):
        if scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


router = APIRouter()


@router.head("/")
@router.get("/")
def root():
    return Response("Ollama is running", media_type="text/plain")


@router.get("/api/version")
def version():
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
def tags(state: StateDep):
    """The served model, then every other installed one (`edge-llm models`)."""
    if not state.ready:
        return {"models": []}
    out, seen = [], set()
    for bundle in [b for b in (bundle_at(state, state.default_key),) if b is not None] + installed_bundles():
        key = str(bundle.path.resolve())
        if key not in seen:
            seen.add(key)
            out.append(model_entry(bundle, state.model_id if key == state.default_key else bundle.path.name))
    return {"models": out}


@router.get("/api/ps")
def ps(state: StateDep):
    """What is loaded: size is its weights and KV caches; expires_at when it unloads if no
    request comes (a far date: it stays)."""
    out = []
    for e in live(state):
        entry = model_entry(e.engine.bundle, e.name)
        until = e.expires_wall()
        entry.update(size=e.size, size_vram=0, expires_at=iso(until) if until is not None else FOREVER_AT)
        out.append(entry)
    return {"models": out}


@router.post("/api/show")
def show(body: ModelBody, state: StateDep):
    ready(state)
    key = resolve_key(state, body.wanted)
    if key is None:
        raise model_error(state, body.wanted)
    loaded = state.models.get(key)
    bundle = loaded.engine.bundle if loaded is not None and loaded.engine is not None else bundle_at(state, key)
    cfg = bundle.config
    ctx = loaded.engine.max_ctx if loaded is not None and loaded.engine is not None else \
        min(cfg.max_position_embeddings, state.engine.max_ctx if state.engine is not None else cfg.max_position_embeddings)
    prefix = "llama"
    return {
        "modelfile": f"# edge-llm bundle {bundle.path.name}\nFROM {bundle.name}\n",
        "parameters": f"num_ctx {ctx}",
        "template": bundle.manifest.get("chat_template") or "",
        "details": details(bundle),
        "model_info": {"general.architecture": prefix, "general.parameter_count": cfg.parameter_count,
                       f"{prefix}.context_length": ctx,
                       f"{prefix}.embedding_length": cfg.hidden_size,
                       f"{prefix}.block_count": cfg.num_layers,
                       f"{prefix}.attention.head_count": cfg.num_heads,
                       f"{prefix}.attention.head_count_kv": cfg.num_kv_heads,
                       f"{prefix}.vocab_size": cfg.vocab_size},
        "capabilities": ["completion", "tools"],      # tools: the template's own, or our prompt + grammar
        "modified_at": modified_at(bundle),
    }


@router.post("/api/pull")
async def pull(body: PullBody, state: StateDep):
    """An installed model (the loaded one, another, an alias): success at once. A Hugging Face
    repository (OWNER/NAME[:QUANT], hf.co/...): `edge-llm pull` in a child process (the
    conversion's memory goes back to the system when it ends), its progress streamed in
    Ollama's lines: pulling manifest, pulling <digest> with total/completed, verifying sha256
    digest, success; a failure is an {"error"} line (or a 4xx/5xx without streaming)."""
    from edge.api import pulling
    return await pulling.respond(state, body.wanted, body.stream)


@router.post("/api/create")
def create(body: ModelBody, state: StateDep):
    """Nothing is built here: success for an installed model, a clear error otherwise."""
    ready(state)
    if (err := model_error(state, body.wanted, "this server builds no models; use edge-llm pull or edge-llm convert")):
        raise err
    return {"status": "success"}


@router.post("/api/embed")
@router.post("/api/embeddings")
def embed():
    raise ApiError(501, "embeddings are not supported by edge-llm (it serves a generative model only)")


@router.delete("/api/delete")
@router.post("/api/copy")
@router.post("/api/push")
def manage():
    raise ApiError(501, "edge-llm does not manage models over the API; use `edge-llm convert` on the Pi")


@router.post("/api/chat")
async def chat(body: ChatBody, request: Request, state: StateDep):
    if not body.messages and keep_alive_seconds(body.keep_alive) == 0:     # Ollama: unload it
        return await _unloaded(state, body.model, {"message": {"role": "assistant", "content": ""}})
    state = await using(request, state, body.model, body.keep_alive)
    engine = state.engine
    if any(m.images for m in body.messages):
        raise ApiError(400, "images are not supported: this model reads text only")
    messages = chat_messages(body.messages)
    if not messages:       # Ollama: an empty chat loads the model and returns at once
        return _loaded(state, {"message": {"role": "assistant", "content": ""}})
    nbytes = message_bytes(messages)
    check_bytes(engine, nbytes, "messages")
    grammar = format_grammar(body.format)
    ctx = context_size(engine, body.options)
    with admit(state, ERRORS) as ticket:
        prompt = functools.partial(chat_prompt, engine, tools=body.tools, response_format=grammar,
                                   tool_loop_guard=loop_guard(state, body.tool_loop_guard), clock_last=state.config.clock_last)
        chat = await tokenize(state, functools.partial(fitted_prompt, prompt, ctx), messages, "messages", nbytes)
        return await _respond(state, request, body, chat.ids, "messages", ticket, _chat_message, chat, ctx=ctx)


@router.post("/api/generate")
async def generate(body: GenerateBody, request: Request, state: StateDep):
    if not body.prompt and keep_alive_seconds(body.keep_alive) == 0:       # Ollama: unload it
        return await _unloaded(state, body.model, {"response": ""})
    state = await using(request, state, body.model, body.keep_alive)
    engine = state.engine
    if body.images:
        raise ApiError(400, "images are not supported: this model reads text only")
    if body.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported by this model")
    if body.template:
        raise ApiError(400, "a custom template is not supported; the model's own chat template is used "
                            "(or send raw: true with the whole prompt)")
    grammar = format_grammar(body.format)
    if grammar is not None:
        check_format(engine, grammar)
    if not body.prompt:
        return _loaded(state, {"response": ""})
    nbytes = len(body.prompt.encode()) + len((body.system or "").encode())
    check_bytes(engine, nbytes, "prompt")
    with admit(state, ERRORS) as ticket:
        if body.raw:
            ids = await tokenize(state, engine.encode_text, body.prompt, "prompt", nbytes)
        else:
            ids = await tokenize(state, engine.encode_chat, prompt_messages(body.prompt, body.system), "prompt",
                                 nbytes)
        return await _respond(state, request, body, ids, "prompt", ticket, lambda text, calls=(): {"response": text},
                              constraint=grammar)


# --- the job's pieces -> Ollama's replies (NDJSON or one object) ------------------------------

def _chat_message(text: str, calls=()) -> dict:
    message = {"role": "assistant", "content": text}
    if calls:       # Ollama sends arguments as an object
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return {"message": message}



async def _respond(state: ServerState, request: Request, body, ids: list[int], param: str, ticket, shape,
                   chat: ChatRequest | None = None, ctx: int | None = None, **extra):
    """`shape(text, calls)` is the reply's content; with tools, text that may become a call is
    held back (a call must not reach the client as text) and parsed into calls at the end.
    `ctx`: the request's own context (`num_ctx`), which bounds the reply too."""
    t0 = time.perf_counter()
    if chat is not None:
        extra.update(chat.overrides())
    fields = overrides(body.options)
    if ctx is not None and ctx < state.engine.max_ctx:
        room = max(1, ctx - len(ids))
        fields["max_tokens"] = min(fields.get("max_tokens") or room, room)
    params = request_params(state, ids, param, **fields, **extra)
    job = state.scheduler.submit(ids, params, time_limit=state.config.request_timeout, ticket=ticket)
    model = body.model
    tool_use = chat.tool_use if chat is not None and chat.tool_use is not None and chat.tool_use.active else None
    if body.stream:
        return JobStream(job, _ndjson(state, request, job, model, shape, t0, tool_use), media_type=NDJSON)
    answer = await whole_answer(request, state, ERRORS, job, tool_use)
    if getattr(request.state, "client_gone", False):
        return Response(status_code=CLIENT_GONE)          # nobody reads it; the log says who left
    reason = done_reason(state, request, answer.final)
    content = shape(answer.content or "", answer.tool_calls)
    return JSONResponse(_final(model, content, answer.final, t0, reason))


SHUTDOWN = "shutdown"         # done_reason of an answer cut short because the server stops


def done_reason(state: ServerState, request: Request, last) -> str:
    """The final event's reason in Ollama's terms, noted for the request log. A job cancelled
    by the shutdown that had generated something ends with done_reason "shutdown"; one that
    had not (it waited) is a 503, and one ended by the time limit a 504 (ApiError)."""
    request.state.usage, request.state.finish = last.usage, last.finish_reason
    if last.finish_reason != "cancelled":
        return last.finish_reason
    generated = last.usage is not None and last.usage.completion_tokens > 0
    if state.draining and generated:
        return SHUTDOWN
    if state.draining:
        raise ApiError(503, "the server is shutting down; retry in a moment", "unavailable_error",
                       code="server_shutdown", headers={"Retry-After": "10"})
    limit = state.config.request_timeout
    raise ApiError(504, f"the request took longer than the server's time limit of {limit or 0:g} s (waiting in "
                        "the queue + generating); ask for fewer tokens or retry later", "timeout_error",
                   code="request_timeout")


async def _ndjson(state: ServerState, request: Request, job, model: str, shape, t0: float,
                  tool_use=None) -> AsyncIterator[str]:
    """Prose as it is generated; with tools, the calls in a line of their own before the last."""
    try:
        async for piece in astream(job_events(job, state.scheduler), tool_use):
            if piece.text:
                yield _line({"model": model, "created_at": _now(), **shape(piece.text), "done": False})
            if piece.final is not None:
                if piece.tool_calls:
                    yield _line({"model": model, "created_at": _now(), **shape("", piece.tool_calls), "done": False})
                yield _line(_final(model, shape(""), piece.final, t0, done_reason(state, request, piece.final)))
    except (ApiError, ContextFull, SequenceFailed) as e:      # the status is sent already: say it in the stream
        yield _line({"error": named(e if isinstance(e, ApiError) else api_error(state, ERRORS, e))})
    except (asyncio.CancelledError, GeneratorExit):
        request.state.client_gone = True
        raise
    except Exception:
        log.exception("request %s failed while streaming", getattr(request.state, "request_id", "?"))
        request.state.failed = True
        yield _line({"error": "internal server error (see the server log)"})


def _final(model: str, content: dict, last, t0: float, reason: str) -> dict:
    usage = last.usage or Usage()          # a job cancelled before it started has none
    ns = lambda s: int(s * 1e9)
    return {"model": model, "created_at": _now(), **content, "done": True, "done_reason": reason,
            "total_duration": ns(time.perf_counter() - t0), "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": ns(usage.time_to_first_token),
            "eval_count": usage.completion_tokens, "eval_duration": ns(usage.decode_seconds)}


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _loaded(state: ModelView, content: dict) -> JSONResponse:
    return JSONResponse({"model": state.model_id, "created_at": _now(), **content, "done": True,
                         "done_reason": "load"})


async def _unloaded(state: ServerState, name: str, content: dict) -> JSONResponse:
    entry = await unload(state, name)
    return JSONResponse({"model": entry.name if entry is not None else name, "created_at": _now(), **content, "done": True, "done_reason": "unload"})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
