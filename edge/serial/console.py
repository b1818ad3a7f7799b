"""The serial console: chat with the model over a UART or USB-gadget serial port.

Two modes on the same port:
- human (default): a banner, a "> " prompt, local echo and line editing, replies streamed as
  tokens arrive, Ctrl-C to stop a reply, and /commands. Turns keep their context (the engine
  reuses the prefix) until /reset or until the context is full.
- jsonl: one JSON request per line in, one JSON event per line out, for a microcontroller or
  a script. Requests are stateless (send "messages" for a multi-turn chat).

Three threads per console, so that nothing the port does can stall the engine:
- the reader owns the connection: it opens the port (retrying with backoff while it is
  absent), reads bytes and turns them into lines with the LineEditor;
- the session runs one line at a time: a command, or a reply through the shared Scheduler;
- the writer is the only thread that writes to the port. It drains a bounded outbox, so a
  port held back by flow control (CTS low, XOFF) or a reader that stopped reading only ever
  blocks the writer. When the outbox stays full for `stall_timeout`, the session cancels its
  reply, which frees the engine for the other interfaces.

While a reply streams, incoming bytes are kept as type-ahead (bounded) and edited/echoed only
after the reply, so they never appear inside it; a Ctrl-C among them cancels the reply and
drops what was typed before it, as a shell does.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import json
import os
import queue
import select
import sys
import threading
import time
from dataclasses import dataclass

import serial

from edge.engine.engine import Engine, Event, GenerationParams
from edge.model.kv_cache import ContextFull
from edge.serial.line_editor import Interrupt, Line, LineEditor, TooLong
from edge.engine.scheduler import QueueFull, Scheduler
from edge.launch import engine_from_args
from edge.launch.args import add_model_args, add_sampling_args, request_defaults
from edge.launch.request import REQUEST_FIELDS, RequestDefaults
from edge.engine.tool_calls import CHAT_FIELDS, prepare_chat

PROMPT = "> "
FLAP_SECONDS = 2.0         # a connection shorter than this that drops counts as flapping
READ_TIMEOUT = 0.05        # how often the reader looks at stop / writer errors
WRITE_PIECE = 1024         # the writer coalesces queued output into pieces this big
FLOWS = ("none", "rtscts", "xonxoff")
MODES = ("human", "jsonl")


def _log(msg: str) -> None:
    print(f"serial: {msg}", file=sys.stderr, flush=True)


class SerialConsoleError(RuntimeError):
    """The port cannot be used and waiting will not help (in use, no permission, not a tty)."""


@dataclass
class PortSettings:
    port: str
    baud: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    flow: str = "none"

    def describe(self) -> str:
        return f"{self.port} {self.baud} {self.bytesize}{self.parity}{self.stopbits:g} flow={self.flow}"


def open_port(s: PortSettings) -> serial.Serial:
    """exclusive=True takes a flock, so a second console, picocom or screen on the same
    port fails clearly instead of both stealing each other's bytes."""
    return serial.Serial(s.port, s.baud, bytesize=s.bytesize, parity=s.parity, stopbits=s.stopbits,
                         rtscts=s.flow == "rtscts", xonxoff=s.flow == "xonxoff",
                         timeout=READ_TIMEOUT, exclusive=True)


_ABSENT = {errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EIO}


def explain_open_error(port: str, e: Exception) -> tuple[bool, str]:
    """(worth retrying, message). Absent devices come back (USB replugged); the rest needs a person."""
    code = getattr(e, "errno", None)
    if code in (errno.EAGAIN, errno.EBUSY):
        return False, (f"{port} is in use by another program (close picocom/screen/minicom, or "
                       f"stop the login console: systemctl stop serial-getty@{os.path.basename(port)})")
    if code in (errno.EACCES, errno.EPERM):
        return False, f"no permission to open {port}: add the user to the 'dialout' group"
    if code in _ABSENT:
        return True, f"{port} is not there ({os.strerror(code)})"
    return False, f"cannot use {port} as a serial port: {e}"


