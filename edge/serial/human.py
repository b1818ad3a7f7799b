"""The human protocol: a banner, a "> " prompt, local echo and line editing, replies streamed
as tokens arrive, Ctrl-C to stop a reply, and /commands. Turns keep their context (the engine
reuses the prefix) until /reset or until the context is full."""
from __future__ import annotations

from edge.engine.conversation import Conversation
from edge.engine import ContextFull, QueueFull
from edge.engine.engine import Event
from edge.serial.line_editor import Interrupt, Line
from edge.serial.protocol import Protocol

PROMPT = "> "

HELP = [
    ("/help", "this list"),
    ("/reset", "forget the conversation"),
    ("/system TEXT", "set the system prompt (none if empty) and forget the conversation"),
    ("/temp X", "sampling temperature (0 = always the likeliest token)"),
    ("/max N", "longest reply, in tokens"),
    ("/stats", "speed of the last reply and context used"),
    ("/model", "the model being served"),
]

# Model text must not drive the terminal: C0/C1 controls (ESC sequences, BEL, ...) are dropped.
_UNPRINTABLE = {c: None for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}


def terminal_text(text: str) -> bytes:
    return text.translate(_UNPRINTABLE).replace("\n", "\r\n").encode("utf-8")


class HumanProtocol(Protocol):
    def __init__(self, console, *, echo: bool = True, system: str | None = None):
        super().__init__(console)
        self.echo = echo
        self.engine = console.engine
        self.conv = Conversation(self.engine, system, generate=console.scheduler.stream)
        self._context_used = 0          # for /stats: prompt + reply tokens of the last turn

    # --- output -----------------------------------------------------------------------
    def write(self, text: str, wait: float = 0.0) -> bool:
        return self.console.send(terminal_text(text), wait)

    def say(self, text: str) -> None:
        self.write(f"({text})\r\n")

    def report(self, code: str, message: str) -> None:
        self.say(message)

    def greet(self) -> None:
        self.write(f"\r\nedge-llm serial console: {self.engine.name}, context {self.engine.max_ctx} "
                   f"tokens. Type /help for commands; Ctrl-C stops a reply.\r\n{PROMPT}")

    def line_too_long(self, limit: int) -> None:
        self.write("\r\n")                  # the refused text was echoed up to the limit
        super().line_too_long(limit)

    def idle(self, event) -> None:
        self.write("^C\r\n" + PROMPT if isinstance(event, Interrupt) else PROMPT)

    def ready(self) -> None:
        self.write(PROMPT)

    # --- a line -----------------------------------------------------------------------
    def handle(self, line: Line) -> None:
        if line.replaced or line.ignored:
            self.say(f"note: {line.replaced} invalid UTF-8 sequence(s) replaced by \ufffd, "
                     f"{line.ignored} control character(s)/escape sequence(s) ignored")
        text = line.text.strip()
        if text.startswith("/"):
            self._command(text)
        elif text:
            self._chat(text)

    def _clear(self) -> None:
        self.conv.reset()
        self._context_used = 0

    def _chat(self, text: str, retried: bool = False) -> None:
        cancel = self.console.current_cancel()
        try:
            last, stalled = self.console.stream(self.conv.ask(text, self.console.params.build(), cancel),
                                                cancel, terminal_text)
        except ContextFull as e:
            if retried or not self.conv.turns:
                self.say(f"that message does not fit: {e}")
                return
            self._clear()
            self.say("context full: conversation cleared, answering afresh")
            return self._chat(text, retried=True)
        except QueueFull as e:
            self.say(f"busy: {e}")
            return
        self._after_reply(last.final if last is not None else None, stalled)

    def _after_reply(self, last: Event | None, stalled: bool) -> None:
        if last is not None and last.usage is not None:
            self._context_used = last.usage.prompt_tokens + last.usage.completion_tokens
        cancelled = last is not None and last.finish_reason == "cancelled"
        self.write(" ^C\r\n" if cancelled and not stalled else "\r\n")
        if stalled:
            self.say(f"the port took nothing for {self.console.stall_timeout:g} s: reply cancelled")
        if not self._next_turn_fits():
            self._clear()
            self.say(f"context full ({self.engine.max_ctx} tokens): conversation cleared")

    def _next_turn_fits(self) -> bool:
        """The engine's context rule applied to the shortest next prompt (an empty message):
        when even that cannot fit, say so now rather than on the next line."""
        try:
            self.engine.check_fits(self.engine.encode_chat(self.conv.messages("")))
        except ContextFull:
            return False
        return True

    # --- /commands --------------------------------------------------------------------
    def _command(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        handler = {"/help": self._cmd_help, "/reset": self._cmd_reset, "/system": self._cmd_system,
                   "/temp": self._cmd_temp, "/max": self._cmd_max, "/stats": self._cmd_stats,
                   "/model": self._cmd_model}.get(name.lower())
        if handler is None:
            self.say(f"unknown command {name}; /help lists them")
        else:
            handler(arg.strip())

    def _cmd_help(self, _arg: str) -> None:
        for cmd, what in HELP:
            self.write(f"  {cmd:<14} {what}\r\n")
        self.write("  Ctrl-C         stop the reply in progress\r\n")

    def _cmd_reset(self, _arg: str) -> None:
        self._clear()
        self.say("conversation cleared")

    def _cmd_system(self, arg: str) -> None:
        self.conv.reset(arg or None)
        self._context_used = 0
        self.say("system prompt set; conversation cleared" if arg else "system prompt removed; conversation cleared")

    def _cmd_temp(self, arg: str) -> None:
        self._set("temperature", float, arg, "/temp X, a number >= 0", "temperature {p.sampling.temperature:g}")

    def _cmd_max(self, arg: str) -> None:
        self._set("max_tokens", int, arg, "/max N, a whole number >= 1", "replies stop after {p.max_tokens} tokens")

    def _set(self, field: str, parse, arg: str, usage: str, done: str) -> None:
        """One request field for the next replies; the request builder says what is valid."""
        try:
            self.console.params = self.console.params.with_overrides(**{field: parse(arg)})
        except ValueError as e:
            return self.say(f"usage: {usage} ({e})")
        self.say(done.format(p=self.console.params))

    def _cmd_stats(self, _arg: str) -> None:
        u = self.console.last_usage
        if u is None:
            self.say("no reply yet")
        else:
            self.say(f"last reply: {u.completion_tokens} tokens at {u.decode_tokens_per_second:.1f} tokens/s, "
                     f"first token after {u.time_to_first_token * 1000:.0f} ms; prompt {u.prompt_tokens} "
                     f"tokens, {u.cached_tokens} reused")
        params, max_ctx = self.console.params, self.engine.max_ctx
        self.say(f"context: {self._context_used}/{max_ctx} tokens used ({100 * self._context_used / max_ctx:.0f}%), "
                 f"{len(self.conv.turns) // 2} turn(s); temperature {params.sampling.temperature:g}, "
                 f"max {params.max_tokens} tokens; {self.console.scheduler.queue_depth} request(s) queued")

    def _cmd_model(self, _arg: str) -> None:
        self.say(f"model {self.engine.name}, context {self.engine.max_ctx} tokens")
