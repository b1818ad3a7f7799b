"""What uvicorn does not bound: connections, and the time a client may take to send a request.

uvicorn (0.29-0.54) has `limit_concurrency`, but it is checked only once a request's headers
are complete, so it never sees a connection that sends half a request and waits; its
`timeout_keep_alive` starts only after a response. h11 bounds the header *size*
(`h11_max_incomplete_event_size`), not the time. So ~1,000 partial requests held open
exhaust the process's file descriptors (LimitNOFILE=1024) and everything times out.

`guarded_protocol(max_connections, request_seconds)` is uvicorn's own h11 protocol with:
- a request deadline: from its first byte (or the connection's start), a request's headers
  and body must arrive within `request_seconds`, or the client gets a 408 (JSON) and the
  connection closes. A request being answered (or streamed) is never timed out here;
- a connection bound: at `max_connections` open connections, a new one evicts the oldest
  connection that is still waiting for its request (they are the cheap ones to lose: nothing
  was asked yet); if every connection is busy with a request, the new one is answered 503 and
  closed. The bound is below the file-descriptor limit (serve checks), so accept() never
  fails with EMFILE and asyncio's accept loop never has to back off;
- uvicorn's plain-text "Invalid HTTP request received." 400 answered in OpenAI's JSON shape.
"""
from __future__ import annotations

import json
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge.api.openai_schema import error_body

log = logging.getLogger("edge.http")

# Connections accepted per event-loop tick (the listen backlog: uvicorn's default is 2048).
# CPython's accept loop (3.11-3.13) runs up to `backlog` accept() calls per tick and on EMFILE
# neither stops nor backs off: it logs and schedules a retry for every remaining iteration,
# which is the "out of system resource" flood. A small backlog bounds the burst, and with it
# the descriptors open before the connection bound below gets to close the surplus.
ACCEPT_BACKLOG = 64


# Descriptors kept for everything but HTTP connections, on top of those open at start-up:
# model and cache files, Wyoming's and the serial console's connections, pipes, logs.
RESERVED_FDS = 96
MIN_CONNECTIONS = 8         # fewer, and one stream plus a few clients leave /health no room
MIN_BACKLOG = 4


def fds_needed(max_connections: int, others: int = 128, backlog: int = ACCEPT_BACKLOG) -> int:
    """File descriptors the server may hold: the bound, two accept bursts in flight (accepted,
    not yet closed by the bound), and `others` (model files, caches, pipes, serial, logs)."""
    return max_connections + 2 * backlog + others