class _Outbox:
    """Bytes waiting for the writer, bounded: put() waits at most `wait` seconds for room."""

    def __init__(self, limit: int):
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._cond = threading.Condition()

    def put(self, data: bytes, wait: float = 0.0) -> bool:
        with self._cond:
            room = lambda: self._size == 0 or self._size + len(data) <= self.limit  # noqa: E731
            if not self._cond.wait_for(room, wait):
                return False
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> bytes | None:
        """Up to WRITE_PIECE bytes (tokens are tiny: one write per token would be slow)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks, timeout):
                return None
            out = bytearray(self._chunks.popleft())
            while self._chunks and len(out) + len(self._chunks[0]) <= WRITE_PIECE:
                out += self._chunks.popleft()
            self._size -= len(out)
            self._cond.notify_all()
            return bytes(out)

    def clear(self) -> None:
        with self._cond:
            self._chunks.clear()
            self._size = 0
            self._cond.notify_all()


# Model text must not drive the terminal: C0/C1 controls (ESC sequences, BEL, ...) are dropped.
_UNPRINTABLE = {c: None for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}


def terminal_text(text: str) -> bytes:
    return text.translate(_UNPRINTABLE).replace("\n", "\r\n").encode("utf-8")


HELP = [
    ("/help", "this list"),
    ("/reset", "forget the conversation"),
    ("/system TEXT", "set the system prompt (none if empty) and forget the conversation"),
    ("/temp X", "sampling temperature (0 = always the likeliest token)"),
    ("/max N", "longest reply, in tokens"),
    ("/stats", "speed of the last reply and context used"),
    ("/model", "the model being served"),
]

_REQUEST_FIELDS = {"id", "prompt", "system", "messages"} | REQUEST_FIELDS | CHAT_FIELDS


class SerialConsole:
    def __init__(self, engine: Engine, scheduler: Scheduler, settings: PortSettings, *,
                 mode: str = "human", echo: bool = True, system: str | None = None,
                 params: GenerationParams | None = None, line_limit: int = 4096,
                 typeahead_limit: int = 8192, out_limit: int = 16384, stall_timeout: float = 10.0,
                 retry: tuple[float, float] = (0.5, 10.0), log=_log):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        from edge.engine.conversation import Conversation
        self.engine, self.scheduler, self.settings, self.mode = engine, scheduler, settings, mode
        self.params = params or RequestDefaults().build()
        self.conv = Conversation(engine, system, generate=scheduler.stream)
        self.typeahead_limit, self.stall_timeout, self.retry, self.log = typeahead_limit, stall_timeout, retry, log
        human_echo = mode == "human" and echo
        self.editor = LineEditor(line_limit, echo=self._echo if human_echo else None)
        self.counters: collections.Counter = collections.Counter()   # for logs and tests
        self.connected = threading.Event()
        self.last_usage = None
        self._context_used = 0
        self._outbox = _Outbox(out_limit)
        self._lines: queue.Queue[Line] = queue.Queue()
        self._lock = threading.Lock()            # editor, type-ahead, busy, current cancel
        self._port_lock = threading.Lock()       # a port is never closed while being written
        self._port: serial.Serial | None = None
        self._write_error: Exception | None = None
        self._typeahead = bytearray()
        self._busy = False
        self._cancel: threading.Event | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_retry_log = ("", 0.0)

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> SerialConsole:
        """Open the port now, so that a port in use fails here; an absent one is waited for."""
        port = self._try_open(first=True)
        for name, target, args in (("reader", self._connect_loop, (port,)),
                                   ("session", self._session_loop, ()), ("writer", self._writer_loop, ())):
            t = threading.Thread(target=target, args=args, name=f"serial-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._cancel_reply()
        for t in self._threads:
            t.join(timeout=2)

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def _try_open(self, first: bool = False) -> serial.Serial | None:
        try:
            return open_port(self.settings)
        except (serial.SerialException, OSError, ValueError) as e:
            retry, msg = explain_open_error(self.settings.port, e)
            if first and not retry:
                raise SerialConsoleError(msg) from e
            self._log_retry(msg)
            return None

    def _log_retry(self, msg: str) -> None:
        """One line when the reason changes, then one a minute: a day unplugged is not 10k lines."""
        now = time.monotonic()
        last_msg, last_t = self._last_retry_log
        if msg != last_msg or now - last_t >= 60:
            self.log(f"{msg}; retrying (every {self.retry[1]:g} s at most)")
            self._last_retry_log = (msg, now)

    # --- reader: connection and input -------------------------------------------------
    def _connect_loop(self, port: serial.Serial | None) -> None:
        delay, flaps = self.retry[0], 0
        while not self._stop.is_set():
            if port is None:
                port = self._try_open()
            if port is None:
                flaps = 0                 # really gone: its return is news worth a log line
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry[1])
                continue
            t0 = time.monotonic()
            self._serve(port, quiet=flaps >= 2)
            port = None
            # A device that opens and drops at once (a gadget port whose host keeps hanging
            # up) must back off like an absent one, and not log two lines per attempt.
            flaps = flaps + 1 if time.monotonic() - t0 < FLAP_SECONDS else 0
            if flaps:
                if flaps > 2:
                    self._log_retry(f"{self.settings.port} keeps dropping as soon as it opens")
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry[1])
            else:
                delay = self.retry[0]

    def _serve(self, port: serial.Serial, quiet: bool = False) -> None:
        with self._lock:
            self.editor.reset()
            self._typeahead.clear()
            self._write_error = None
            self._port = port
        self.counters["connects"] += 1
        if not quiet:
            self._last_retry_log = ("", 0.0)  # the next loss is news again
            self.log(f"console on {self.settings.describe()}, {self.mode} mode")
        self._greet()
        self.connected.set()
        try:
            while not self._stop.is_set():
                if self._write_error is not None:
                    raise self._write_error
                data = port.read(max(1, min(port.in_waiting, 4096)))
                if data:
                    self._on_bytes(data)
        except (serial.SerialException, OSError) as e:
            self.counters["disconnects"] += 1
            if not quiet:
                self.log(f"lost {self.settings.port} ({e}); waiting for it to come back")
        finally:
            self._drop(port)

    def _drop(self, port: serial.Serial) -> None:
        self.connected.clear()
        with self._lock:
            self._port = None
        self._cancel_reply()          # nobody is listening any more: free the engine
        with self._port_lock:
            port.close()
        self._outbox.clear()

    def _on_bytes(self, data: bytes) -> None:
        self.counters["bytes_in"] += len(data)
        with self._lock:
            if self._busy:
                data = self._ctrl_c_while_busy(data)
            self._typeahead += data
            if not self._busy:
                self._pump()
            if len(self._typeahead) > self.typeahead_limit:
                self.counters["typeahead_dropped"] += len(self._typeahead) - self.typeahead_limit
                del self._typeahead[self.typeahead_limit:]

    def _ctrl_c_while_busy(self, data: bytes) -> bytes:
        i = data.rfind(b"\x03")
        if i < 0:
            return data
        self.counters["interrupts"] += 1
        self._typeahead.clear()
        self._cancel.set()            # created with the line, so no Ctrl-C is ever lost
        self._outbox.clear()          # what is not written yet never will be: stop now
        return data[i + 1:]

    def _pump(self) -> None:
        """Edit type-ahead until a line starts work (lock held, not busy)."""
        n = 0
        for b in self._typeahead:
            n += 1
            event = self.editor.push(b)
            if event is not None and self._dispatch(event):
                break
        del self._typeahead[:n]

    def _dispatch(self, event) -> bool:
        """Handle an editor event; True when it handed a line to the session (now busy)."""
        human = self.mode == "human"
        if isinstance(event, Line):
            self.counters["lines"] += 1
            self.counters["replaced"] += event.replaced
            self.counters["ignored"] += event.ignored
            if event.text.strip() or event.replaced or event.ignored:
                self._busy, self._cancel = True, threading.Event()
                self._lines.put(event)
                return True
        elif isinstance(event, TooLong):
            self.counters["too_long"] += 1
            if human:
                self._write("\r\n")         # the refused text was echoed up to the limit
            self._report("line_too_long", f"line longer than {event.limit} bytes: refused, the rest of it is ignored")
            return False
        if human:     # a blank line, Ctrl-C at the prompt, the end of a refused line
            self._write("^C\r\n" + PROMPT if isinstance(event, Interrupt) else PROMPT)
        return False

    # --- output -----------------------------------------------------------------------
    def _echo(self, data: bytes) -> None:
        self._outbox.put(data)

    def _write(self, text: str, wait: float = 0.0) -> bool:
        return self._outbox.put(terminal_text(text) if self.mode == "human" else text.encode(), wait)

    def _say(self, text: str) -> None:
        self._write(f"({text})\r\n")

    def _report(self, code: str, message: str) -> None:
        """A notice in either mode: "(message)" for people, an error object for machines."""
        if self.mode == "human":
            self._say(message)
        else:
            self._json(error=dict(code=code, message=message))

    def _json(self, rid=None, wait: float = 0.0, **fields) -> bool:
        obj = ({"id": rid} if rid is not None else {}) | fields
        return self._outbox.put((json.dumps(obj) + "\n").encode("ascii"), wait)

    def _greet(self) -> None:
        if self.mode == "human":
            self._write(f"\r\nedge-llm serial console: {self.engine.name}, context {self.engine.max_ctx} "
                        f"tokens. Type /help for commands; Ctrl-C stops a reply.\r\n{PROMPT}")
        else:
            self._json(ready=True, model=self.engine.name, max_ctx=self.engine.max_ctx)

    def _writer_loop(self) -> None:
        while not self._stop.is_set():
            data = self._outbox.get(timeout=0.1)
            if data is not None:
                self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        """Write without ever blocking in the kernel: pyserial's write() with a write_timeout
        may raise after part of the data went out (we would repeat it), and with
        write_timeout=0 it spins on EAGAIN. Flow control shows up as the fd not writable."""
        view = memoryview(data)
        port = self._port
        while view and port is not None and not self._stop.is_set():
            with self._port_lock:
                if self._port is not port:
                    return                    # disconnected: the bytes go nowhere
                try:
                    if not select.select([], [port.fileno()], [], 0.1)[1]:
                        continue
                    view = view[os.write(port.fileno(), view):]
                except BlockingIOError:
                    continue
                except (OSError, ValueError, serial.SerialException) as e:
                    self._write_error = serial.SerialException(f"write failed: {e}")
                    return
        self.counters["bytes_out"] += len(data) - len(view)

    # --- session: one line at a time --------------------------------------------------
    def _session_loop(self) -> None:
        while not self._stop.is_set():
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._handle_human(line) if self.mode == "human" else self._handle_json(line)
            except Exception as e:   # one bad request must not end the console
                self.log(f"error: {type(e).__name__}: {e}")
                self._report("internal", f"error: {e}")
            finally:
                self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._busy, self._cancel = False, None
            dropped = self.counters.pop("typeahead_dropped", 0)
            if dropped:
                self._report("input_dropped", f"{dropped} bytes sent during the reply were dropped "
                             "(type-ahead is limited)")
            if self.mode == "human":
                self._write(PROMPT)
            self._pump()

    def _current_cancel(self) -> threading.Event:
        with self._lock:
            return self._cancel or threading.Event()

    def _cancel_reply(self) -> None:
        cancel = self._cancel
        if cancel is not None:
            cancel.set()

    def _stream(self, events, cancel: threading.Event, render) -> tuple[Event | None, bool]:
        """Feed events to the outbox; on a port that stays full, cancel the job (the events
        keep coming from the scheduler's queue, so the engine never waits on the port)."""
        last, stalled = None, False
        for ev in events:
            if ev.text and not stalled and not cancel.is_set():
                if not self._outbox.put(render(ev), wait=self.stall_timeout):
                    stalled = True
                    cancel.set()
                    self._outbox.clear()      # stale by now; leaves room for the notice and prompt
                    self.counters["stalls"] += 1
                    self.log(f"{self.settings.port} took nothing for {self.stall_timeout:g} s "
                             "(flow control or a stopped reader); reply cancelled")
            if ev.finish_reason is not None:
                last = ev
        return last, stalled

    # --- human mode -------------------------------------------------------------------
    def _handle_human(self, line: Line) -> None:
        if line.replaced or line.ignored:
            self._say(f"note: {line.replaced} invalid UTF-8 sequence(s) replaced by \ufffd, "
                      f"{line.ignored} control character(s)/escape sequence(s) ignored")
        text = line.text.strip()
        if text.startswith("/"):
            self._command(text)
        elif text:
            self._chat(text)

    def _chat(self, text: str, retried: bool = False) -> None:
        cancel = self._current_cancel()
        try:
            last, stalled = self._stream(self.conv.ask(text, self.params, cancel), cancel,
                                         lambda ev: terminal_text(ev.text))
        except ContextFull as e:
            if retried or not self.conv.turns:
                self._say(f"that message does not fit: {e}")
                return
            self.conv.reset()
            self._context_used = 0
            self._say("context full: conversation cleared, answering afresh")
            return self._chat(text, retried=True)
        except QueueFull as e:
            self._say(f"busy: {e}")
            return
        self._after_reply(last, stalled)

    def _after_reply(self, last: Event | None, stalled: bool) -> None:
        if last is not None and last.usage is not None:
            self.last_usage = last.usage
            self._context_used = last.usage.prompt_tokens + last.usage.completion_tokens
        cancelled = last is not None and last.finish_reason == "cancelled"
        self._write(" ^C\r\n" if cancelled and not stalled else "\r\n")
        if stalled:
            self._say(f"the port took nothing for {self.stall_timeout:g} s: reply cancelled")
        if self._context_used + 1 >= self.engine.max_ctx:
            self.conv.reset()
            self._context_used = 0
            self._say(f"context full ({self.engine.max_ctx} tokens): conversation cleared")

    def _command(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        handler = {"/help": self._cmd_help, "/reset": self._cmd_reset, "/system": self._cmd_system,
                   "/temp": self._cmd_temp, "/max": self._cmd_max, "/stats": self._cmd_stats,
                   "/model": self._cmd_model}.get(name.lower())
        if handler is None:
            self._say(f"unknown command {name}; /help lists them")
        else:
            handler(arg.strip())

    def _cmd_help(self, _arg: str) -> None:
        for cmd, what in HELP:
            self._write(f"  {cmd:<14} {what}\r\n")
        self._write("  Ctrl-C         stop the reply in progress\r\n")

    def _cmd_reset(self, _arg: str) -> None:
        self.conv.reset()
        self._context_used = 0
        self._say("conversation cleared")

    def _cmd_system(self, arg: str) -> None:
        self.conv.reset(arg or None)
        self._context_used = 0
        self._say("system prompt set; conversation cleared" if arg else "system prompt removed; conversation cleared")

    def _cmd_temp(self, arg: str) -> None:
        try:
            sampling = dataclasses.replace(self.params.sampling, temperature=float(arg))
        except ValueError as e:
            return self._say(f"usage: /temp X, a number >= 0 ({e})")
        self.params = dataclasses.replace(self.params, sampling=sampling)
        self._say(f"temperature {sampling.temperature:g}")

    def _cmd_max(self, arg: str) -> None:
        try:
            self.params = dataclasses.replace(self.params, max_tokens=int(arg))
        except ValueError as e:
            return self._say(f"usage: /max N, a whole number >= 1 ({e})")
        self._say(f"replies stop after {self.params.max_tokens} tokens")

    def _cmd_stats(self, _arg: str) -> None:
        u = self.last_usage
        if u is None:
            self._say("no reply yet")
        else:
            self._say(f"last reply: {u.completion_tokens} tokens at {u.decode_tokens_per_second:.1f} tokens/s, "
                      f"first token after {u.time_to_first_token * 1000:.0f} ms; prompt {u.prompt_tokens} "
                      f"tokens, {u.cached_tokens} reused")
        pct = 100 * self._context_used / self.engine.max_ctx
        self._say(f"context: {self._context_used}/{self.engine.max_ctx} tokens used ({pct:.0f}%), "
                  f"{len(self.conv.turns) // 2} turn(s); temperature {self.params.sampling.temperature:g}, "
                  f"max {self.params.max_tokens} tokens; {self.scheduler.queue_depth} request(s) queued")

    def _cmd_model(self, _arg: str) -> None:
        self._say(f"model {self.engine.name}, context {self.engine.max_ctx} tokens")

    # --- machine mode -----------------------------------------------------------------
    def _handle_json(self, line: Line) -> None:
        """Corrupted bytes (noise, wrong baud rate) refuse the request rather than run a guess."""
        if line.replaced or line.ignored:
            return self._json_error(None, "bad_bytes", f"{line.replaced} invalid UTF-8 sequence(s), "
                                    f"{line.ignored} control byte(s); request refused")
        try:
            req = json.loads(line.text)
        except ValueError as e:
            return self._json_error(None, "bad_json", str(e))
        rid = req.get("id") if isinstance(req, dict) else None
        try:
            ids, params, chat = self._request(req)
        except ContextFull as e:
            return self._json_error(rid, "context_full", str(e))
        except (ValueError, TypeError) as e:
            return self._json_error(rid, "bad_request", str(e))
        cancel = self._current_cancel()
        text = []
        try:
            last, _ = self._stream(self.scheduler.stream(ids, params, cancel), cancel,
                                   lambda ev: text.append(ev.text) or self._json_bytes(rid, delta=ev.text))
        except ContextFull as e:
            return self._json_error(rid, "context_full", str(e))
        except QueueFull as e:
            return self._json_error(rid, "busy", str(e))
        if last is not None:
            calls = chat.parse("".join(text))[1]     # tools: the deltas are the raw text, the calls come here
            self._json(rid, wait=self.stall_timeout, done=True, finish_reason="tool_calls" if calls else
                       last.finish_reason, usage=_usage_dict(last.usage), **({"tool_calls": [
                           c.openai() for c in calls]} if calls else {}))

    def _json_bytes(self, rid, **fields) -> bytes:
        return (json.dumps(({"id": rid} if rid is not None else {}) | fields) + "\n").encode("ascii")

    def _json_error(self, rid, code: str, message: str) -> None:
        self._json(rid, error=dict(code=code, message=message))

    def _request(self, req):
        if not isinstance(req, dict):
            raise ValueError("a request is a JSON object")
        unknown = sorted(set(req) - _REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_REQUEST_FIELDS))}")
        chat = prepare_chat(self.engine, _messages(req), **{k: req[k] for k in CHAT_FIELDS & req.keys()})
        params = RequestDefaults.of(self.params).build(**{k: req[k] for k in REQUEST_FIELDS & req.keys()},
                                                       **chat.overrides())
        self.engine.check_fits(chat.ids)
        return chat.ids, params, chat


