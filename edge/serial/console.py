"""The serial console: chat with the model over a UART or USB-gadget serial port.

Two protocols on the same port (one class each): human (edge.serial.human: prompt, echo,
/commands) and jsonl (edge.serial.jsonl: one JSON request/event per line). This module is the
loop they share; the port's I/O is edge.serial.port, the command line edge.serial.args.

Three threads per console, so that nothing the port does can stall the engine:
- the reader owns the connection: it opens the port (retrying with backoff while it is
  absent), reads bytes and turns them into lines with the LineEditor;
- the session runs one line at a time through the protocol: a command, or a reply through
  the shared Scheduler;
- the writer (`Transport.writer_loop`) is the only thread that writes to the port. When the
  outbox stays full for `stall_timeout`, the session cancels its reply, which frees the
  engine for the other interfaces.

While a reply streams, incoming bytes are kept as type-ahead (bounded) and edited/echoed only
after the reply, so they never appear inside it; a Ctrl-C among them cancels the reply and
drops what was typed before it, as a shell does.
"""
from __future__ import annotations

import collections
import queue
import sys
import threading
import time

import serial

from edge.engine import replies
from edge.engine.engine import Engine
from edge.engine.replies import Piece
from edge.engine.scheduler import Scheduler
from edge.launch.request import RequestDefaults
from edge.serial.human import HumanProtocol
from edge.serial.jsonl import JsonlProtocol
from edge.serial.line_editor import Line, LineEditor, TooLong
from edge.serial.port import PortSettings, SerialConsoleError, Transport, explain_open_error

FLAP_SECONDS = 2.0         # a connection shorter than this that drops counts as flapping
PROTOCOLS = {"human": HumanProtocol, "jsonl": JsonlProtocol}
MODES = tuple(PROTOCOLS)


def log_to_stderr(msg: str) -> None:
    print(f"serial: {msg}", file=sys.stderr, flush=True)


