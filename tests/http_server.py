"""Run the HTTP API on a real uvicorn server on a free loopback port, in a thread."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import uvicorn

from edge.engine.engine import Engine, GenerationParams
from edge.model.bundle import Bundle
from edge.engine.sampler import SamplingParams
from edge.launch.request import DEFAULT_MAX_QUEUE, RequestDefaults
from edge.api.connections import ACCEPT_BACKLOG, DrainingServer, guarded_protocol
from edge.api.openai_api import create_app
from edge.api.runtime import ServerConfig, ServerState
from edge.launch.scheduling import start_scheduler
from edge.service.serve import bind

SMOL_NAME = "smollm2-f16"     # conftest's smol bundle's installed name: what the APIs answer to


def free_port() -> int:
    """A TCP port free on loopback now (for a server that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Until the server at `url` says it is ready on /health; fails with the end of its log if
    it exits or does not get there within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)


@contextmanager
def serve_process(args: list[str], env: dict, cwd=None) -> Iterator[str]:
    """`edge-llm serve --port 0 ARGS` as its own process: yields its base URL once it says it
    is ready, and stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--port", "0", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = None
        for line in proc.stdout:
            if m := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
                base = m.group(1)
            if "ready:" in line:
                break
        assert base, "edge-llm serve did not start"
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def running(state: ServerState, server_out: list | None = None, make_app=create_app, **bounds) -> Iterator[str]:
    """Serve `make_app(state)` on 127.0.0.1:<free port> as `serve` does (same connection bounds;
    `bounds` go to guarded_protocol); yields the base URL."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = DrainingServer(uvicorn.Config(make_app(state), log_config=None, access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=2, loop="asyncio",
                                           http=guarded_protocol(**bounds), backlog=ACCEPT_BACKLOG),
                            on_drain=state.drain)
    if server_out is not None:
        server_out.append(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def endless_engine(bundle_path, max_ctx: int, **kw) -> Engine:
    """An engine over a random-weight bundle that never meets its eos: every request runs to
    max_tokens (or the context), so lengths are predictable."""
    engine = Engine(Bundle.open(bundle_path), max_ctx=max_ctx, **kw)
    engine.eos_ids = frozenset()
    return engine


def ready_state(engine, max_queue: int = DEFAULT_MAX_QUEUE, **config) -> ServerState:
    """A loaded server state over `engine`, with its own scheduler. Its default sampling is
    neutral (no top-k/p, min-p or penalty), so replies can be compared with `engine_text`."""
    config.setdefault("defaults", RequestDefaults(max_tokens=None, sampling=SamplingParams()))
    state = ServerState(engine.name, ServerConfig(**config))
    state.set_ready(engine, start_scheduler(engine, max_queue=max_queue, time_limit=config.get("request_timeout")))
    return state


def engine_text(engine, ids, max_tokens: int, stop=(), **sampling):
    """What the engine alone produces: (text, finish_reason, usage)."""
    params = GenerationParams(max_tokens=max_tokens, stop=list(stop), sampling=SamplingParams(**sampling))
    events = list(engine.generate(ids, params))
    return "".join(e.text for e in events), events[-1].finish_reason, events[-1].usage
