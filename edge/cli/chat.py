"""`edge-llm chat`: a terminal chat in the manner of llamafile's.

Line editing uses prompt_toolkit rather than the standard `readline`: it handles bracketed
paste itself (a pasted block is one message, whatever the terminal's readline settings),
has the same keys and history on every platform (Python's `readline` is GNU readline on
Debian but libedit elsewhere, and absent on some builds), and is a pure-Python wheel, so it
installs on the Pi's aarch64 as anywhere. When stdin is not a terminal, lines are read plainly.

- `\"\"\"` on a line starts a multi-line message, ended by a line ending in `\"\"\"`.
- /help, /context, /stats, /reset, /system TEXT, /set, /save FILE, /load FILE, /exit; Ctrl-C
  stops a reply (the partial reply stays in the history, marked interrupted), Ctrl-D exits.
- Replies are wrapped at word boundaries to the terminal's width; keys typed while a reply
  streams are not echoed into it: they wait, and arrive at the next prompt.
- A conversation is saved and loaded as JSON: OpenAI's `messages` array.
- A full context drops the oldest turns, never the system prompt, with a one-line notice
  (the rule: `Conversation.make_room`).
- `-f FILE`: the file's text goes before the first question.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
from pathlib import Path

from edge.engine import ContextFull, replies
from edge.engine.conversation import Conversation
from edge.engine.engine import GenerationParams
from edge.launch.request import RequestDefaults

HELP = '''commands:
  /help           this list
  /context        tokens used / total, and what goes first when the context fills
  /stats          figures of the last reply (prompt, cached, generated, speed)
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set a new system prompt and start over (/system alone: none)
  /set            show the settings below
  /set temperature X | max_tokens N | system TEXT
                  change one for the rest of the chat (system starts over, like /system)
  /save FILE      write the conversation to FILE as JSON (OpenAI's messages array)
  /load FILE      continue a conversation saved with /save (or any such messages array)
  /exit           quit (or Ctrl-D)
input:
  """             on a line of its own (or before the text) starts a multi-line message;
                  a line ending in """ ends it
  a pasted block is sent as one message; up/down recall earlier messages
  Ctrl-C          stops a reply (what came so far stays in the conversation, marked)
  keys typed while a reply streams wait for the next prompt'''

QUOTES = '"""'
PREVIEW = 60
SETTABLE = {"temperature": float, "max_tokens": int}      # /set NAME VALUE: request fields and their types


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


class WordWrap:
    """Streamed text wrapped at word boundaries to `width` columns (None: as it comes). A word
    is held until its end (a space or a newline) has arrived, so that it goes to the next line
    whole; a word wider than the line is broken."""

    def __init__(self, out, width: int | None):
        from prompt_toolkit.utils import get_cwidth
        self.out, self.width, self.cwidth = out, width, get_cwidth
        self.col = 0
        self.word = ""
        self.wrapped = False              # the line was broken here: a space at its start goes

    def write(self, text: str) -> None:
        if not self.width:
            self.out.write(text)
        else:
            for ch in text:
                if ch == "\n":
                    self._word()
                    self.out.write("\n")
                    self.col, self.wrapped = 0, False
                elif ch == " ":
                    self._word()
                    if self.col >= self.width:      # a space at the edge: the next line
                        self.out.write("\n")
                        self.col, self.wrapped = 0, True
                    elif not (self.col == 0 and self.wrapped):
                        self.out.write(" ")
                        self.col += 1
                else:
                    self.word += ch
        self.out.flush()

    def finish(self) -> None:
        self._word()
        self.out.flush()

    def _word(self) -> None:
        word, self.word = self.word, ""
        if not word:
            return
        w = self.cwidth(word)
        self.wrapped = False
        if self.col and self.col + w > self.width:
            self.out.write("\n")
            self.col = 0
        if w <= self.width:
            self.out.write(word)
            self.col += w
            return
        for ch in word:                              # longer than a line: break it
            cw = self.cwidth(ch)
            if self.col + cw > self.width:
                self.out.write("\n")
                self.col = 0
            self.out.write(ch)
            self.col += cw


def terminal_width(out) -> int | None:
    """Columns to wrap replies to: the terminal's, when `out` is one (a pipe gets text as is)."""
    try:
        if not out.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return max(10, shutil.get_terminal_size().columns - 1)