class SerialConsole:
    def __init__(self, engine: Engine, scheduler: Scheduler, settings: PortSettings, *,
                 mode: str = "human", echo: bool = True, system: str | None = None,
                 params: RequestDefaults | None = None, line_limit: int = 4096,
                 typeahead_limit: int = 8192, out_limit: int = 16384, stall_timeout: float = 10.0,
                 retry: tuple[float, float] = (0.5, 10.0), log=log_to_stderr):
        """`params`: what this console's requests are built from (the human /temp and /max
        change it; a jsonl request's own fields override it)."""
        if mode not in PROTOCOLS:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.engine, self.scheduler, self.settings, self.mode = engine, scheduler, settings, mode
        self.params = params or RequestDefaults()
        self.typeahead_limit, self.stall_timeout, self.retry, self.log = typeahead_limit, stall_timeout, retry, log
        self.counters: collections.Counter = collections.Counter()   # for logs and tests
        self.connected = threading.Event()
        self.last_usage = None
        self._stop = threading.Event()
        self.transport = Transport(settings, out_limit, self._stop, self.counters)
        self.protocol = PROTOCOLS[mode](self, echo=echo, system=system)
        self.editor = LineEditor(line_limit, echo=self.transport.put if self.protocol.echo else None)
        self._lines: queue.Queue[Line] = queue.Queue()
        self._lock = threading.Lock()            # editor, type-ahead, busy, current cancel
        self._typeahead = bytearray()
        self._skip_line = False                  # dropping the tail of a line cut by an overflow
        self._busy = False
        self._cancel: threading.Event | None = None
        self._threads: list[threading.Thread] = []
        self._last_retry_log = ("", 0.0)

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> SerialConsole:
        """Open the port now, so that a port in use fails here; an absent one is waited for."""
        port = self._try_open(first=True)
        for name, target, args in (("reader", self._connect_loop, (port,)), ("session", self._session_loop, ()),
                                   ("writer", self.transport.writer_loop, ())):
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
            return self.transport.open()
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
            self.transport.attach(port)
        self.counters["connects"] += 1
        if not quiet:
            self._last_retry_log = ("", 0.0)  # the next loss is news again
            self.log(f"console on {self.settings.describe()}, {self.mode} mode")
        self.protocol.greet()
        self.connected.set()
        try:
            while not self._stop.is_set():
                data = self.transport.read(port)
                if data:
                    self._on_bytes(data)
        except (serial.SerialException, OSError) as e:
            self.counters["disconnects"] += 1
            if not quiet:
                self.log(f"lost {self.settings.port} ({e}); waiting for it to come back")
        finally:
            self.connected.clear()
            self._cancel_reply()          # nobody is listening any more: free the engine
            self.transport.detach(port)

    def _on_bytes(self, data: bytes) -> None:
        self.counters["bytes_in"] += len(data)
        with self._lock:
            if self._busy:
                data = self._ctrl_c_while_busy(data)
            if self._skip_line:           # the rest of a line cut by an overflow (Ctrl-C ends it too)
                end = min(i for i in (*map(data.find, (b"\r", b"\n", b"\x03")), len(data)) if i >= 0)
                end += data[end:end + 1] in (b"\r", b"\n")
                self.counters["typeahead_dropped"] += end
                self._skip_line = end == len(data) and data[-1:] not in (b"\r", b"\n")
                data = data[end:]
            self._typeahead += data
            if not self._busy:
                self._pump()
            if len(self._typeahead) > self.typeahead_limit:
                self._drop_overflow()

    def _drop_overflow(self) -> None:
        """Keep the complete lines that fit; drop the rest, and of a line cut in two also the
        bytes still to come up to its end, so that no half line ever runs as a request."""
        buf, limit = self._typeahead, self.typeahead_limit
        keep = max(buf.rfind(b"\r", 0, limit), buf.rfind(b"\n", 0, limit)) + 1
        self.counters["typeahead_dropped"] += len(buf) - keep
        self._skip_line = buf[-1:] not in (b"\r", b"\n")
        del buf[keep:]

    def _ctrl_c_while_busy(self, data: bytes) -> bytes:
        i = data.rfind(b"\x03")
        if i < 0:
            return data
        self.counters["interrupts"] += 1
        self._typeahead.clear()
        self._skip_line = False
        self._cancel.set()            # created with the line, so no Ctrl-C is ever lost
        self.transport.outbox.clear()  # what is not written yet never will be: stop now
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
            self.protocol.line_too_long(event.limit)
            return False
        self.protocol.idle(event)
        return False

    # --- what protocols use -----------------------------------------------------------
    def send(self, data: bytes, wait: float = 0.0) -> bool:
        """Queue output; False when there was no room within `wait` seconds."""
        return self.transport.put(data, wait)

    def current_cancel(self) -> threading.Event:
        with self._lock:
            return self._cancel or threading.Event()

    def stream(self, events, cancel: threading.Event, render, tool_use=None) -> tuple[Piece | None, bool]:
        """Feed the reply's text to the outbox, `render(text)`ed; returns (the last piece:
        finish, usage, tool calls; stalled). On a port that stays full, cancel the job (the
        events keep coming from the scheduler's queue, so the engine never waits on the port)."""
        last, stalled = None, False
        for piece in replies.stream(events, tool_use, hold=False):
            if piece.text and not stalled and not cancel.is_set():
                if not self.send(render(piece.text), wait=self.stall_timeout):
                    stalled = True
                    cancel.set()
                    self.transport.outbox.clear()   # stale by now; leaves room for the notice and prompt
                    self.counters["stalls"] += 1
                    self.log(f"{self.settings.port} took nothing for {self.stall_timeout:g} s "
                             "(flow control or a stopped reader); reply cancelled")
            if piece.final is not None:
                last = piece
        if last is not None and last.final.usage is not None:
            self.last_usage = last.final.usage
        return last, stalled

    # --- session: one line at a time --------------------------------------------------
    def _session_loop(self) -> None:
        while not self._stop.is_set():
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.protocol.handle(line)
            except Exception as e:   # one bad request must not end the console
                self.log(f"error: {type(e).__name__}: {e}")
                self.protocol.report("internal", f"error: {e}")
            finally:
                self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._busy, self._cancel = False, None
            dropped = self.counters.pop("typeahead_dropped", 0)
            if dropped:
                self.protocol.report("input_dropped", f"{dropped} bytes sent during the reply were dropped "
                                     "(type-ahead is limited)")
            self.protocol.ready()
            self._pump()

    def _cancel_reply(self) -> None:
        cancel = self._cancel
        if cancel is not None:
            cancel.set()