def _messages(req: dict) -> list[dict]:
    if ("prompt" in req) == ("messages" in req):
        raise ValueError('give exactly one of "prompt" (a string) or "messages" (a list)')
    if "prompt" in req:
        if not isinstance(req["prompt"], str) or not isinstance(req.get("system", ""), str):
            raise ValueError('"prompt" and "system" must be strings')
        system = [{"role": "system", "content": req["system"]}] if req.get("system") else []
        return system + [{"role": "user", "content": req["prompt"]}]
    msgs = req["messages"]
    if not (isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)):
        raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
    return [{k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id") if k in m} for m in msgs]


def _usage_dict(u) -> dict | None:
    if u is None:
        return None
    return dict(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
                completion_tokens=u.completion_tokens, time_to_first_token=round(u.time_to_first_token, 4),
                tokens_per_second=round(u.decode_tokens_per_second, 2))


# --- command line ----------------------------------------------------------------------
def add_port_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Line settings and console options; prefix "serial-" gives serve's --serial-baud etc."""
    o = f"--{prefix}"
    p.add_argument(o + "baud", type=int, default=115200, help="bits per second (default 115200)")
    p.add_argument(o + "bytesize", type=int, choices=[5, 6, 7, 8], default=8)
    p.add_argument(o + "parity", type=str.upper, choices=list(serial.PARITY_NAMES), default="N")
    p.add_argument(o + "stopbits", type=float, choices=[1, 1.5, 2], default=1)
    p.add_argument(o + "flow", choices=FLOWS, default="none",
                   help="flow control: rtscts (hardware, needs the CTS/RTS wires) or xonxoff (software)")
    p.add_argument(o + "mode", choices=MODES, default="human",
                   help="human: prompt, echo, /commands; jsonl: one JSON request/event per line")
    p.add_argument(o + "echo", action=argparse.BooleanOptionalAction, default=True,
                   help="echo typed characters back (terminals in raw mode do not echo locally)")
    p.add_argument(o + "line-limit", type=int, default=4096, help="longest input line in bytes")
    p.add_argument(o + "system", default=None, help="system prompt for the serial chat")


def add_serial_args(p: argparse.ArgumentParser) -> None:
    """For `edge-llm serve`: --serial PORT plus --serial-baud, --serial-flow, ..."""
    p.add_argument("--serial", metavar="PORT", default=None,
                   help="also run the serial console on PORT (/dev/ttyAMA0, /dev/serial0, /dev/ttyGS0)")
    add_port_args(p, prefix="serial-")


def _opt(a, prefix: str, name: str):
    return getattr(a, (prefix + name).replace("-", "_"))


def console_from_args(a, engine: Engine, scheduler: Scheduler, port: str, prefix: str = "",
                      log=_log) -> SerialConsole:
    settings = PortSettings(port, _opt(a, prefix, "baud"), _opt(a, prefix, "bytesize"), _opt(a, prefix, "parity"),
                            _opt(a, prefix, "stopbits"), _opt(a, prefix, "flow"))
    return SerialConsole(engine, scheduler, settings, mode=_opt(a, prefix, "mode"), echo=_opt(a, prefix, "echo"),
                         system=_opt(a, prefix, "system"), params=_params(a),
                         line_limit=_opt(a, prefix, "line-limit"), log=log)


def _params(a) -> GenerationParams:
    """The command's sampling flags over the product defaults (256 tokens a reply, not
    serve's "rest of the context": too long for a terminal)."""
    return request_defaults(a).build()


def start_from_args(a, engine: Engine, scheduler: Scheduler, log=None) -> SerialConsole | None:
    """serve's hook: None without --serial; raises SerialConsoleError if the port is unusable."""
    if not getattr(a, "serial", None):
        return None
    import logging
    log = log or logging.getLogger("edge.serial").info     # serve logs through `logging`
    return console_from_args(a, engine, scheduler, a.serial, prefix="serial_", log=log).start()


def cmd_serial(a) -> int:
    engine = engine_from_args(a, log=_log)
    console = console_from_args(a, engine, Scheduler(engine), a.port)
    try:
        console.start().wait()
    except SerialConsoleError as e:
        print(f"edge-llm serial: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        console.stop()
    return 0


def register(sub) -> None:
    s = sub.add_parser("serial", help="chat over a serial port (GPIO UART or USB gadget)")
    s.add_argument("--port", required=True, help="e.g. /dev/ttyAMA0 (Pi 5 GPIO UART), /dev/ttyGS0 (USB gadget)")
    add_port_args(s)
    add_model_args(s)
    add_sampling_args(s)
    s.set_defaults(func=cmd_serial)
