"""The chat page at `/`: one HTML/JS/CSS set shipped as package data (edge/api/static/),
no build step, no CDN. Replies are rendered as markdown in the browser by libraries vendored
into static/ (marked, DOMPurify, highlight.js; their licences in static/LICENSES.txt). The page is a client of the OpenAI API like any other: it streams
/v1/chat/completions and /v1/completions and aborts the fetch to stop (the API cancels a job
whose client went away). Its files are public; the API behind it still needs the key, which
the page's own script sends.

The Content-Security-Policy allows scripts, styles and connections to this origin only, so
even a rendering mistake could not run a model's `<script>` or load anything from outside.
"""
from __future__ import annotations

import json
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from edge.launch.request import DEFAULT_PAGE_MAX_TOKENS

JS, CSS = "text/javascript; charset=utf-8", "text/css; charset=utf-8"
PAGE_FILES = {               # URL path -> (file in edge/api/static, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/favicon.ico": ("favicon.ico", "image/x-icon"),
    "/static/app.js": ("app.js", JS),
    "/static/render.js": ("render.js", JS),
    "/static/marked.umd.js": ("marked.umd.js", JS),
    "/static/purify.min.js": ("purify.min.js", JS),
    "/static/highlight.min.js": ("highlight.min.js", JS),
    "/static/style.css": ("style.css", CSS),
    "/static/highlight-github-dark.min.css": ("highlight-github-dark.min.css", CSS),
    "/static/LICENSES.txt": ("LICENSES.txt", "text/plain; charset=utf-8"),
}
DEFAULTS_PATH = "/static/defaults.json"     # the page's reply budget, from edge.launch
PAGE_PATHS = (*PAGE_FILES, DEFAULTS_PATH)   # served without the API key
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter()


def _read(name: str) -> bytes:
    return (resources.files("edge.api") / "static" / name).read_bytes()


HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}


def _route(path: str, name: str, media_type: str):
    def serve_file() -> Response:
        return Response(_read(name), media_type=media_type, headers=HEADERS)
    router.add_api_route(path, serve_file, methods=["GET"], include_in_schema=False, name=f"page:{name}")


for _path, (_name, _type) in PAGE_FILES.items():
    _route(_path, _name, _type)


@router.get(DEFAULTS_PATH, include_in_schema=False)
def page_defaults(request: Request) -> Response:
    """The reply budget the page sends when its Max tokens field is empty: the page's default,
    or the server's `--max-tokens` when that is smaller."""
    server = getattr(request.app.state, "server", None)
    limit = getattr(getattr(getattr(server, "config", None), "defaults", None), "max_tokens", None)
    budget = min(DEFAULT_PAGE_MAX_TOKENS, limit) if limit else DEFAULT_PAGE_MAX_TOKENS
    return Response(json.dumps({"max_tokens": budget}), media_type="application/json", headers=HEADERS)