@contextlib.contextmanager
def typing_held(stream=None):
    """While a reply streams, what is typed is not echoed into it: the terminal's echo and line
    editing are off, so the keys wait in its input queue (Ctrl-C still interrupts), and the
    next prompt reads them. The settings come back as they were, the queue untouched."""
    stream = stream or sys.stdin
    try:
        import termios
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, AttributeError, ValueError, OSError):
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def load_messages(path: Path) -> tuple[str | None, list[dict]]:
    """A saved conversation: OpenAI's messages array (or an object with one under "messages"),
    as (system prompt, turns). ValueError says what is wrong with it."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of messages ({\"role\": ..., \"content\": ...})")
    system, turns = None, []
    for i, m in enumerate(data):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i + 1}: expected {{\"role\": \"system\"|\"user\"|\"assistant\", "
                             "\"content\": \"text\"}")
        if m["role"] == "system":
            if i:
                raise ValueError(f"message {i + 1}: a system message may only come first")
            system = m["content"]
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    return system, turns


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
    def __init__(self, engine, defaults: RequestDefaults, system: str | None = None, preamble: str | None = None,
                 out=None, err=None, format_stats=None):
        self.engine, self.defaults = engine, defaults
        self.conv = Conversation(engine, system)
        self.preamble = preamble          # -f FILE: put before the first question
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.format_stats = format_stats
        self.hold_typing = False          # a terminal: keys typed during a reply wait (typing_held)

    @property
    def params(self) -> GenerationParams:
        """The next reply's request: the command line's options and what /set changed."""
        return self.defaults.build()

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
        elif cmd == "/set":
            self.set(arg.strip())
        elif cmd == "/save":
            self.save(arg.strip())
        elif cmd == "/load":
            self.load(arg.strip())
        else:
            print(f"unknown command {cmd}; /help lists them", file=self.out)
        return True

    def set(self, arg: str) -> None:
        """/set NAME VALUE: a request field for the next replies (the request builder says what
        is valid), or the system prompt."""
        name, _, value = arg.partition(" ")
        name, value = name.lower().replace("-", "_"), value.strip()
        if not name:
            p = self.params
            print(f"temperature {p.sampling.temperature}, max_tokens {p.max_tokens or 'until the context is full'}, "
                  f"system {preview(self.conv.system) if self.conv.system else '(none)'}", file=self.out)
        elif name == "system":
            self.conv.reset(value or None)
            print("(system prompt set; conversation cleared)" if value else
                  "(no system prompt; conversation cleared)", file=self.out)
        elif name not in SETTABLE:
            print(f"/set knows {', '.join(SETTABLE)} and system, not {name}", file=self.out)
        else:
            try:
                self.defaults = self.defaults.with_overrides(**{name: SETTABLE[name](value)})
            except ValueError as e:
                print(f"(not changed: {e})", file=self.out)
                return
            print(f"({name} = {value})", file=self.out)

    def save(self, arg: str) -> None:
        if not arg:
            print("/save FILE: which file?", file=self.out)
            return
        path = Path(arg).expanduser()
        messages = self.conv.messages()
        try:
            path.write_text(json.dumps(messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"(not saved: {e.strerror or e}: {path})", file=self.out)
            return
        print(f"(saved {len(messages)} message(s) to {path})", file=self.out)

    def load(self, arg: str) -> None:
        if not arg:
            print("/load FILE: which file?", file=self.out)
            return
        path = Path(arg).expanduser()
        try:
            system, turns = load_messages(path)
        except OSError as e:
            print(f"(not loaded: {e.strerror or e}: {path})", file=self.out)
            return
        except ValueError as e:
            print(f"(not loaded: {path} is not a saved conversation: {e})", file=self.out)
            return
        self.conv.reset(system)
        self.conv.turns[:] = turns
        used = len(self.conv.tokens())
        print(f"(loaded {len(turns)} message(s){' and the system prompt' if system else ''} from {path}; "
              f"context {used}/{self.engine.max_ctx} tokens)", file=self.out)

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
        wrap = WordWrap(self.out, terminal_width(self.out))
        with ctrl_c_cancels(cancel), (typing_held() if self.hold_typing else contextlib.nullcontext()):
            try:
                for piece in replies.stream(self.conv.ask(text, self.params, cancel)):
                    if piece.text:
                        wrap.write(piece.text)
                    last = piece.final or last
            except KeyboardInterrupt:
                pass                      # a second Ctrl-C: ask() recorded the partial reply
        if last is None or last.finish_reason == "cancelled":
            wrap.write(" [interrupted]")
        elif last.finish_reason == "length":
            wrap.write(" " + self.cut_note(last.usage))
        wrap.finish()
        self.out.write("\n")
        self.out.flush()

    def cut_note(self, usage) -> str:
        """Why a reply ended as "length": the token limit, the full context, or the loop guard
        (neither limit reached: it was repeating itself)."""
        n = usage.completion_tokens
        if self.params.max_tokens and n >= self.params.max_tokens:
            return f"[cut at {n} tokens: --max-tokens, /set max_tokens]"
        if usage.prompt_tokens + n + 1 >= self.engine.max_ctx:
            return f"[cut at {n} tokens: the context is full]"
        return f"[stopped after {n} tokens: the reply was repeating itself]"


def run(a, engine, defaults: RequestDefaults, format_stats) -> int:
    preamble = None
    if a.file:
        preamble = Path(a.file).read_text(encoding="utf-8", errors="replace").strip()
    chat = TerminalChat(engine, defaults, a.system, preamble, format_stats=format_stats)
    from edge.launch.model_store import home
    reader = LineReader(home() / "chat-history")
    chat.hold_typing = reader.interactive
    extra = f"; {a.file} goes before your first question" if a.file else ""
    chat.say(f"edge-llm chat with {engine.name} (context {engine.max_ctx} tokens{extra}). /help for commands; "
             '""" for several lines; Ctrl-C stops a reply, Ctrl-D exits.')
    return chat.loop(reader)
