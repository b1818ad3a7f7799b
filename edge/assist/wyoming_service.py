"""A Wyoming `handle` service: Home Assistant's Assist pipeline sends the user's words
(`transcript`) and gets the answer back, streamed (`handled-start`, `handled-chunk`...,
`handled`, `handled-stop`), over a plain TCP socket.

Framing, timeouts and the connection limit are `wyoming_io`'s. A transcript goes the HTTP
path's way: its size is checked before anything else, it takes a place in the scheduler's
queue (`Scheduler.admit`) before it is tokenized, and it is tokenized and its job's events
read on the scheduler's threads, shared with the HTTP APIs and the serial console (one
prompt tokenized at a time, a bounded pool of readers). Anything that keeps a
turn from being answered -- a full queue, an empty or too long transcript, a malformed
event, a failure while answering -- gets `not-handled` with a short sentence Assist can speak,
and the connection is closed (Home Assistant 2025.4 waits forever after an `error` event; a
malformed event also gets an `error` after the `not-handled`, for other clients).

Replies stop at the first sentence end once `reply_tokens` tokens are generated
(`spoken.SentenceBudget`), and the transcript's `language` becomes a line of the system
prompt. Each `conversation_id` keeps its history for CONVERSATION_TTL seconds (at most
MAX_CONVERSATIONS of them), so follow-up questions work; when a history no longer fits the
context its oldest turns are dropped. Wyoming has no authentication: the service binds
loopback unless given a LAN address, and the log says so.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version

from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Attribution, Describe, HandleModel, HandleProgram, Info

from edge.assist import spoken, wyoming_io
from edge.assist.wyoming_io import ConnectionTable, Idle, ProtocolError, read_event
from edge.engine import ContextFull, QueueFull, replies
from edge.engine.conversation import Conversation
from edge.engine.engine import Engine
from edge.engine.scheduler import Scheduler
from edge.launch.memory import release_free_memory
from edge.launch.request import DEFAULT_SPOKEN_TOKENS, RequestDefaults

log = logging.getLogger("edge.wyoming")

CONVERSATION_TTL = 300.0       # seconds a conversation's history is kept after its last turn
MAX_CONVERSATIONS = 64
ATTRIBUTION = Attribution(name="edge-llm", url="https://github.com/")
TRANSCRIPT = "transcript"


class Refusal(Exception):
    """A turn that cannot be answered: `spoken` is said to the user, `detail` is logged (and
    sent as an `error` event when the request itself was malformed)."""

    def __init__(self, spoken_text: str, detail: str, malformed: bool = False):
        super().__init__(detail)
        self.spoken, self.malformed = spoken_text, malformed


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
                 languages: tuple[str, ...] = ("en",), reply_tokens: int | None = DEFAULT_SPOKEN_TOKENS):
        """`reply_tokens`: a reply ends at the first sentence end after this many tokens
        (None: only `defaults.max_tokens` ends it)."""
        self.engine, self.scheduler, self.defaults = engine, scheduler, defaults
        self.host, self.port, self.languages = host, port, list(languages)
        self.system, self.reply_tokens = system, reply_tokens
        self.conversations = Conversations(lambda: Conversation(engine, system))
        self.table = ConnectionTable()
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self.error: BaseException | None = None

    @property
    def connections(self) -> int:
        return len(self.table)

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
                asyncio.start_server(self._connection, self.host, self.port, limit=wyoming_io.MAX_HEADER))
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
        conn = self.table.open(writer)
        if conn is None:
            log.warning("Wyoming: %d connections are all busy; refusing a new one", self.table.limit)
            await self._refuse(writer, Refusal(spoken.BUSY, "too many connections"), {})
            writer.close()
            return
        try:
            while (event := await read_event(reader, conn)) is not None:
                if Describe.is_type(event.type):
                    await self._send(writer, self.info().event())
                elif event.type == TRANSCRIPT:
                    if not await self.answer(event, writer):
                        break                     # refused: said so, and closed
                else:
                    log.debug("ignoring Wyoming event %r", event.type)
                conn.waiting()
        except ProtocolError as e:
            log.warning("Wyoming peer broke the protocol: %s", e)
            await self._quietly(self._send(writer, Error(text=str(e), code="protocol").event()))
        except Idle:
            log.debug("Wyoming: closing a connection idle for %g s", wyoming_io.IDLE_TIMEOUT)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:       # a bug of ours: logged, the peer told, the service lives on
            log.exception("Wyoming: a connection failed")
            await self._quietly(self._refuse(writer, Refusal(spoken.FAILED, "internal error"), {}))
        finally:
            self.table.close(conn)
            writer.close()
            if conn.read_big:         # a big event's buffers and parsed text: hand the memory back
                await self.scheduler.aread(release_free_memory)

    async def _send(self, writer: asyncio.StreamWriter, event: Event) -> None:
        try:
            await async_write_event(event, writer)
        except RuntimeError as e:      # the transport is closing: the peer is gone
            raise ConnectionResetError("peer gone") from e

    @staticmethod
    async def _quietly(coro) -> None:
        try:
            await coro
        except (ConnectionError, OSError):
            pass

    async def _refuse(self, writer: asyncio.StreamWriter, refusal: Refusal, context: dict) -> None:
        """`not-handled` with the spoken reason (and `error` for a malformed request)."""
        await self._send(writer, NotHandled(text=refusal.spoken, context=context or None).event())
        if refusal.malformed:
            await self._send(writer, Error(text=str(refusal), code="bad-request").event())

    def info(self) -> Info:
        ver = _version()
        model = HandleModel(name=self.engine.name, attribution=ATTRIBUTION, installed=True,
                            description=f"{self.engine.name} ({self.engine.bundle.quant}) on edge-llm",
                            version=ver, languages=self.languages)
        program = HandleProgram(name="edge-llm", attribution=ATTRIBUTION, installed=True,
                                description="A local LLM on the Raspberry Pi answers Assist's questions",
                                version=ver, models=[model], supports_handled_streaming=True)
        return Info(handle=[program])

    # --- one turn ------------------------------------------------------------------------
    async def answer(self, event: Event, writer: asyncio.StreamWriter) -> bool:
        """Answer a transcript event; False when it was refused (the caller closes)."""
        context = event.data.get("context")
        context = context if isinstance(context, dict) else {}
        try:
            conv, question, job = await self._admit(event.data)
        except Refusal as r:
            log.info("Wyoming: not handled: %s", r)
            await self._refuse(writer, r, context)
            return False
        try:
            return await self._stream(job, conv, question, writer, context)
        finally:
            job.cancel()          # the client left mid-answer: stop generating for nobody

    async def _admit(self, data: dict):
        """(conversation, question, job): checked, given a queue place, tokenized, queued.
        Raises Refusal."""
        text, context, language = data.get("text"), data.get("context"), data.get("language")
        if not isinstance(text, str):
            raise Refusal(spoken.UNREADABLE, 'a transcript needs "text", a string', malformed=True)
        if context is not None and not isinstance(context, dict):
            raise Refusal(spoken.UNREADABLE, '"context" must be a JSON object', malformed=True)
        if language is not None and not isinstance(language, str):
            raise Refusal(spoken.UNREADABLE, '"language" must be a string', malformed=True)
        try:
            nbytes = len(text.encode())
        except UnicodeEncodeError:
            raise Refusal(spoken.UNREADABLE, "the transcript is not valid Unicode text", malformed=True) from None
        if not text.strip():
            raise Refusal(spoken.EMPTY, "the transcript is empty")
        try:
            self.engine.check_fits_bytes(nbytes)          # before any queue place or tokenizer
        except ContextFull as e:
            raise Refusal(spoken.TOO_LONG, f"the transcript ({nbytes} bytes) has at least {e.needed} tokens; "
                                           f"the context holds {e.max_ctx}") from None
        cid = (context or {}).get("conversation_id")
        conv = self.conversations.get(cid if isinstance(cid, str) else None)
        conv.system = spoken.system_prompt(self.system, language)
        try:
            ticket = self.scheduler.admit()
        except QueueFull as e:
            raise Refusal(spoken.BUSY, f"the queue is full: {e}") from None
        with ticket:
            try:
                ids = await self.scheduler.atokenize(self._prompt, conv, text)    # one prompt at a time
            except ContextFull as e:
                raise Refusal(spoken.TOO_LONG, str(e)) from None
            except ValueError as e:                   # a template's own error, bad text
                raise Refusal(spoken.UNREADABLE, str(e)) from None
            job = self.scheduler.submit(ids, self.defaults.build(), ticket=ticket)
        return conv, text, job

    async def _stream(self, job, conv: Conversation, question: str, writer, context: dict) -> bool:
        budget, last, complete = spoken.SentenceBudget(self.reply_tokens), None, False
        await self._send(writer, HandledStart(context=context).event())
        try:
            async for reply in replies.astream(self.scheduler.aevents(job)):
                if reply.final is not None:
                    last = reply.final
                    continue
                if complete:          # the rest of a cancelled job: read to its end, say nothing
                    continue
                piece, complete = budget.feed(reply.text, reply.tokens)
                if piece:
                    await self._send(writer, HandledChunk(text=piece).event())
                if complete:          # stop generating, and let the job end (its slot free, its KV
                    job.cancel()      # kept) before `handled`: the follow-up can reuse that slot
        except Exception as e:        # ContextFull, or the engine failed this sequence
            log.warning("Wyoming: the answer failed: %s", e)
            await self._refuse(writer, Refusal(spoken.FAILED, str(e)), context)
            return False
        text = budget.complete_sentences() if last is not None and last.finish_reason == "length" else budget.text.strip()
        await self._send(writer, Handled(text=text, context=context).event())
        await self._send(writer, HandledStop().event())
        conv.record(question, [text], interrupted=False)
        return True

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
