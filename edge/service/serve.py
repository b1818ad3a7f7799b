"""`edge-llm serve` (the OpenAI-compatible HTTP API) and `edge-llm prepare` (the installer's
warm-up): one engine and one scheduler per process, uvicorn in the main thread.

Start-up order, so that clients and systemd always see the truth:
1. refuse an exposed bind without an API key (unless --no-auth), then bind the socket;
2. uvicorn serves at once: /health says "loading" and generation requests get 503;
3. a background thread loads the model and generates one warm-up token, then the API turns
   ready, systemd gets READY=1 and the watchdog starts pinging while the scheduler is healthy.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from edge.launch import engine_from_args
from edge.launch.args import add_model_args, add_parallel_args, add_sampling_args, number, port, request_defaults
from edge.launch.loaded_models import parse_keep_alive
from edge.launch.memory import release_free_memory
from edge.launch.request import (DEFAULT_CLOCK_LAST, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_LOADED_MODELS, DEFAULT_MAX_QUEUE,
                                 DEFAULT_MAX_TOKENS, DEFAULT_PORT, DEFAULT_REQUEST_SECONDS, DEFAULT_SPOKEN_TOKENS,
                                 DEFAULT_TOOL_LOOP_GUARD,
                                 OLLAMA_PORT, WATCHDOG_STALL_SECONDS, RequestDefaults)
from edge.launch.scheduling import start_scheduler
from edge.service import sd_notify

log = logging.getLogger("edge.serve")

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
WARM_UP_PROMPT = "Hello"


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def register(sub) -> None:
    from edge.api.connections import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_SECONDS
    from edge.api.runtime import MAX_BODY_BYTES
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                       "/v1/completions, /v1/models, /health, /metrics). Environment defaults: EDGE_LLM_MODEL, "
                       "EDGE_LLM_API_KEY, EDGE_LLM_HOME.")
    add_model_args(s)
    add_parallel_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other address needs an API key or --no-auth)")
    s.add_argument("--port", type=port, default=DEFAULT_PORT, help="TCP port (0 = any free port)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $EDGE_LLM_API_KEY)")
    s.add_argument("--no-auth", action="store_true", help="serve a non-loopback address without an API key")
    s.add_argument("--max-queue", type=number(int, 1), default=DEFAULT_MAX_QUEUE,
                   help=f"requests waiting beyond this get HTTP 429 (at least 1; default {DEFAULT_MAX_QUEUE})")
    s.add_argument("--request-timeout", type=number(float, 0), default=DEFAULT_REQUEST_SECONDS,
                   help=f"seconds a request may take, queue wait included (0 = no limit; default "
                        f"{DEFAULT_REQUEST_SECONDS:g})")
    s.add_argument("--max-connections", type=number(int, 1), default=DEFAULT_MAX_CONNECTIONS,
                   help="open HTTP connections at most; beyond it the oldest one still waiting for its "
                   f"request is closed (default {DEFAULT_MAX_CONNECTIONS}; must fit the file-descriptor limit)")
    s.add_argument("--read-timeout", type=number(float, 0.001), default=DEFAULT_READ_SECONDS,
                   help="seconds a client may take to send a whole request, headers and body (408 after; "
                   f"default {DEFAULT_READ_SECONDS:g})")
    s.add_argument("--allow-host", action="append", default=[],
                   help="also accept this Host header name on a loopback bind (e.g. a reverse proxy's name; "
                   "repeatable). Other names are refused there against DNS rebinding")
    s.add_argument("--max-body", type=number(int, 1), default=MAX_BODY_BYTES, help="request body limit in bytes (413 above)")
    s.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser requests from this origin and let its pages read the answers (repeatable; "
                        "CORS is off by default)")
    s.add_argument("--allow-origin", action="append", default=[], metavar="ORIGINS",
                   help="also accept requests from web pages of these origins, on both ports (comma-separated, "
                        "repeatable; OLLAMA_ORIGINS syntax: https://ha.example:8123, http://192.168.1.*, '*' = any). "
                        "Default: the page's own origin (the chat page), loopback origins and local apps")
    s.add_argument("--log-prompts", action="store_true", help="write prompt text into the request log")
    s.add_argument("--watchdog-stall", type=number(float, 0.001), default=WATCHDOG_STALL_SECONDS,
                   help="seconds with requests pending but no engine step or admission before /health reports "
                   f"'stalled' and the systemd watchdog is no longer fed (default {WATCHDOG_STALL_SECONDS:g})")
    m = s.add_argument_group("models by name (a request's model loads it; Ollama's keep_alive)")
    m.add_argument("--max-loaded-models", type=number(int, 1), default=DEFAULT_MAX_LOADED_MODELS,
                   help="installed models loaded at once, the served one included; a request for another one "
                        "unloads the least recently used idle model first (default "
                        f"{DEFAULT_MAX_LOADED_MODELS}: the served model and one more on a 4 GB Pi; loading also "
                        "checks the available memory)")
    m.add_argument("--keep-alive", type=_keep_alive, default=DEFAULT_KEEP_ALIVE, metavar="DURATION",
                   help="how long a model other than the served one stays loaded after its last request, unless "
                        f"the request says (Ollama's keep_alive: '5m', '1h', seconds, negative = forever; default "
                        f"{DEFAULT_KEEP_ALIVE})")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity")
    s.add_argument("--tool-loop-guard", choices=("on", "off"), default="on" if DEFAULT_TOOL_LOOP_GUARD else "off",
                   help="leave a tool call already answered in this turn out of the grammar, so a model cannot "
                        "repeat it (a request's own tool_loop_guard wins; default "
                        f"{'on' if DEFAULT_TOOL_LOOP_GUARD else 'off'})")
    g = s.add_argument_group("default sampling (a request's own fields win)")
    add_sampling_args(g, max_tokens_help=f"the rest of the context; the serial console: {DEFAULT_MAX_TOKENS}")
    h = s.add_argument_group("Home Assistant")
    h.add_argument("--clock-line", choices=("last", "keep"), default="last" if DEFAULT_CLOCK_LAST else "keep",
                   help="Home Assistant 2025.x starts its system prompt with the current time, so no two "
                        "conversations share a prefix to reuse: 'last' moves that line to the end of the "
                        f"system message, 'keep' leaves it (default {'last' if DEFAULT_CLOCK_LAST else 'keep'})")
    h.add_argument("--ollama-port", type=_port_or_off, default=None, metavar="PORT|off",
                   help=f"serve the Ollama-compatible API on this port of --host (default {OLLAMA_PORT} if it is "
                        "free; 'off' to disable)")
    h.add_argument("--wyoming", metavar="HOST:PORT", default=None,
                   help="also run a Wyoming 'handle' service for Home Assistant's Assist (default off; it has "
                        "no authentication, so bind loopback unless the LAN must reach it), e.g. 127.0.0.1:10400")
    h.add_argument("--wyoming-languages", default="en", help="languages the Wyoming service announces (default en)")
    h.add_argument("--wyoming-system", default=None, help="system prompt for Wyoming conversations")
    h.add_argument("--wyoming-reply-tokens", type=_positive_or_off, default=DEFAULT_SPOKEN_TOKENS, metavar="N|off",
                   help="a Wyoming reply ends at the first sentence end after N tokens (default "
                        f"{DEFAULT_SPOKEN_TOKENS}; 'off': only --max-tokens ends it)")
    from edge.serial import args as serial_args
    serial_args.add_serial_args(s.add_argument_group("serial console"))
    s.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="fetch/convert the model into the cache, load it, generate one token")
    add_model_args(p)
    p.set_defaults(func=cmd_prepare)


def _keep_alive(value: str) -> float:
    try:
        return parse_keep_alive(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_or_off(value: str) -> int | None:
    if value == "off":
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 or 'off', got {value}")
    return n


def _port_or_off(value: str) -> int | str:
    if value == "off":
        return value
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 or 'off', got {value}")
    return port


def model_spec(a) -> str | None:
    return a.model or os.environ.get("EDGE_LLM_MODEL") or None


def api_key(a) -> str | None:
    return a.api_key or os.environ.get("EDGE_LLM_API_KEY") or None


# --- serve -----------------------------------------------------------------------------

def cmd_serve(a) -> int:
    import uvicorn
    from edge.api.runtime import ServerState
    _setup_logging(a.log_level)
    key = check_exposure(a.host, api_key(a), a.no_auth)
    from edge.api.connections import DrainingServer, guarded_protocol
    max_connections, backlog = fit_fd_limit(a.max_connections)
    sock = bind(a.host, a.port, backlog)
    state = ServerState(_model_id(model_spec(a)), server_config(a, key))
    sockets = [sock]
    ollama = bind_ollama(a.host, a.ollama_port, backlog)
    if ollama is not None:
        sockets.append(ollama)
    app = http_app(state, ollama.getsockname()[1] if ollama is not None else None)
    # h11 with the connection bound and request deadline of edge.api.connections; asyncio pinned
    # (not uvloop, if installed: untested here) with a small backlog that bounds its accept bursts
    server = DrainingServer(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=5, loop="asyncio",
                                           http=guarded_protocol(max_connections, a.read_timeout),
                                           timeout_keep_alive=5, backlog=backlog),
                            on_drain=state.drain)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (auth %s); loading the model in the background",
             _url_host(host), port, "on" if key else "OFF")
    if ollama is not None:
        log.info("Ollama-compatible API on http://%s:%d", _url_host(host), ollama.getsockname()[1])
    threading.Thread(target=load_and_start, args=(a, state, server), name="edge-llm-load", daemon=True).start()
    # uvicorn shuts down on SIGTERM/SIGINT, then re-raises the signal: SIGTERM must end in
    # SystemExit (not the default kill) so that the prompt cache is written on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=sockets)
    finally:
        sd_notify.stopping()
        for entry in state.models.loaded() if state.models is not None else []:
            if entry.engine is not None:
                entry.engine.persist()
    return 1 if state.error else 0


def bind_ollama(host: str, port: int | str | None, backlog: int | None = None) -> socket.socket | None:
    """The Ollama API's socket: an explicit port must bind; the default (OLLAMA_PORT) is skipped
    with a warning when something else (a real Ollama) holds it."""
    if port == "off":
        return None
    try:
        return bind(host, OLLAMA_PORT if port is None else port, backlog)
    except OSError as e:
        if port is not None:
            raise
        log.warning("Ollama-compatible API not started: %s (pass --ollama-port to choose another port)", e)
        return None


def http_app(state, ollama_port: int | None):
    """The OpenAI app, and on the Ollama port the Ollama app, which also serves OpenAI's /v1/*
    there (as Ollama does) through the same OpenAI app."""
    from edge.api.ollama_api import create_ollama_app
    from edge.api.openai_api import create_app
    app = create_app(state)
    if ollama_port is None:
        return app
    return PortDispatch(app, {ollama_port: PathDispatch(create_ollama_app(state), {"/v1/": app})})


class PathDispatch:
    """Paths under a prefix go to another ASGI app."""

    def __init__(self, default, by_prefix: dict[str, object]):
        self.default, self.by_prefix = default, by_prefix

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        app = next((a for p, a in self.by_prefix.items() if path.startswith(p)), self.default)
        await app(scope, receive, send)


class PortDispatch:
    """One uvicorn server, several APIs: each listening port gets its own ASGI app."""

    def __init__(self, default, by_port: dict[int, object]):
        self.default, self.by_port = default, by_port

    async def __call__(self, scope, receive, send):
        port = (scope.get("server") or (None, None))[1]
        await self.by_port.get(port, self.default)(scope, receive, send)


def server_config(a, key: str | None):
    from edge.api.runtime import ServerConfig
    return ServerConfig(api_key=key, request_timeout=a.request_timeout or None, max_body_bytes=a.max_body,
                        cors_origins=a.cors_origin, allowed_origins=a.allow_origin, log_prompts=a.log_prompts,
                        allowed_hosts=LOOPBACK_NAMES | {a.host.lower()} | {h.lower() for h in a.allow_host}
                        if is_loopback(a.host) else None,
                        defaults=request_defaults(a, RequestDefaults(max_tokens=None)),
                        tool_loop_guard=a.tool_loop_guard == "on", clock_last=a.clock_line == "last")


def fit_fd_limit(max_connections: int) -> tuple[int, int]:
    """(connection bound, accept backlog) below RLIMIT_NOFILE, or accept() fails with EMFILE and
    nothing is answered: raise the soft limit as far as the hard one allows, and if that is
    not enough lower the accept bursts and then the bound (loudly). A limit too low for
    MIN_CONNECTIONS is a start-up error (ValueError)."""
    import resource
    from edge.api.connections import ACCEPT_BACKLOG, RESERVED_FDS, fds_needed, fit_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = open_fds()
    need = fds_needed(max_connections, others=in_use + RESERVED_FDS)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return max_connections, ACCEPT_BACKLOG
    fitted, backlog = fit_connections(max_connections, soft, in_use)
    log.warning("--max-connections %d does not fit the file-descriptor limit %d (LimitNOFILE); using %d "
                "(accept backlog %d)", max_connections, soft, fitted, backlog)
    return fitted, backlog


def open_fds() -> int:
    """Descriptors this process has open now (a guess of 32 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False          # a host name: assume it reaches the network


def check_exposure(host: str, key: str | None, no_auth: bool) -> str | None:
    """The API key to enforce. Refuses an open non-loopback bind unless the operator says
    --no-auth, and then says so loudly."""
    if no_auth and key:
        raise ValueError("--no-auth and an API key (--api-key or EDGE_LLM_API_KEY) contradict each other; "
                         "drop one")
    if key or is_loopback(host):
        return key
    if not no_auth:
        raise ValueError(f"refusing to serve on {host} without an API key: anyone on the network could use it. "
                         "Pass --api-key KEY (or set EDGE_LLM_API_KEY), or --no-auth to serve it open on purpose")
    log.warning("!" * 72)
    log.warning("!!! --no-auth: serving on %s WITHOUT AUTHENTICATION; anyone who can reach it can use it", host)
    log.warning("!" * 72)
    return None


def bind(host: str, port: int, backlog: int | None = None) -> socket.socket:
    """Bind before loading anything: a busy port fails at once, and port 0 picks a free one."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {e.strerror}") from e
    from edge.api.connections import ACCEPT_BACKLOG
    sock.listen(backlog or ACCEPT_BACKLOG)
    return sock


def load_and_start(a, state, server) -> None:
    """The background half of start-up; a failure stops the server (exit status 1)."""
    try:
        engine, scheduler = start_engine(a)
        state.set_ready(engine, scheduler, loaded_models(a))
        if start_extra_interfaces(a, engine, scheduler):
            state.models.pin(state.default_key)     # they hold its engine: it never unloads
        sd_notify.Watchdog(state.healthy).start()
        sd_notify.ready(f"serving {engine.name}")
        log.info("ready: %s (%d slots of up to %d tokens sharing a KV pool of %.0f MB; queue %d)", engine.name,
                 engine.parallel, engine.max_ctx, engine.kv_cache_bytes / 2**20, scheduler.max_queue)
    except Exception as e:
        log.error("could not load the model: %s", e, exc_info=log.isEnabledFor(logging.DEBUG))
        state.set_failed(str(e))
        sd_notify.status(f"failed: {e}")
        server.should_exit = True


def start_engine(a):
    a.model = model_spec(a)
    sd_notify.status(f"loading {a.model or DEFAULT_MODEL_ID}")
    sd_notify.extend_timeout(600)       # a first use may fetch and convert the model
    engine = engine_from_args(a, log=log.info, verify="full")   # bit rot keeps size and mtime
    scheduler = start_scheduler(engine, a.max_queue, a.request_timeout, a.watchdog_stall)
    sd_notify.status(f"warming up {engine.name}")
    seconds = warm_up(engine, scheduler.stream)
    log.info("warm-up token in %.0f ms", seconds * 1000)
    threading.Thread(target=warm_up_grammars, args=(engine,), name="grammar-warm-up", daemon=True).start()
    return engine, scheduler


def warm_up_grammars(engine) -> None:
    """Build the grammar compiler's view of the vocabulary (1-3 s for Llama 3's 128k tokens) now,
    not in the first request with tools or a response format (Home Assistant sends tools with
    every command)."""
    try:
        engine.grammars.tokenizer
    except ValueError as e:           # a tokenizer llguidance cannot use: such requests get a 400
        log.info("constrained decoding unavailable: %s", e)
    release_free_memory()             # the build's temporaries


def warm_up(engine, generate) -> float:
    """One greedy token through `generate(ids, params)`: the first run allocates and packs."""
    t0 = time.perf_counter()
    *_, last = generate(engine.encode_text(WARM_UP_PROMPT), RequestDefaults().build(max_tokens=1, temperature=0.0))
    if last.usage is None or last.usage.completion_tokens != 1:
        raise RuntimeError("the warm-up generation produced no token")
    return time.perf_counter() - t0


def loaded_models(a):
    """The registry of loaded models: others load as the served one did (same flags)."""
    from edge.launch import load_engine
    from edge.launch.loaded_models import LoadedModels, available_to_us, estimate_bytes

    def open_model(key: str):
        engine = load_engine(key, a.backend, a.ctx, a.threads, a.parallel, a.kv_type,
                             getattr(a, "prompt_cache_mb", 0), log=log.info,      # sizes checked, not every hash
                             kv_pool_mb=a.kv_pool_mb)
        return engine, start_scheduler(engine, max_queue=a.max_queue, time_limit=a.request_timeout,
                                       stall_seconds=a.watchdog_stall)
    return LoadedModels(open_model, a.max_loaded_models, a.keep_alive,
                        estimate=lambda key: estimate_bytes(key, a.ctx, a.parallel, a.kv_type, a.kv_pool_mb),
                        available=available_to_us, wait=a.request_timeout or None)


def start_extra_interfaces(args, engine, scheduler) -> bool:
    """Other interfaces sharing this process's engine and scheduler start here, once the
    model is ready: the serial console (`--serial PORT`) and the Wyoming service. A busy
    port or device must not take HTTP down. True if one started."""
    from edge.serial import args as serial_args
    started = False
    try:
        started = serial_args.start_from_args(args, engine, scheduler) is not None
    except serial_args.SerialConsoleError as e:
        log.error("serial console not started: %s (HTTP keeps serving)", e)
    if getattr(args, "wyoming", None):
        started = start_wyoming(args, engine, scheduler) is not None or started
    return started


def start_wyoming(a, engine, scheduler):
    from edge.assist.wyoming_service import WyomingService, parse_address
    host, port = parse_address(a.wyoming)
    defaults = request_defaults(a)            # the terminal-style reply limit, not "rest of the context"
    service = WyomingService(engine, scheduler, host, port, defaults=defaults, system=a.wyoming_system,
                             reply_tokens=getattr(a, "wyoming_reply_tokens", DEFAULT_SPOKEN_TOKENS),
                             languages=tuple(x.strip() for x in a.wyoming_languages.split(",") if x.strip()))
    try:
        service.start()
    except OSError as e:
        log.error("%s (HTTP keeps serving)", e)
        return None
    if not is_loopback(host):
        log.warning("the Wyoming service on %s:%d has NO authentication (the protocol has none): anyone on "
                    "the network can ask it questions", host, service.port)
    log.info("Wyoming handle service on tcp://%s:%d", _url_host(host), service.port)
    return service


def _model_id(spec: str | None) -> str:
    return Path(spec).name if spec else DEFAULT_MODEL_ID


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- prepare ---------------------------------------------------------------------------

def cmd_prepare(a: argparse.Namespace) -> int:
    _setup_logging("info")
    a.model = model_spec(a)
    engine = engine_from_args(a, log=log.info, verify="full")
    seconds = warm_up(engine, engine.generate)
    log.info("prepared %s: loaded, first token in %.0f ms", engine.name, seconds * 1000)
    return 0
