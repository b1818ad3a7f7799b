"""Ollama's /api/pull over `edge-llm pull`: the pull runs as a child process (`--json`: one
progress event a line), so that a conversion's memory is the system's again when it ends and
a failing pull cannot take the server with it. Its lines become Ollama's:
{"status": "pulling manifest"}, {"status": "pulling sha256:...", "digest", "total",
"completed"}, {"status": "verifying sha256 digest"}, {"status": "success"}; a failure is
{"error": "..."}."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from edge.api.models import installed, served_names
from edge.api.runtime import ApiError, ServerState
from edge.launch.aliases import normalize
from edge.launch.pull import PullError, parse_spec

NDJSON = "application/x-ndjson"
OLLAMA_FIELDS = ("status", "digest", "total", "completed")


def _command(spec: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", "pull", spec, "--json"]


async def _events(spec: str) -> AsyncIterator[dict]:
    """The child's events, then {"error"} if it failed."""
    proc = await asyncio.create_subprocess_exec(*_command(spec), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    try:
        async for raw in proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            yield {k: ev[k] for k in OLLAMA_FIELDS if ev.get(k) is not None}
        err = (await proc.stderr.read()).decode(errors="replace")
        if await proc.wait() != 0:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            msg = next((ln.split("error: ", 1)[1] for ln in reversed(lines) if "error: " in ln),
                       lines[-1] if lines else f"edge-llm pull exited {proc.returncode}")
            yield {"error": msg}
    finally:
        if proc.returncode is None:         # the client went away: stop the download (it resumes later)
            proc.terminate()
            await proc.wait()


async def respond(state: ServerState, name: str, stream: bool):
    if normalize(name) in served_names(state) or installed(name):
        ok = {"status": "success"}
        return StreamingResponse(iter([json.dumps(ok) + "\n"]), media_type=NDJSON) if stream else ok
    try:
        parse_spec(name)
    except PullError:
        raise ApiError(404, f"model '{name}' is not installed and is not a Hugging Face repository "
                            "(OWNER/NAME[:QUANT], e.g. hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M); "
                            f"install one with edge-llm pull and name it with edge-llm alias {name} MODEL",
                       param="model", code="model_not_found") from None
    if stream:
        async def lines():
            async for ev in _events(name):
                yield json.dumps(ev) + "\n"
        return StreamingResponse(lines(), media_type=NDJSON)
    last = {}
    async for ev in _events(name):
        last = ev
    if "error" in last:
        return JSONResponse(last, status_code=500)
    return last
