"""The port and its transport: line settings, opening (with errors a person can act on), and
the connection the console reads and writes while it lasts.

Only the writer thread writes to the port. It drains a bounded outbox, so a port held back by
flow control (CTS low, XOFF) or a reader that stopped reading only ever blocks the writer;
everyone else puts bytes into the outbox and learns within a bounded wait whether there was
room. A connection comes and goes (`attach` / `detach`): the outbox outlives it, what was not
written when it went is dropped.
"""
from __future__ import annotations

import collections
import errno
import os
import select
import threading
from dataclasses import dataclass

import serial

READ_TIMEOUT = 0.05        # how often the reader looks at stop / writer errors
WRITE_PIECE = 1024         # the writer coalesces queued output into pieces this big
FLOWS = ("none", "rtscts", "xonxoff")


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


class Outbox:
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


class Transport:
    """One port's I/O across reconnects: the reader thread opens and `attach`es a connection,
    reads it until it fails, then `detach`es it; the writer thread runs `writer_loop`."""

    def __init__(self, settings: PortSettings, out_limit: int, stop: threading.Event,
                 counters: collections.Counter):
        self.settings, self.counters, self._stop = settings, counters, stop
        self.outbox = Outbox(out_limit)
        self._lock = threading.Lock()       # a port is never closed while being written
        self._port: serial.Serial | None = None
        self._write_error: Exception | None = None

    def open(self) -> serial.Serial:
        """Raises what `explain_open_error` explains."""
        return open_port(self.settings)

    def attach(self, port: serial.Serial) -> None:
        self._write_error = None
        self._port = port

    def read(self, port: serial.Serial) -> bytes:
        """What has arrived (b"" after READ_TIMEOUT); raises when reading or writing failed."""
        if self._write_error is not None:
            raise self._write_error
        return port.read(max(1, min(port.in_waiting, 4096)))

    def detach(self, port: serial.Serial) -> None:
        """The connection is gone: close it (never under the writer) and drop unwritten output."""
        self._port = None
        with self._lock:
            port.close()
        self.outbox.clear()

    def put(self, data: bytes, wait: float = 0.0) -> bool:
        return self.outbox.put(data, wait)

    def writer_loop(self) -> None:
        while not self._stop.is_set():
            data = self.outbox.get(timeout=0.1)
            if data is not None:
                self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        """Write without ever blocking in the kernel: pyserial's write() with a write_timeout
        may raise after part of the data went out (we would repeat it), and with
        write_timeout=0 it spins on EAGAIN. Flow control shows up as the fd not writable."""
        view = memoryview(data)
        port = self._port
        while view and port is not None and not self._stop.is_set():
            with self._lock:
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
