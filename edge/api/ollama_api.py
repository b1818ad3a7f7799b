"""The Ollama-compatible API: what Home Assistant's Ollama integration, Open WebUI and the
`ollama` client speak. It runs on its own port (Ollama's 11434 by default) in the same
server as the OpenAI API, over the same engine, scheduler, API key and limits: a thin
adapter over the HTTP runtime (`runtime`), side by side with the OpenAI one.

`tools` (tool calls come back with `arguments` as an object, as Ollama sends them; a `tool`
message answers the earliest open call of its `tool_name`) and `format` ("json" or a JSON
schema) go through the same chat layer and grammar engine as the OpenAI API's `tools` (with
tool_choice "auto") and `response_format`. With tools, a streamed reply comes as one line once
it is complete, so that a call never reaches the client as text.

Mapping onto the shared request: `options` (temperature, top_k, top_p, min_p,
repeat_penalty, presence/frequency_penalty, seed, num_predict, stop) become `RequestDefaults`
fields; `num_ctx` and `keep_alive` are accepted (the model always stays loaded, its context
is the server's `--ctx`); options that only tune Ollama's own runtime (threads, GPU, batch,
mmap ...) are accepted and have no effect here. Replies stream as NDJSON by default
(`"stream": false` for one object); durations are nanoseconds, as Ollama reports them.
Errors are `{"error": "..."}`; an error after streaming started is an NDJSON line.
"""
from __future__ import annotations

import functools
import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from edge.api.middleware import add_error_handlers, add_guard_and_log
from edge.api.runtime import (ApiError, JobStream, ServerState, StateDep, admit, api_error, chat_prompt,
                              check_bytes, job_events, message_bytes, ready_engine, request_params, tokenize)
from edge.engine import ContextFull, QueueFull
from edge.engine.constraint import ConstraintError, Grammar, closed
from edge.engine.engine import Usage
from edge.engine.replies import acollect, astream
from edge.engine.tool_calls import ChatRequest
from edge.launch.model_store import bundle_id
from edge.launch.request import prompt_messages

OLLAMA_VERSION = "0.6.2"        # the Ollama API version this mirrors (clients check it)
NDJSON = "application/x-ndjson"

# Ollama option -> RequestDefaults field
OPTION_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "seed": "seed", "num_predict": "max_tokens",
                 "stop": "stop"}
# Ollama options that tune its own runtime or samplers we do not have: accepted, no effect
NO_EFFECT_OPTIONS = {"num_ctx", "num_keep", "typical_p", "repeat_last_n", "penalize_newline", "numa", "num_batch",
                     "num_gpu", "main_gpu", "low_vram", "use_mmap", "use_mlock", "num_thread", "mirostat",
                     "mirostat_tau", "mirostat_eta", "tfs_z", "vocab_only", "f16_kv", "logits_all"}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[dict] | None = None
    tool_name: str | None = None


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: str | dict | None = None
    options: dict[str, Any] | None = None
    images: list[str] | None = None
    suffix: str | None = None
    keep_alive: str | int | float | None = None
    template: str | None = None
    context: list[int] | None = None
    think: bool | str | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(default_factory=list)
    stream: bool = True
    format: str | dict | None = None
    options: dict[str, Any] | None = None
    tools: list[dict] | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None


class ModelBody(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model: str | None = None
    name: str | None = None          # older clients send "name"

    @property
    def wanted(self) -> str:
        if not (self.model or self.name):
            raise ApiError(400, "model is required")
        return self.model or self.name


# --- the app -----------------------------------------------------------------------------

# the engine's refusals in Ollama's terms (its errors are one string; type and code unused)
ERRORS = {ContextFull: (400, "invalid_request_error", None), QueueFull: (429, "rate_limit_error", None)}


def error(status: int, message: str, **_) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def named(exc: ApiError) -> str:
    """Ollama's errors are one string: it names the field the OpenAI shape carries apart."""
    return f"{exc.param}: {exc.message}" if exc.param and exc.param not in exc.message else exc.message


def render(exc: ApiError) -> JSONResponse:
    return error(exc.status, named(exc))


def create_ollama_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="edge-llm (Ollama API)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.include_router(router)
    add_error_handlers(app, render)
    add_guard_and_log(app, state, error)
    return JsonBodies(app)


class JsonBodies:
    """Ollama reads every POST body as JSON whatever its Content-Type, and its own examples
    (`curl ... -d '{...}'`) send form-encoded headers: say JSON where the client did not."""

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name):          # the FastAPI app's attributes (state, routes, ...)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


router = APIRouter()


@router.get("/")
def root():
    return Response("Ollama is running", media_type="text/plain")


@router.get("/api/version")
def version():
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
def tags(state: StateDep):
    return {"models": [_model_entry(state)] if state.ready else []}


@router.get("/api/ps")
def ps(state: StateDep):
    if not state.ready:
        return {"models": []}
    entry = _model_entry(state)
    entry.update(expires_at="9999-12-31T23:59:59Z", size_vram=0)     # always loaded, on the CPU
    return {"models": [entry]}


