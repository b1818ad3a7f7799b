"""`edge-llm chat`: a terminal chat in the manner of llamafile's.

Line editing uses prompt_toolkit rather than the standard `readline`: it handles bracketed
paste itself (a pasted block is one message, whatever the terminal's readline settings),
has the same keys and history on every platform (Python's `readline` is GNU readline on
Debian but libedit elsewhere, and absent on some builds), and is a pure-Python wheel, so it
installs on the Pi's aarch64 as anywhere. When stdin is not a terminal, lines are read plainly.

- `\"\"\"` on a line starts a multi-line message, ended by a line ending in `\"\"\"`.
- /help, /context, /stats, /reset, /system TEXT, /exit; Ctrl-C stops a reply (the partial
  reply stays in the history, marked interrupted), Ctrl-D exits.
- A full context drops the oldest turns, never the system prompt, with a one-line notice
  (the rule: `Conversation.make_room`).
- `-f FILE`: the file's text goes before the first question.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

from edge.engine import ContextFull, replies
from edge.engine.conversation import Conversation

HELP = '''commands:
  /help           this list
  /context        tokens used / total, and what goes first when the context fills
  /stats          figures of the last reply (prompt, cached, generated, speed)
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set a new system prompt and start over (/system alone: none)
  /exit           quit (or Ctrl-D)
input:
  """             on a line of its own (or before the text) starts a multi-line message;
                  a line ending in """ ends it
  a pasted block is sent as one message; up/down recall earlier messages
  Ctrl-C          stops a reply (what came so far stays in the conversation, marked)'''

QUOTES = '"""'
PREVIEW = 60


def _block_aware(history_class):
    """A history that stores a triple-quote block whole (when it ends), not its opening line."""
    class History(history_class):
        def append_string(self, string: str) -> None:
            s = string.strip()
            if s.startswith(QUOTES) and not (len(s) >= 2 * len(QUOTES) and s.endswith(QUOTES)):
                return
            super().append_string(string)
    return History


def preview(text: str, width: int = PREVIEW) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[:width - 1] + "…"


