"""What a protocol on the serial console does, and what the console offers it.

The console (edge.serial.console) owns the port, the line editor, the threads and the
reconnects; a protocol owns what the lines mean and what goes back: a greeting on each
connection, the handling of one line (in the session thread, one at a time), notices, and
what the port shows when the console is idle again. The console hands each protocol itself
(`console`), from which it uses: `engine`, `scheduler`, `params` (the `RequestDefaults` requests
are built from), `send(bytes, wait)`, `stream(events, cancel, render)`, `current_cancel()`,
`last_usage` and `stall_timeout`.
"""
from __future__ import annotations

from edge.serial.line_editor import Line


class Protocol:
    echo = False          # whether typed characters are echoed back (the line editor's echo)

    def __init__(self, console):
        self.console = console

    def greet(self) -> None:
        """A connection was made."""

    def handle(self, line: Line) -> None:
        """One non-blank line (session thread; the console is busy until it returns)."""
        raise NotImplementedError

    def report(self, code: str, message: str) -> None:
        """A notice that is not the answer to a line (too long, type-ahead dropped, error)."""
        raise NotImplementedError

    def line_too_long(self, limit: int) -> None:
        self.report("line_too_long", f"line longer than {limit} bytes: refused, the rest of it is ignored")

    def idle(self, event) -> None:
        """A line ended without work (blank, Ctrl-C at the prompt, the end of a refused line)."""

    def ready(self) -> None:
        """A line was handled; the console takes the next one."""