def fit_connections(max_connections: int, fd_limit: int, in_use: int) -> tuple[int, int]:
    """(connection bound, accept backlog) that fit `fd_limit` descriptors with `in_use` open
    now. Under a low limit the accept bursts shrink before the bound does; a limit that leaves
    fewer than MIN_CONNECTIONS raises ValueError saying how much is needed."""
    room = fd_limit - in_use - RESERVED_FDS
    if room >= fds_needed(max_connections, others=0):
        return max_connections, ACCEPT_BACKLOG
    backlog = max(MIN_BACKLOG, min(ACCEPT_BACKLOG, room // 8))
    connections = min(max_connections, room - 2 * backlog)
    if connections < MIN_CONNECTIONS:
        need = in_use + RESERVED_FDS + fds_needed(MIN_CONNECTIONS, others=0, backlog=MIN_BACKLOG)
        raise ValueError(f"the file-descriptor limit ({fd_limit}) leaves room for {max(connections, 0)} HTTP "
                         f"connection(s), fewer than the {MIN_CONNECTIONS} needed: raise it to at least {need} "
                         "(ulimit -n, or LimitNOFILE= in the systemd unit)")
    return connections, backlog


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, when shutdown starts (SIGTERM), first calls `on_drain`: the API
    then ends every open stream with an error event and [DONE] and answers every waiting
    request 503, instead of uvicorn cutting them after its graceful timeout."""

    def __init__(self, config: uvicorn.Config, on_drain=None):
        super().__init__(config)
        self.on_drain = on_drain

    async def shutdown(self, sockets=None) -> None:
        if self.on_drain is not None:
            self.on_drain()
        await super().shutdown(sockets)


_PHRASES = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_READ_SECONDS = 20.0


def guarded_protocol(max_connections: int = DEFAULT_MAX_CONNECTIONS,
                     request_seconds: float = DEFAULT_READ_SECONDS) -> type[H11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with these bounds."""
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    if not request_seconds > 0:
        raise ValueError(f"request_seconds must be > 0, got {request_seconds}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "request_seconds": request_seconds})


class GuardedH11Protocol(H11Protocol):
    max_connections = DEFAULT_MAX_CONNECTIONS
    request_seconds = DEFAULT_READ_SECONDS

    def connection_made(self, transport) -> None:
        if self.loop.get_exception_handler() is None:
            self.loop.set_exception_handler(_quiet_accept_errors)
        self._deadline = None
        self._waiting_since = None
        super().connection_made(transport)
        self._arm()                                   # the first request starts now
        if len(self.connections) > self.max_connections and not self._evict_one():
            log.warning("connection limit (%d) reached, all busy: refusing %s", self.max_connections, self.client)
            self._reply_and_close(503, "the server has too many open connections; retry shortly",
                                  "unavailable_error", "too_many_connections")

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._arm()                               # first byte of the next keep-alive request
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._deadline is not None and self.cycle is not None and not self.cycle.more_body \
                and not self.cycle.response_complete:
            self._disarm()                            # headers and body complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._waiting_since = self.loop.time()    # idle keep-alive: evictable (uvicorn closes it in 5 s)

    # --- request deadline -----------------------------------------------------------------
    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.request_seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._waiting_since = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started
        if started:
            return                                    # already answering: not ours to end
        log.info("%s: no complete request within %g s; closing", self.client, self.request_seconds)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True            # the app reading its body sees a disconnect
            self.cycle.message_event.set()
        self._reply_and_close(408, f"the request was not complete within {self.request_seconds:g} s",
                              "invalid_request_error", "request_timeout")

    # --- connection bound -------------------------------------------------------------------
    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for its request; False if none waits."""
        idle = [c for c in self.connections if c is not self and getattr(c, "_waiting_since", None) is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._waiting_since)
        oldest._disarm()
        oldest._reply_and_close(503, "connection closed to make room (too many open connections)",
                                "unavailable_error", "too_many_connections")
        return True

    # --- replies uvicorn writes itself ------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self._reply_and_close(400, f"invalid HTTP request: {msg.rstrip('.')}", "invalid_request_error", None)

    def _reply_and_close(self, status: int, message: str, type_: str, code: str | None) -> None:
        """An OpenAI-shaped error written straight to the socket, then close (abort if h11
        cannot write a response in its state: the client then sees the connection reset)."""
        body = json.dumps(error_body(message, type_, None, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            data = self.conn.send(h11.Response(status_code=status, headers=headers))
            data += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:     # no request read yet (h11 IDLE) or a broken one (ERROR)
            data = b"" if self._response_sent() else b"".join(
                [f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\n".encode(),
                 *(k + b": " + v + b"\r\n" for k, v in headers), b"\r\n", body])
        if data:
            self.transport.write(data)
        self.transport.close()

    def _response_sent(self) -> bool:
        return self.cycle is not None and self.cycle.response_started


_accept_errors = {"count": 0, "logged": float("-inf")}


def _quiet_accept_errors(loop, context: dict) -> None:
    """Should accept() still fail (descriptors taken by something else), say so once every
    10 s with a count instead of thousands of tracebacks a second."""
    if context.get("message") != "socket.accept() out of system resource":
        return loop.default_exception_handler(context)
    _accept_errors["count"] += 1
    now = loop.time()
    if now - _accept_errors["logged"] >= 10:
        log.error("accept() failed %d time(s): %s (file-descriptor limit reached?)",
                  _accept_errors["count"], context.get("exception"))
        _accept_errors.update(count=0, logged=now)
