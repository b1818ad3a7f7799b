"""Reading Wyoming events from a peer that may be hostile, and the connection table.

The event classes and writer are the `wyoming` package's own; reading is ours, because its
reader trusts the peer. Here a connection may wait IDLE_TIMEOUT seconds for its next event;
once an event's first byte has arrived, its header line must end within HEADER_TIMEOUT
seconds and be at most MAX_HEADER bytes, and `data_length` / `payload_length` blocks are at
most MAX_BLOCK bytes each and must arrive within BLOCK_TIMEOUT seconds.

At most MAX_CONNECTIONS connections are open. When a new one arrives at the limit, the
connection that has waited longest for its next event is closed to make room; only when
every connection is in the middle of an event (reading it or answering it) is the newcomer
refused. So idle sockets cannot lock Home Assistant out: it opens one connection per turn.
"""
from __future__ import annotations

import asyncio
import json
import time

from wyoming.event import Event

from edge.launch.memory import BIG_REQUEST

MAX_HEADER = 64 << 10          # bytes in one JSON header line
MAX_BLOCK = 1 << 20            # bytes of data or payload after a header
IDLE_TIMEOUT = 60.0            # seconds a connection may wait between events
HEADER_TIMEOUT = 10.0          # seconds from an event's first byte to the end of its header line
BLOCK_TIMEOUT = 30.0           # seconds for a data/payload block to arrive
MAX_CONNECTIONS = 16


class ProtocolError(ValueError):
    """The peer broke the framing; it gets an error event and is disconnected."""


class Idle(Exception):
    """No event began within the idle timeout."""


class Connection:
    """One peer: idle (waiting for the first byte of its next event) or working."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.idle_since: float | None = time.monotonic()
        self.evicted = False
        self.read_big = False          # a block of BIG_REQUEST bytes or more was read

    def working(self) -> None:
        self.idle_since = None

    def waiting(self) -> None:
        self.idle_since = time.monotonic()

    def close(self) -> None:
        """Close the socket: the connection's reader sees the end of the stream."""
        self.evicted = True
        self.writer.close()


class ConnectionTable:
    def __init__(self, limit: int = MAX_CONNECTIONS):
        self.limit = limit
        self._open: list[Connection] = []

    def __len__(self) -> int:
        return len(self._open)

    def open(self, writer: asyncio.StreamWriter) -> Connection | None:
        """The new connection, after closing the longest-idle one if the table is full;
        None when every open connection is working."""
        if len(self._open) >= self.limit:
            idle = [c for c in self._open if c.idle_since is not None and not c.evicted]
            if not idle:
                return None
            oldest = min(idle, key=lambda c: c.idle_since)
            oldest.close()
            self._open.remove(oldest)
        conn = Connection(writer)
        self._open.append(conn)
        return conn

    def close(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.remove(conn)


async def read_event(reader: asyncio.StreamReader, conn: Connection | None = None,
                     idle_timeout: float | None = None) -> Event | None:
    """One event, or None at the end of the stream. Raises Idle when no event begins within
    `idle_timeout` (default IDLE_TIMEOUT), ProtocolError when the peer breaks the framing.
    `conn` is marked working from the event's first byte."""
    try:
        first = await asyncio.wait_for(reader.read(1), IDLE_TIMEOUT if idle_timeout is None else idle_timeout)
    except asyncio.TimeoutError as e:
        raise Idle from e
    if not first:
        return None
    if conn is not None:
        conn.working()
    line = first
    if first != b"\n":
        try:
            line += await asyncio.wait_for(reader.readline(), HEADER_TIMEOUT)
        except (ValueError, asyncio.LimitOverrunError) as e:
            raise ProtocolError(f"header line over {MAX_HEADER} bytes") from e
        except asyncio.TimeoutError as e:
            raise ProtocolError(f"the header line did not end within {HEADER_TIMEOUT:g} s") from e
    try:
        header = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"header is not JSON: {e}") from e
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError('header must be a JSON object with a string "type"')
    data = header.get("data") or {}
    blocks = {}
    for key in ("data_length", "payload_length"):
        n = header.get(key) or 0
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_BLOCK:
            raise ProtocolError(f"{key} must be an integer from 0 to {MAX_BLOCK}, got {n!r}")
        if conn is not None and n + len(line) >= BIG_REQUEST:
            conn.read_big = True
        try:
            blocks[key] = await asyncio.wait_for(reader.readexactly(n), BLOCK_TIMEOUT) if n else b""
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            raise ProtocolError(f"{key} said {n} bytes, but they did not arrive") from e
    if blocks["data_length"]:
        try:
            extra = json.loads(blocks["data_length"])
        except ValueError as e:
            raise ProtocolError(f"data block is not JSON: {e}") from e
        if not isinstance(extra, dict):
            raise ProtocolError("data block must be a JSON object")
        if not isinstance(data, dict):
            raise ProtocolError('"data" must be a JSON object')
        data = {**data, **extra}
    if not isinstance(data, dict):
        raise ProtocolError('"data" must be a JSON object')
    return Event(type=header["type"], data=data, payload=blocks["payload_length"] or None)