@router.post("/api/show")
def show(body: ModelBody, state: StateDep):
    engine = _engine_for(state, body.wanted)
    cfg = engine.config
    prefix = "llama"
    return {
        "modelfile": f"# edge-llm bundle {engine.bundle.path.name}\nFROM {engine.name}\n",
        "parameters": f"num_ctx {engine.max_ctx}",
        "template": engine.bundle.manifest.get("chat_template") or "",
        "details": _details(state),
        "model_info": {"general.architecture": prefix, "general.parameter_count": cfg.parameter_count,
                       f"{prefix}.context_length": engine.max_ctx,
                       f"{prefix}.embedding_length": cfg.hidden_size,
                       f"{prefix}.block_count": cfg.num_layers,
                       f"{prefix}.attention.head_count": cfg.num_heads,
                       f"{prefix}.attention.head_count_kv": cfg.num_kv_heads,
                       f"{prefix}.vocab_size": cfg.vocab_size},
        "capabilities": ["completion"],
        "modified_at": _modified_at(state),
    }


@router.post("/api/pull")
@router.post("/api/create")
def pull(body: ModelBody, state: StateDep):
    """Nothing is downloaded here: success for the installed model, a clear error otherwise."""
    _engine_for(state, body.wanted, hint="this server runs one installed model and downloads nothing; "
                                         "convert another with `edge-llm convert` and restart with --model")
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
async def chat(body: ChatBody, state: StateDep):
    engine = _engine_for(state, body.model)
    if any(m.images for m in body.messages):
        raise ApiError(400, "images are not supported: this model reads text only")
    messages = chat_messages(body.messages)
    if not messages:       # Ollama: an empty chat loads the model and returns at once
        return _loaded(state, {"message": {"role": "assistant", "content": ""}})
    nbytes = message_bytes(messages)
    check_bytes(engine, nbytes, "messages")
    grammar = format_grammar(body.format)
    with admit(state, ERRORS) as ticket:
        chat = await tokenize(state, functools.partial(chat_prompt, engine, tools=body.tools, response_format=grammar),
                              messages, "messages", nbytes)
        return await _respond(state, body, chat.ids, "messages", ticket, _chat_message, chat)


@router.post("/api/generate")
async def generate(body: GenerateBody, state: StateDep):
    engine = _engine_for(state, body.model)
    if body.images:
        raise ApiError(400, "images are not supported: this model reads text only")
    if body.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported by this model")
    if body.template:
        raise ApiError(400, "a custom template is not supported; the model's own chat template is used "
                            "(or send raw: true with the whole prompt)")
    grammar = format_grammar(body.format)
    if grammar is not None:
        _check_grammar(engine, grammar)
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
        return await _respond(state, body, ids, "prompt", ticket, lambda text, calls=(): {"response": text},
                              constraint=grammar)


# --- Ollama's request -> the chat layer and the launch layer's request ------------------------

def chat_messages(messages: list[Message]) -> list[dict]:
    """Ollama's messages as the chat layer takes them (the chat template's messages): a call
    keeps its arguments as an object and gets an id, and a `tool` message answers the earliest
    unanswered call (of its `tool_name`, when it says)."""
    out, open_calls, n = [], [], 0
    for m in messages:
        msg = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ApiError(400, "messages: a tool call needs function.name")
                n += 1
                calls.append({"id": f"call_{n}", "type": "function",
                              "function": {"name": fn["name"], "arguments": fn.get("arguments") or {}}})
            msg["tool_calls"] = calls
            open_calls += [(c["id"], c["function"]["name"]) for c in calls]
        if m.role == "tool":
            match = next((c for c in open_calls if m.tool_name in (None, c[1])), None)
            if match is None:
                raise ApiError(400, "messages: a tool message answers no earlier tool call")
            open_calls.remove(match)
            msg["tool_call_id"] = match[0]
        out.append(msg)
    return out


def format_grammar(fmt) -> Grammar | None:
    """Ollama's `format` ("json" or a JSON schema, held to its properties) as a grammar."""
    if fmt in (None, ""):
        return None
    if fmt != "json" and not isinstance(fmt, dict):
        raise ApiError(400, f'format must be "json" or a JSON schema object, got {fmt!r}')
    try:
        return Grammar.json_object("format") if fmt == "json" else Grammar.json_schema(closed(fmt), "format")
    except ConstraintError as e:
        raise ApiError(400, f"format: {e}") from e


def _check_grammar(engine, grammar: Grammar) -> None:
    try:
        engine.check_grammar(grammar)
    except ConstraintError as e:
        raise ApiError(400, f"format: {e}") from e


def _chat_message(text: str, calls=()) -> dict:
    message = {"role": "assistant", "content": text}
    if calls:       # Ollama sends arguments as an object
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return {"message": message}