class LineReader:
    """Input lines: prompt_toolkit on a terminal (history in EDGE_LLM_HOME/chat-history),
    plain reads otherwise. Both raise EOFError at the end and KeyboardInterrupt on Ctrl-C."""

    def __init__(self, history_file: Path | None, interactive: bool | None = None):
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty() if interactive is None else interactive
        self.session = self.more = None
        if self.interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory
            history = _block_aware(InMemoryHistory)()
            if history_file is not None:
                with contextlib.suppress(OSError):
                    history_file.parent.mkdir(parents=True, exist_ok=True)
                    history = _block_aware(FileHistory)(str(history_file))
            self.session = PromptSession(history=history)
            self.more = PromptSession()          # continuation lines stay out of the history

    def first(self, prompt: str) -> str:
        return self.session.prompt(prompt) if self.session else self._plain(prompt)

    def next(self, prompt: str) -> str:
        return self.more.prompt(prompt) if self.more else self._plain(prompt)

    @staticmethod
    def _plain(prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def message(self) -> str:
        """One message: a line (a pasted block included), or a \"\"\" block."""
        line = self.first("> ")
        if not line.lstrip().startswith(QUOTES):
            return line
        rest = line.lstrip()[len(QUOTES):]
        if rest.rstrip().endswith(QUOTES):
            return rest.rstrip()[:-len(QUOTES)]
        lines = [rest] if rest.strip() else []
        while True:
            line = self.next("… ")
            if line.rstrip().endswith(QUOTES):
                lines.append(line.rstrip()[:-len(QUOTES)])
                text = "\n".join(lines).rstrip("\n")
                if self.session:         # up-arrow brings the whole block back
                    self.session.history.append_string(QUOTES + text + QUOTES)
                return text
            lines.append(line)


@contextlib.contextmanager
def ctrl_c_cancels(cancel: threading.Event):
    """While a reply streams, Ctrl-C asks the engine to stop at the next token (the reply
    then ends cleanly as "cancelled"); a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class TerminalChat:
    def __init__(self, engine, params, system: str | None = None, preamble: str | None = None,
                 out=None, err=None, format_stats=None):
        self.engine, self.params = engine, params
        self.conv = Conversation(engine, system)
        self.preamble = preamble          # -f FILE: put before the first question
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.format_stats = format_stats

    @property
    def reserve(self) -> int:
        """Tokens kept free for a reply when old turns are dropped."""
        limit = self.params.max_tokens or self.engine.max_ctx
        return max(1, min(limit, self.engine.max_ctx // 4))

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def loop(self, reader: LineReader) -> int:
        while True:
            try:
                text = reader.message()
            except EOFError:
                print(file=self.out)
                return 0
            except KeyboardInterrupt:
                continue
            try:
                if not self.handle(text):
                    return 0
            except KeyboardInterrupt:     # Ctrl-C between Enter and the reply's first token
                print(" [interrupted]", file=self.out)

    def handle(self, text: str) -> bool:
        """One message or command; False to quit."""
        stripped = text.strip()
        if not stripped:
            return True
        if stripped.startswith("/") and "\n" not in stripped:
            return self.command(stripped)
        self.chat(text)
        return True

    def command(self, text: str) -> bool:
        cmd, _, arg = text.partition(" ")
        cmd = cmd.lower()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd in ("/help", "/?"):
            print(HELP, file=self.out)
        elif cmd == "/reset":
            self.conv.reset()
            print("(conversation cleared)", file=self.out)
        elif cmd == "/system":
            self.conv.reset(arg.strip() or None)
            print("(system prompt set; conversation cleared)" if arg.strip() else
                  "(no system prompt; conversation cleared)", file=self.out)
        elif cmd == "/stats":
            self.stats()
        elif cmd == "/context":
            self.context()
        else:
            print(f"unknown command {cmd}; /help lists them", file=self.out)
        return True

    def stats(self) -> None:
        u = self.conv.last_usage
        print(self.format_stats(u) if u else "(no reply yet)", file=self.out)
        print(f"context: {len(self.conv.tokens())}/{self.engine.max_ctx} tokens", file=self.out)

    def context(self) -> None:
        used, total = len(self.conv.tokens()), self.engine.max_ctx
        turns = self.conv.turns
        print(f"context: {used}/{total} tokens ({100 * used / total:.0f} %), {len(turns) // 2} turn(s); "
              f"{self.reserve} tokens are kept free for a reply", file=self.out)
        if self.conv.system:
            print(f"  system (always kept): {preview(self.conv.system)}", file=self.out)
        for i, m in enumerate(turns):
            mark = " [interrupted]" if m.get("interrupted") else ""
            print(f"  {i + 1:>3} {m['role']}: {preview(m['content'])}{mark}", file=self.out)
        if turns:
            oldest = self.conv.oldest_turn()
            print(f"when full, dropped first: message(s) 1-{len(oldest)} "
                  f"({preview(oldest[0]['content'], 30)})", file=self.out)

    def chat(self, text: str) -> None:
        if self.preamble is not None and not self.conv.turns:
            text = f"{self.preamble}\n\n{text}"
        try:
            dropped = self.conv.make_room(text, self.reserve)
        except ContextFull as e:
            self.say(f"(that message does not fit: {e.needed} tokens against a context of {e.max_ctx}; "
                     "shorten it, or /system to shorten the system prompt)")
            return
        if dropped:
            self.say(f"(context full: dropped the {len(dropped)} oldest message(s) to make room; "
                     "the system prompt is kept)")
        if self.preamble is not None and not self.conv.turns:
            self.preamble = None          # it went with this first question
        cancel = threading.Event()
        last = None
        with ctrl_c_cancels(cancel):
            try:
                for piece in replies.stream(self.conv.ask(text, self.params, cancel)):
                    if piece.text:
                        self.out.write(piece.text)
                        self.out.flush()
                    last = piece.final or last
            except KeyboardInterrupt:
                pass                      # a second Ctrl-C: ask() recorded the partial reply
        if last is None or last.finish_reason == "cancelled":
            self.out.write(" [interrupted]")
        elif last.finish_reason == "length":
            self.out.write(f" [cut at {last.usage.completion_tokens} tokens: --max-tokens]")
        self.out.write("\n")
        self.out.flush()


def run(a, engine, params, format_stats) -> int:
    preamble = None
    if a.file:
        preamble = Path(a.file).read_text(encoding="utf-8", errors="replace").strip()
    chat = TerminalChat(engine, params, a.system, preamble, format_stats=format_stats)
    from edge.launch.model_store import home
    reader = LineReader(home() / "chat-history")
    extra = f"; {a.file} goes before your first question" if a.file else ""
    chat.say(f"edge-llm chat with {engine.name} (context {engine.max_ctx} tokens{extra}). /help for commands; "
             '""" for several lines; Ctrl-C stops a reply, Ctrl-D exits.')
    return chat.loop(reader)
