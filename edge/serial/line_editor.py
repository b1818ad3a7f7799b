"""Bytes from a serial terminal -> edited lines, one byte at a time.

A serial line delivers whatever the other end sends: terminals in raw mode (picocom, screen,
minicom) send CR or CRLF for Enter, BS or DEL for Backspace, escape sequences for arrow keys;
line noise or a wrong baud rate sends invalid UTF-8 and random control bytes. This state
machine turns all of that into whole lines and never raises:

- CR, LF and CRLF end a line; the LF of a CRLF is swallowed, so it counts once.
- BS (0x08) and DEL (0x7F) erase the last character (a whole character, not one byte);
  Ctrl-U erases the line.
- Ctrl-C (0x03) throws the line away and reports an interrupt (the console cancels a reply).
- Escape sequences (CSI `ESC [ ... final`, SS3 `ESC O x`, `ESC x`) are consumed and counted;
  other control bytes are dropped and counted; invalid UTF-8 becomes U+FFFD and is counted.
  The counts ride on the `Line` so the console can say what it ignored.
- A line whose text passes `limit` bytes is refused once (`TooLong`), and everything up to its
  end is discarded (`Discarded` at the end of the line), so memory stays bounded.

It is fed one byte at a time so that the console can stop right after a line (and keep the
bytes that follow as type-ahead, not echoed into the reply that line starts).
"""
from __future__ import annotations

import codecs
import unicodedata
from dataclasses import dataclass
from typing import Callable

CTRL_C, BS, TAB, LF, CR, CTRL_U, ESC, DEL = 0x03, 0x08, 0x09, 0x0A, 0x0D, 0x15, 0x1B, 0x7F
MAX_ESCAPE = 32          # a longer "escape sequence" is noise; give up on it


@dataclass
class Line:
    text: str
    replaced: int = 0     # U+FFFD in the text: invalid UTF-8 replaced
    ignored: int = 0      # control bytes and escape sequences dropped


@dataclass
class Interrupt:
    """Ctrl-C."""


@dataclass
class TooLong:
    limit: int            # sent as soon as the line passes the limit


@dataclass
class Discarded:
    nbytes: int           # the end of a refused line: how many bytes were thrown away


Event = Line | Interrupt | TooLong | Discarded


class LineEditor:
    def __init__(self, limit: int = 4096, echo: Callable[[bytes], None] | None = None):
        self.limit = limit
        self.echo = echo            # None: no local echo (machine mode, or --no-echo)
        self.reset()

    def reset(self) -> None:
        """Forget the current line and any half-received sequence (e.g. after a reconnect)."""
        self._chars: list[str] = []
        self._nbytes = 0
        self._replaced = self._ignored = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._after_cr = False
        self._escape: bytearray | None = None     # bytes of an escape sequence in progress
        self._discarding: int | None = None       # bytes thrown away of a refused line

    def feed(self, data: bytes) -> list[Event]:
        """All events for `data` (convenience for callers that need not stop at a line)."""
        return [ev for b in data if (ev := self.push(b)) is not None]

    def push(self, b: int) -> Event | None:
        after_cr, self._after_cr = self._after_cr, False
        if self._escape is not None and self._continue_escape(b):
            return None
        if b == CTRL_C:
            self.reset()
            return Interrupt()
        if b == LF and after_cr:
            return None                              # the LF of CRLF
        if b in (CR, LF):
            event = self._end_line()
            self._after_cr = b == CR
            return event
        if self._discarding is not None:
            self._discarding += 1
            return None
        return self._edit(b)

    # --- editing ----------------------------------------------------------------------
    def _edit(self, b: int) -> Event | None:
        if b in (BS, DEL):
            self._erase(1)
        elif b == CTRL_U:
            self._erase(len(self._chars))
        elif b == ESC:
            self._flush_partial()
            self._escape = bytearray()
        elif b < 0x20 and b != TAB:
            self._flush_partial()
            self._ignored += 1
        else:
            return self._add(self._decoder.decode(bytes([b])))
        return None

    def _add(self, text: str) -> Event | None:
        for c in text:
            if 0x80 <= ord(c) < 0xA0:                # C1 controls, sent as UTF-8
                self._ignored += 1
                continue
            self._nbytes += len(c.encode("utf-8", "surrogatepass"))
            if self._nbytes > self.limit:
                return self._refuse()
            self._replaced += c == "\ufffd"
            self._chars.append(c)
            self._echo(c.encode("utf-8"))
        return None

    def _flush_partial(self) -> None:
        """A control byte ends any half-received UTF-8 character: it was invalid."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        if text:
            self._add(text)

    def _erase(self, n: int) -> None:
        if self._decoder.getstate()[0]:              # a half-typed character goes first
            self._decoder.reset()
            return
        for _ in range(min(n, len(self._chars))):
            c = self._chars.pop()
            self._nbytes -= len(c.encode("utf-8", "surrogatepass"))
            self._replaced -= c == "\ufffd"
            width = 2 if unicodedata.east_asian_width(c) in "WF" else 1
            self._echo(b"\b \b" * width)

    def _refuse(self) -> TooLong:
        self._discarding = self._nbytes
        self._chars.clear()
        self._decoder.reset()
        return TooLong(self.limit)

    def _end_line(self) -> Event:
        if self._discarding is not None:
            event: Event = Discarded(self._discarding)
        else:
            self._flush_partial()
            event = Line("".join(self._chars), self._replaced, self._ignored)
            self._echo(b"\r\n")
        self.reset()
        return event

    # --- escape sequences -------------------------------------------------------------
    def _continue_escape(self, b: int) -> bool:
        """Consume `b` as part of an escape sequence; False hands it back to normal input
        (a control byte or non-ASCII byte cannot be part of one: Enter must still work)."""
        seq = self._escape
        if b < 0x20 or b >= 0x7F or len(seq) >= MAX_ESCAPE:
            self._escape = None
            self._ignored += 1
            return b == ESC and self._restart_escape()
        seq.append(b)
        done = (len(seq) == 1 and b not in b"[O") or \
               (len(seq) >= 2 and seq[0] == ord("O")) or \
               (len(seq) >= 2 and seq[0] == ord("[") and 0x40 <= b <= 0x7E)
        if done:
            self._escape = None
            self._ignored += 1
        return True

    def _restart_escape(self) -> bool:
        self._escape = bytearray()
        return True

    def _echo(self, data: bytes) -> None:
        if self.echo is not None and self._discarding is None:
            self.echo(data)
