"""The chat page at `/`: one HTML/JS/CSS set shipped as package data (edge/api/static/),
no build step, no CDN. The page is a client of the OpenAI API like any other: it streams
/v1/chat/completions and /v1/completions and aborts the fetch to stop (the API cancels a job
whose client went away). Its files are public; the API behind it still needs the key, which
the page's own script sends.

The Content-Security-Policy allows scripts, styles and connections to this origin only, so
even a rendering mistake could not run a model's `<script>` or load anything from outside.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

PAGE_FILES = {               # URL path -> (file in edge/api/static, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = tuple(PAGE_FILES)      # served without the API key
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter()


def _read(name: str) -> bytes:
    return (resources.files("edge.api") / "static" / name).read_bytes()


def _route(path: str, name: str, media_type: str):
    def serve_file() -> Response:
        return Response(_read(name), media_type=media_type,
                        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"})
    router.add_api_route(path, serve_file, methods=["GET"], include_in_schema=False, name=f"page:{name}")


for _path, (_name, _type) in PAGE_FILES.items():
    _route(_path, _name, _type)
