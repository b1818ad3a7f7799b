"""A Wyoming `handle` service: Home Assistant's Assist pipeline sends the user's words
(`transcript`) and gets the answer back, streamed (`handled-start`, `handled-chunk`...,
`handled`, `handled-stop`), over a plain TCP socket.

The event classes and writer are the `wyoming` package's own (the protocol's reference
implementation). Reading is ours, because its reader trusts the peer: here a header line is
at most MAX_HEADER bytes, `data_length` and `payload_length` at most MAX_BLOCK, and a block
must arrive within BLOCK_TIMEOUT seconds; a peer that breaks those gets an `error` event and
is disconnected. Unknown event types are ignored, as the protocol says.

Each `conversation_id` keeps its history for CONVERSATION_TTL seconds (at most
MAX_CONVERSATIONS of them), so follow-up questions work; when a history no longer fits the
context its oldest turns are dropped. Wyoming has no authentication: the service binds
loopback unless given a LAN address, and the log says so.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version

from wyoming.asr import Transcript
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Attribution, Describe, HandleModel, HandleProgram, Info

from edge.engine.conversation import Conversation
from edge.engine.engine import Engine
from edge.engine.scheduler import QueueFull, Scheduler
from edge.launch.request import RequestDefaults
from edge.model.kv_cache import ContextFull

log = logging.getLogger("edge.wyoming")

MAX_HEADER = 64 << 10          # bytes in one JSON header line
MAX_BLOCK = 1 << 20            # bytes of data or payload after a header
BLOCK_TIMEOUT = 30.0           # seconds for a data/payload block to arrive
MAX_CONNECTIONS = 16
CONVERSATION_TTL = 300.0       # seconds a conversation's history is kept after its last turn
MAX_CONVERSATIONS = 64
ATTRIBUTION = Attribution(name="edge-llm", url="https://github.com/")


class ProtocolError(ValueError):
    """The peer broke the framing; it gets an error event and is disconnected."""


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """One event, or None at the end of the stream. Raises ProtocolError."""
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError) as e:
        raise ProtocolError(f"header line over {MAX_HEADER} bytes") from e
    if not line:
        return None
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
        if not isinstance(n, int) or not 0 <= n <= MAX_BLOCK:
            raise ProtocolError(f"{key} must be an integer from 0 to {MAX_BLOCK}, got {n!r}")
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
        data = {**data, **extra}
    if not isinstance(data, dict):
        raise ProtocolError('"data" must be a JSON object')
    return Event(type=header["type"], data=data, payload=blocks["payload_length"] or None)


class Conversations:
    """conversation_id -> its `Conversation` (history and system prompt), kept for a while
    after its last turn; a request without an id gets a fresh one each time."""

    def __init__(self, make, ttl: float = CONVERSATION_TTL, limit: int = MAX_CONVERSATIONS):
        self.make, self.ttl, self.limit = make, ttl, limit
        self._convs: OrderedDict[str, tuple[float, Conversation]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cid: str | None) -> Conversation:
        with self._lock:
            now = time.monotonic()
            for old in [c for c, (t, _) in self._convs.items() if now - t > self.ttl]:
                del self._convs[old]
            if cid is None:
                return self.make()
            _, conv = self._convs.pop(cid, (now, None))
            self._convs[cid] = (now, conv or self.make())
            while len(self._convs) > self.limit:
                self._convs.popitem(last=False)
            return self._convs[cid][1]


class WyomingService:
    def __init__(self, engine: Engine, scheduler: Scheduler, host: str, port: int,
                 defaults: RequestDefaults = RequestDefaults(), system: str | None = None,
                 languages: tuple[str, ...] = ("en",)):
        self.engine, self.scheduler, self.defaults = engine, scheduler, defaults
        self.host, self.port, self.languages = host, port, list(languages)
        self.conversations = Conversations(lambda: Conversation(engine, system))
        self.connections = 0
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self.error: BaseException | None = None

    # --- lifetime: its own thread and event loop, beside uvicorn's ----------------------
    def start(self) -> WyomingService:
        threading.Thread(target=self._run, name="edge-llm-wyoming", daemon=True).start()
        self.ready.wait(10)
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, self.host, self.port, limit=MAX_HEADER))
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError as e:
            self.error = OSError(f"cannot bind the Wyoming service to {self.host}:{self.port}: {e.strerror}")
            self.ready.set()
            return
        self.ready.set()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass

    # --- one connection --------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            await self._send(writer, Error(text="too many connections", code="busy").event())
            writer.close()
            return
        self.connections += 1
        try:
            while (event := await read_event(reader)) is not None:
                if Describe.is_type(event.type):
                    await self._send(writer, self.info().event())
                elif Transcript.is_type(event.type):
                    await self.answer(Transcript.from_event(event), writer)
                else:
                    log.debug("ignoring Wyoming event %r", event.type)
        except ProtocolError as e:
            log.warning("Wyoming peer broke the protocol: %s", e)
            await self._send(writer, Error(text=str(e), code="protocol").event())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, event: Event) -> None:
        try:
            await async_write_event(event, writer)
        except RuntimeError as e:      # the transport is closing: the peer is gone
            raise ConnectionResetError("peer gone") from e

    def info(self) -> Info:
        ver = _version()
        model = HandleModel(name=self.engine.name, attribution=ATTRIBUTION, installed=True,
                            description=f"{self.engine.name} ({self.engine.bundle.quant}) on edge-llm",
                            version=ver, languages=self.languages)
        program = HandleProgram(name="edge-llm", attribution=ATTRIBUTION, installed=True,
                                description="A local LLM on the Raspberry Pi answers Assist's questions",
                                version=ver, models=[model], supports_handled_streaming=True)
        return Info(handle=[program])

    async def answer(self, transcript: Transcript, writer: asyncio.StreamWriter) -> None:
        context = transcript.context or {}
        cid = context.get("conversation_id") if isinstance(context.get("conversation_id"), str) else None
        loop = asyncio.get_running_loop()
        conv, question = self.conversations.get(cid), transcript.text or ""
        try:
            ids = await loop.run_in_executor(None, self._prompt, conv, question)
            job = self.scheduler.submit(ids, self.defaults.build())
        except QueueFull as e:
            return await self._send(writer, Error(text=f"busy: {e}", code="busy").event())
        except (ValueError, TypeError) as e:      # ContextFull, a template's own error, bad text
            return await self._send(writer, NotHandled(text=f"I cannot answer that: {e}", context=context).event())
        events, parts = job.events(), []
        try:
            await self._send(writer, HandledStart(context=context).event())
            while (ev := await loop.run_in_executor(None, next, events, None)) is not None:
                if ev.text:
                    parts.append(ev.text)
                    await self._send(writer, HandledChunk(text=ev.text).event())
            text = "".join(parts).strip()
            await self._send(writer, Handled(text=text, context=context).event())
            await self._send(writer, HandledStop().event())
        except ContextFull as e:
            return await self._send(writer, NotHandled(text=str(e), context=context).event())
        finally:
            job.cancel()          # the client left mid-answer: stop generating for nobody
        conv.record(question, parts, interrupted=False)

    @staticmethod
    def _prompt(conv: Conversation, question: str) -> list[int]:
        """Token ids for the conversation plus the question, its oldest turns dropped first
        when they would not fit (the terminal chat's rule, `Conversation.make_room`)."""
        conv.make_room(question)
        return conv.tokens(question)


def _version() -> str:
    try:
        return version("edge-llm")
    except PackageNotFoundError:
        return "0"


def parse_address(spec: str) -> tuple[str, int]:
    """HOST:PORT, [v6]:PORT or just PORT (loopback)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", spec
    host = host.strip("[]") or "127.0.0.1"
    try:
        value = int(port)
    except ValueError:
        raise ValueError(f"--wyoming wants HOST:PORT (e.g. 127.0.0.1:10400), got {spec!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"--wyoming port must be 0-65535, got {value}")
    return host, value