def overrides(options: dict | None) -> dict:
    """Ollama `options` -> RequestDefaults fields; unknown names are refused by name."""
    options = options or {}
    unknown = sorted(set(options) - OPTION_FIELDS.keys() - NO_EFFECT_OPTIONS)
    if unknown:
        raise ApiError(400, f"unknown option(s): {', '.join(unknown)}")
    out = {OPTION_FIELDS[k]: v for k, v in options.items() if k in OPTION_FIELDS}
    if isinstance(out.get("max_tokens"), int) and out["max_tokens"] in (-1, -2):
        out["max_tokens"] = None          # Ollama: -1 = no limit, -2 = fill the context
    if out.get("max_tokens") == 0:
        raise ApiError(400, "num_predict must be at least 1 (or -1 for no limit)")
    return out


# --- the job's pieces -> Ollama's replies (NDJSON or one object) ------------------------------

async def _respond(state: ServerState, body, ids: list[int], param: str, ticket, shape,
                   chat: ChatRequest | None = None, **extra):
    """`shape(text, calls)` is the reply's content; with tools, the text is held back until the
    end (a call must not reach the client as text) and parsed into calls there."""
    t0 = time.perf_counter()
    if chat is not None:
        extra.update(chat.overrides())
    params = request_params(state, ids, param, **overrides(body.options), **extra)
    job = state.scheduler.submit(ids, params, time_limit=state.config.request_timeout, ticket=ticket)
    model = body.model
    tool_use = chat.tool_use if chat is not None and chat.tool_use is not None and chat.tool_use.active else None
    if body.stream and tool_use is None:
        return JobStream(job, _ndjson(state, job, model, shape, t0), media_type=NDJSON)
    try:
        answer = await acollect(job_events(job, state.limiter), tool_use)
    except ContextFull as e:
        raise api_error(state, ERRORS, e) from e
    finally:
        job.cancel()          # a client that left stops its generation; a finished job ignores it
    content = shape(answer.content or "", answer.tool_calls)
    if body.stream:           # tools: the whole answer as one line, then the final one
        return Response(_line({"model": model, "created_at": _now(), **content, "done": False})
                        + _line(_final(model, shape("", ()), answer.final, t0)), media_type=NDJSON)
    return JSONResponse(_final(model, content, answer.final, t0))


async def _ndjson(state: ServerState, job, model: str, shape, t0: float) -> AsyncIterator[str]:
    try:
        async for piece in astream(job_events(job, state.limiter)):
            if piece.final is not None:
                yield _line(_final(model, shape(""), piece.final, t0))
            elif piece.text:
                yield _line({"model": model, "created_at": _now(), **shape(piece.text), "done": False})
    except ContextFull as e:
        yield _line({"error": named(api_error(state, ERRORS, e))})
    except Exception as e:        # mid-stream: the status is sent already, so say it in the stream
        yield _line({"error": f"generation failed: {e}"})


def _final(model: str, content: dict, last, t0: float) -> dict:
    usage = last.usage or Usage()          # a job cancelled before it started has none
    reason = {"stop": "stop", "length": "length", "cancelled": "stop"}.get(last.finish_reason, last.finish_reason)
    ns = lambda s: int(s * 1e9)
    return {"model": model, "created_at": _now(), **content, "done": True, "done_reason": reason,
            "total_duration": ns(time.perf_counter() - t0), "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": ns(usage.time_to_first_token),
            "eval_count": usage.completion_tokens, "eval_duration": ns(usage.decode_seconds)}


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _loaded(state: ServerState, content: dict) -> JSONResponse:
    return JSONResponse({"model": state.model_id, "created_at": _now(), **content, "done": True,
                         "done_reason": "load"})


# --- the one model, by Ollama's names ------------------------------------------------------

def model_names(state: ServerState) -> set[str]:
    """What a client may call the model: its id, with or without Ollama's ":latest" tag,
    in any case."""
    base = state.model_id.lower()
    return {base, f"{base}:latest"}


def _engine_for(state: ServerState, name: str, hint: str = ""):
    engine = ready_engine(state)
    if (name or "").lower() not in model_names(state):
        raise ApiError(404, f"model '{name}' not found; this server runs '{_tag(state)}'"
                            + (f" ({hint})" if hint else ""))
    return engine


def _tag(state: ServerState) -> str:
    return f"{state.model_id}:latest"


def _model_entry(state: ServerState) -> dict:
    bundle = state.engine.bundle
    files = bundle.manifest["files"]
    return {"name": _tag(state), "model": _tag(state), "modified_at": _modified_at(state),
            "size": sum(f["size"] for f in files.values()),
            "digest": bundle_id(bundle),
            "details": _details(state)}


def _details(state: ServerState) -> dict:
    cfg = state.engine.config
    n = cfg.parameter_count
    return {"parent_model": "", "format": "tflite", "family": "llama", "families": ["llama"],
            "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
            "quantization_level": state.engine.bundle.quant}


def _modified_at(state: ServerState) -> str:
    mtime = (state.engine.bundle.path / "manifest.json").stat().st_mtime
    return datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
