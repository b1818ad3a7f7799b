"""Which web pages may use the HTTP APIs: an ASGI middleware checking the `Origin` header.

A browser lets any page send a "simple" cross-site request (POST with a text/plain,
form or multipart body) without asking the server first; it only hides the answer. A
server that reads such a body as JSON runs the request. Browsers name the page in
`Origin` on every cross-origin request (and on same-origin POSTs), so the server refuses
what comes from pages it does not know, as Ollama does with `OLLAMA_ORIGINS`:

- a request without `Origin` (curl, Python clients, Home Assistant) is not from a page: allowed;
- the page's own origin (`http://` or `https://` + the request's Host: the chat page) is allowed;
- loopback origins at any port (http/https on localhost, 127.0.0.1, [::1], 0.0.0.0) and the
  origins of local apps Ollama allows (app://, file://, tauri://, vscode-webview://,
  vscode-file://, browser extensions) are allowed;
- `--allow-origin` adds more, with Ollama's syntax: comma-separated, each an exact origin
  (`https://ha.example:8123`) or one `*` matching any text (`https://*.example`,
  `http://192.168.1.*`); a lone `*` allows every origin;
- any other origin (including `null`, sent by sandboxed frames and data: pages) gets 403 in
  the API's error shape, before the request is read.

A body is sent as JSON only with a JSON Content-Type; a browser request (it has `Origin`,
or a `Sec-Fetch-Site` other than same-origin/none) whose body is not declared JSON gets 415
unless its origin is allowed, so a form or text/plain body can never start a generation
from a page that the check above could not place.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

log = logging.getLogger("edge.http")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
LOCAL_APP_ORIGINS = ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
                     "chrome-extension://*", "moz-extension://*", "safari-web-extension://*",
                     "ms-browser-extension://*")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def default_origins() -> list[str]:
    """Loopback origins at any port, and the local-app schemes Ollama allows by default."""
    out = []
    for host in LOOPBACK_HOSTS:
        for scheme in ("http", "https"):
            out += [f"{scheme}://{host}", f"{scheme}://{host}:*"]
    return out + list(LOCAL_APP_ORIGINS)


def parse_origins(values: Iterable[str]) -> list[str]:
    """`--allow-origin` values (each may be a comma-separated list, as OLLAMA_ORIGINS is) as
    a list of patterns; ValueError for one that is neither `*` nor SCHEME://... with at most
    one `*`."""
    out = []
    for value in values:
        for item in value.split(","):
            item = item.strip().strip("\"'").rstrip("/").lower()
            if not item:
                continue
            if item != "*" and ("://" not in item or item.count("*") > 1):
                raise ValueError(f"--allow-origin {item!r}: an origin is SCHEME://HOST[:PORT] with at most one '*' "
                                 "(e.g. https://ha.example:8123, http://192.168.1.*), or '*' for any")
            out.append(item)
    return out


class OriginPolicy:
    """The allow-list: exact origins and one-`*` patterns (prefix + suffix)."""

    def __init__(self, extra: Iterable[str] = (), defaults: bool = True):
        patterns = (default_origins() if defaults else []) + parse_origins(extra)
        self.any = "*" in patterns
        self.exact = frozenset(p for p in patterns if "*" not in p)
        self.wild = tuple(tuple(p.split("*", 1)) for p in patterns if "*" in p and p != "*")

    def allows(self, origin: str, host: str | None = None) -> bool:
        origin = origin.strip().lower()
        if self.any or origin in self.exact:
            return True
        if host and origin in (f"http://{host.lower()}", f"https://{host.lower()}"):
            return True                                  # the page's own origin: same-origin
        return any(len(origin) >= len(a) + len(b) and origin.startswith(a) and origin.endswith(b)
                   for a, b in self.wild)


def guard_origins(app, config, error) -> "OriginMiddleware":
    """`app` behind the policy of a `runtime.ServerConfig`: the defaults, its `allowed_origins`
    and its `cors_origins` (a page allowed to read answers may also send requests)."""
    return OriginMiddleware(app, OriginPolicy([*config.allowed_origins, *config.cors_origins]), error)


class HttpWrapper:
    """An ASGI app wrapped around another: HTTP requests go through `http`, anything else
    (lifespan, websockets) straight to the wrapped app, whose attributes (state, routes, ...)
    it shows as its own."""

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self.http(scope, receive, send)

    async def http(self, scope, receive, send) -> None:
        raise NotImplementedError


class OriginMiddleware(HttpWrapper):
    """ASGI middleware applying `policy` to every HTTP request, outermost (it must see the
    Content-Type the client sent). `error(status, message, type_=, code=)` renders a refusal
    in the API's own shape, as for `middleware.Guard`."""

    def __init__(self, app, policy: OriginPolicy, error: Callable):
        super().__init__(app)
        self.policy, self.error = policy, error

    async def http(self, scope, receive, send):
        refusal = self.refusal(scope)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code = refusal
        log.warning("%s %s refused (%d): %s", scope.get("method"), scope.get("path"), status, message)
        type_ = "permission_error" if status == 403 else "invalid_request_error"
        await self.error(status, message, type_=type_, code=code)(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str, str] | None:
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.lower(), v.decode("latin-1"))
        origin, host = headers.get(b"origin"), headers.get(b"host")
        if origin is not None:
            if self.policy.allows(origin, host):
                return None
            return (403, f"requests from the web origin {origin!r} are not allowed; the server's operator can allow "
                         "it with --allow-origin", "origin_not_allowed")
        if scope.get("method", "GET") in SAFE_METHODS or is_json(headers.get(b"content-type")):
            return None
        site = headers.get(b"sec-fetch-site", "none").strip().lower()
        if site in ("none", "same-origin"):
            return None                                  # not a browser, or the page's own request
        return (415, "a request body from a web page must be sent as Content-Type: application/json",
                "unsupported_media_type")


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
