"""What both HTTP APIs put around their routes: pure ASGI middleware (so that streaming is
untouched) and the error handlers.

- `Guard`: the Host header (DNS rebinding), the API key and the request body cap, before any
  route runs; a refusal is rendered in the API's own shape by the adapter's `error`.
- `RequestLog`: the request id, one log line per request (id, tokens, cached tokens, ttft,
  tokens/s, status; prompt text only with `log_prompts`) and the request counter by status.
- `Contained`: an error answered with a 500 keeps the connection usable.
- `add_error_handlers`: every error, whoever raises it (validation, routing, the engine, a
  bug), becomes an `ApiError` the adapter renders; pydantic's error list becomes one readable
  message naming the field (`validation_message`).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge.api import chat_page
from edge.api.origins import HttpWrapper
from edge.api.runtime import CLIENT_GONE, ApiError, ServerState

log = logging.getLogger("edge.http")

QUIET_PATHS = ("/health", "/metrics")     # logged at DEBUG: probes and scrapes come every few seconds
OPEN_PATHS = ("/health", *chat_page.PAGE_PATHS)   # without the API key: probes, and the chat page (its JS sends the key)


# --- errors ------------------------------------------------------------------------------

def add_error_handlers(app: FastAPI, render) -> None:
    """`render(ApiError) -> Response` in the API's own shape, for every error of the app."""
    app.add_exception_handler(ApiError, lambda request, exc: render(exc))

    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path}: no such endpoint"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        return render(ApiError(exc.status_code, message, ERROR_TYPES.get(exc.status_code, "server_error"),
                               headers=getattr(exc, "headers", None)))

    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return render(ApiError(400, message, param=param))

    async def internal_error(request: Request, exc: Exception):
        log.error("request %s failed", getattr(request.state, "request_id", "?"), exc_info=exc)
        return render(ApiError(500, "internal server error (see the server log)", "server_error"))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


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


# --- middleware --------------------------------------------------------------------------

class Guard:
    """Host, API key and request body cap, before any route runs. `error(status, message, **kw)`
    renders a refusal in the API's own shape."""

    def __init__(self, app, state: ServerState, error):
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
        return self.error(403, f"Host {host!r} is not allowed: this server is bound to loopback and answers "
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


class Contained(HttpWrapper):
    """The outermost wrapper of an app: an exception that escapes after its 500 went out (the
    error handler has logged it and answered, and Starlette raises it again for the server)
    stops here, so that uvicorn keeps the keep-alive connection instead of closing it."""

    async def http(self, scope, receive, send):
        answered = False

        async def watched(message):
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)
        try:
            await self.app(scope, receive, watched)
        except Exception:
            if not answered:
                raise


def add_guard_and_log(app: FastAPI, state: ServerState, error) -> None:
    """Guard inside RequestLog, so that the log and the counter see every refusal too."""
    app.add_middleware(Guard, state=state, error=error)
    app.add_middleware(RequestLog, state=state)


def new_app(state: ServerState, title: str, routers: list, render, error) -> FastAPI:
    """An API's app over `state`: its routers, its error handlers (`render`) and the guard and
    request log (`error` renders their refusals); no generated docs."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    for router in routers:
        app.include_router(router)
    add_error_handlers(app, render)
    add_guard_and_log(app, state, error)
    return app
