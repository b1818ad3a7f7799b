"""The serial console on real ttys: each test opens a pseudo-terminal pair, runs the console on
the slave (through pyserial, by its /dev/pts name) and types on the master, like picocom would.

Simulations of the hardware (all kernel behaviour, no mocks):
- unplugging: closing the master makes the slave read fail (as a vanished USB device does);
  the console opens the port through a symlink, which the test removes (the device node is
  gone) and then points at a new pty (the device is back);
- flow control: tcflow(TCOOFF) on the tty stops its output exactly as XOFF or a low CTS does;
- a port in use: another exclusive pyserial open of the same tty.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import termios
import threading
import time

import pytest
import serial

from edge.cli import main as cli
from edge.launch.args import add_sampling_args
from edge.serial import port as serial_port
from edge.model.bundle import Bundle
from edge.engine.engine import Engine, GenerationParams
from edge.serial.line_editor import Discarded, Interrupt, Line, LineEditor, TooLong
from edge.engine.sampler import SamplingParams
from edge.launch.scheduling import start_scheduler
from edge.launch.request import RequestDefaults
from edge.serial.args import add_serial_args, start_from_args
from edge.serial.console import SerialConsole
from edge.serial.port import PortSettings, SerialConsoleError

PROMPT = b"\r\n> "
WORDS = re.compile(rb"^(w\d+( w\d+)*)?$")     # the tiny model's replies: "w12 w99 ..."


# --- the line editor on its own ---------------------------------------------------------
def test_cr_lf_and_crlf_each_end_one_line():
    ed = LineEditor()
    assert ed.feed(b"a\rb\nc\r\nd\r\r\n") == [Line("a"), Line("b"), Line("c"), Line("d"), Line("")]


def test_crlf_split_across_reads_counts_once():
    ed = LineEditor()
    assert ed.feed(b"a\r") == [Line("a")] and ed.feed(b"\nb\r") == [Line("b")]


def test_backspace_and_del_erase_whole_characters_with_echo():
    echoed = []
    ed = LineEditor(echo=echoed.append)
    assert ed.feed("xé\x7f€\x08y\x08\x08z\r".encode()) == [Line("z")]
    assert b"".join(echoed) == "xé\b \b€\b \by\b \b\b \bz\r\n".encode()


def test_backspace_drops_a_half_received_character():
    ed = LineEditor()
    assert ed.feed(b"ab\xe2\x82\x7f\r") == [Line("ab")]


def test_ctrl_u_erases_the_line_and_ctrl_c_interrupts():
    ed = LineEditor()
    assert ed.feed(b"abc\x15d\r") == [Line("d")]
    assert ed.feed(b"half\x03x\r") == [Interrupt(), Line("x")]


def test_escape_sequences_and_controls_are_dropped_and_counted():
    ed = LineEditor()
    # up arrow (CSI), F1 (SS3), Alt-x, a CSI with parameters, NUL, BEL
    assert ed.feed(b"a\x1b[Ab\x1bOPc\x1bxd\x1b[1;5De\x00\x07f\r") == [Line("abcdef", ignored=6)]


def test_escape_cannot_swallow_enter_or_ctrl_c():
    ed = LineEditor()
    assert ed.feed(b"ab\x1b\r") == [Line("ab", ignored=1)]
    assert ed.feed(b"\x1b[12\x03") == [Interrupt()]
    assert ed.feed(b"\x1b[" + b"1" * 100 + b"Z\r") == [Line("1" * 69 + "Z", ignored=1)]   # 31 eaten


def test_invalid_utf8_is_replaced_and_counted():
    ed = LineEditor()
    assert ed.feed(b"\xffok\xc3\r") == [Line("\ufffdok\ufffd", replaced=2)]
    assert ed.feed("añ€😀\r".encode()) == [Line("añ€😀")]


def test_too_long_line_refused_once_and_discarded_to_its_end():
    echoed = []
    ed = LineEditor(limit=10, echo=echoed.append)
    events = ed.feed(b"0123456789ABCDEF" * 100 + b"\r\nnext\r")
    assert events == [TooLong(10), Discarded(1600 - 10 + 10), Line("next")]
    assert b"".join(echoed) == b"0123456789" + b"next\r\n"     # nothing of the refused tail


def test_limit_counts_bytes_not_characters():
    ed = LineEditor(limit=6)
    assert ed.feed("€€\r".encode()) == [Line("€€")]
    assert ed.feed("€€€\r".encode())[0] == TooLong(6)


# --- a console on a pseudo-terminal -----------------------------------------------------
@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle):
    return tiny_bundle


@pytest.fixture
def engine(bundle_dir):
    engine = Engine(Bundle.open(bundle_dir), max_ctx=256)
    engine.eos_ids = frozenset()          # replies run to max_tokens: lengths are predictable
    return engine


@pytest.fixture
def scheduler(engine):
    return start_scheduler(engine)


def slow_down(engine, seconds_per_token):
    """A model as slow as a big one on a Pi, so that replies last long enough to interrupt."""
    step = engine.step

    def slow(seqs):
        time.sleep(seconds_per_token)
        return step(seqs)
    engine.step = slow


class Terminal:
    """The master side of a pty: what picocom would see and type."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.pending = bytearray()

    def type(self, data: bytes | str) -> None:
        os.write(self.master, data.encode() if isinstance(data, str) else data)

    def _fill(self, timeout: float) -> None:
        if select.select([self.master], [], [], timeout)[0]:
            self.pending += os.read(self.master, 65536)

    def read_until(self, marker: bytes = PROMPT, timeout: float = 10.0) -> bytes:
        end = time.monotonic() + timeout
        while (i := self.pending.find(marker)) < 0:
            if time.monotonic() > end:
                raise AssertionError(f"no {marker!r} within {timeout} s; got {bytes(self.pending[-400:])!r}")
            self._fill(0.05)
        out = bytes(self.pending[:i + len(marker)])
        del self.pending[:i + len(marker)]
        return out

    def read_for(self, seconds: float) -> bytes:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._fill(0.02)
        out = bytes(self.pending)
        self.pending.clear()
        return out

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def term():
    t = Terminal()
    yield t
    t.close()


def make_console(engine, scheduler, path, logs=None, max_tokens=12, **kw) -> SerialConsole:
    params = RequestDefaults(max_tokens=max_tokens, sampling=SamplingParams(temperature=1.0, seed=0))
    log = logs.append if logs is not None else (lambda msg: None)
    return SerialConsole(engine, scheduler, PortSettings(path), params=params, retry=(0.05, 0.2), log=log, **kw)


@pytest.fixture
def consoles():
    started = []
    yield started
    for c in started:
        c.stop()


@pytest.fixture
def console(engine, scheduler, term, consoles):
    c = make_console(engine, scheduler, term.path).start()
    consoles.append(c)
    banner = term.read_until(b"> ")
    assert engine.name.encode() in banner and b"/help" in banner
    return c


def ask(term, text: str, timeout: float = 10.0) -> bytes:
    """Type a line; return what came back before the next prompt, minus the echo."""
    term.type(text + "\r")
    out = term.read_until(PROMPT, timeout)
    echo = text.encode() + b"\r\n"
    assert out.startswith(echo), out
    return out[len(echo):-len(PROMPT)]


def test_prompt_gets_a_reply_ending_in_the_prompt_marker(console, term):
    reply = ask(term, "hello w5")
    assert WORDS.match(reply) and len(reply.split()) == 12, reply


def test_reply_streams_as_tokens_arrive(engine, console, term):
    slow_down(engine, 0.05)
    term.type("hello\r")
    term.read_until(b"hello\r\n")
    t0 = time.monotonic()
    term.read_until(b"w")
    first = time.monotonic() - t0
    term.read_until(PROMPT)
    total = time.monotonic() - t0
    assert total - first > 0.4, (first, total)   # 12 tokens 50 ms apart: text came before the end


def test_line_endings_cr_lf_crlf_give_one_line_each(console, term):
    for ending in ("\r", "\n", "\r\n"):
        term.type("/model" + ending)
        out = term.read_until(PROMPT)
        assert out.count(b"(model ") == 1, out
    assert term.read_for(0.3) == b""          # the LF of CRLF gave no second, empty line


def test_no_echo(engine, scheduler, term, consoles):
    consoles.append(make_console(engine, scheduler, term.path, echo=False).start())
    term.read_until(b"> ")
    term.type("/model\r")
    assert term.read_until(PROMPT).startswith(b"(model ")


def test_commands_reset_system_stats_temp_max(console, term):
    assert b"no reply yet" in ask(term, "/stats")
    ask(term, "first turn")
    stats = ask(term, "/stats").decode()
    assert re.search(r"12 tokens at [\d.]+ tokens/s", stats) and "1 turn(s)" in stats, stats
    used = int(re.search(r"context: (\d+)/256", stats).group(1))
    assert used > 12

    ask(term, "second turn")
    stats = ask(term, "/stats").decode()
    # whole 64-token prefill chunks of the first prompt are reused (the same answer as cold)
    assert "2 turn(s)" in stats and int(re.search(r"(\d+) reused", stats).group(1)) == (used - 12) // 64 * 64, stats

    assert b"conversation cleared" in ask(term, "/reset")
    assert "context: 0/256" in ask(term, "/stats").decode() and console.protocol.conv.turns == []

    assert b"system prompt set" in ask(term, "/system be brief")
    assert console.protocol.conv.system == "be brief"

    assert b"replies stop after 3 tokens" in ask(term, "/max 3")
    assert len(ask(term, "short").split()) == 3
    assert b"usage: /max N" in ask(term, "/max lots") and console.params.max_tokens == 3

    ask(term, "/temp 0")
    assert console.params.sampling.temperature == 0
    ask(term, "/reset")
    greedy = ask(term, "same question")
    ask(term, "/reset")
    assert ask(term, "same question") == greedy
    assert b"usage: /temp X" in ask(term, "/temp -1")
    assert b"unknown command /nope" in ask(term, "/nope")
    assert all(cmd in ask(term, "/help") for cmd in (b"/reset", b"/system", b"/temp", b"/max", b"/stats", b"/model"))


def test_full_context_is_reported_and_cleared(console, term):
    ask(term, "/max 100")
    outs = [ask(term, f"turn {i}") for i in range(4)]      # 3 x 100 tokens cannot fit in 256
    full = [i for i, out in enumerate(outs) if b"context full" in out]
    assert full and full[0] in (1, 2) and b"conversation cleared" in outs[full[0]], outs
    assert len(console.protocol.conv.turns) <= 2 * (3 - full[0])


def test_ctrl_c_stops_a_long_reply_quickly(engine, scheduler, console, term):
    slow_down(engine, 0.02)
    ask(term, "/max 200")              # 4 s at 20 ms a token
    term.type("tell me everything\r")
    term.read_until(b"w")
    time.sleep(0.2)
    t0 = time.monotonic()
    term.type(b"\x03")
    out = term.read_until(PROMPT, timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert out.endswith(b" ^C" + PROMPT), out
    assert console.last_usage.completion_tokens < 100
    assert not scheduler.busy


def test_input_during_a_reply_waits_for_the_prompt(engine, console, term):
    slow_down(engine, 0.03)
    term.type("hello\r")
    term.read_until(b"w")
    term.type("/model\r/stats\r")      # a burst while the reply streams
    reply = term.read_until(PROMPT)
    assert WORDS.match(b"w" + reply[:-len(PROMPT)]), reply
    assert term.read_until(PROMPT).startswith(b"/model\r\n(model ")
    assert term.read_until(PROMPT).startswith(b"/stats\r\n(last reply: 12 tokens")


def test_too_much_type_ahead_is_dropped_and_reported(engine, scheduler, term, consoles):
    slow_down(engine, 0.03)
    consoles.append(make_console(engine, scheduler, term.path, typeahead_limit=100).start())
    term.read_until(b"> ")
    term.type("hello\r")
    term.read_until(b"w")
    term.type("/model\r" + "x" * 500)
    assert b"bytes sent during the reply were dropped" in term.read_until(PROMPT)
    assert term.read_until(PROMPT).startswith(b"/model\r\n(model ")     # the first 100 bytes ran
    term.type("\x03")
    assert term.read_until(PROMPT) == b"^C" + PROMPT        # the cut line is gone whole


def test_long_line_refused_then_console_answers(console, term):
    term.type(b"a" * 10_000 + b"\r")
    out = term.read_until(PROMPT)
    assert out.startswith(b"a" * 4096 + b"\r\n(line longer than 4096 bytes: refused"), out[4000:]
    assert console.last_usage is None             # nothing reached the model
    assert WORDS.match(ask(term, "still there?"))


def test_bad_bytes_are_replaced_and_reported(console, term):
    term.type(b"\xff\x00hi\x1b[A\r")
    out = term.read_until(PROMPT)
    assert b"1 invalid UTF-8 sequence(s) replaced" in out and b"2 control character(s)" in out, out
    assert console.protocol.conv.turns[-2]["content"] == "\ufffdhi"


FUZZ_PIECES = [b"\x00", b"\xff", b"\x03", b"\x1b[", b"\x1b[1;5A", b"\x1bO", b"\r", b"\n", b"\r\n", b"\x7f",
               b"\x08", "€".encode()[:2], "😀".encode(), b"/stats\r", b"/reset\r", b"/max 4\r", b"/temp x\r",
               b'{"prompt": "x", "max_tokens": 3}\n', b'{"prompt": \n', b'{"messages": 5}\n']


def fuzz(term, seconds: float, seed: int) -> int:
    """Random bytes: NUL, 0xFF, Ctrl-C, escape sequences, commands, JSON, 10 kB lines."""
    rng = random.Random(seed)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind = rng.random()
        if kind < 0.05:       # no CR/LF/Ctrl-C/Ctrl-U inside: one line over the limit
            chunk = rng.randbytes(10_000).translate(None, b"\r\n\x03\x15") + b"\r"
        elif kind < 0.5:
            chunk = rng.randbytes(rng.randint(1, 300))
        else:
            chunk = b"".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 20)))
        term.type(chunk)
        sent += len(chunk)
        term.read_for(0.005)           # keep draining, as a terminal does
    term.read_for(0.5)
    term.type(b"\x03\x03\r")
    term.read_for(1.0)
    return sent


def interrupt_a_long_reply(engine, term, lines: bytes, first: bytes) -> None:
    """After a fuzz, start a reply long enough to be interrupted (whether the fuzz's own
    Ctrl-Cs met a running reply is up to timing) and stop it with Ctrl-C."""
    step = engine.step
    slow_down(engine, 0.02)
    try:
        term.type(lines)
        term.read_until(first, timeout=10)    # the reply has begun
        term.type(b"\x03")
        term.read_for(1.0)
    finally:
        engine.step = step


def check_fuzz_counters(console, sent: int, mode: str) -> None:
    assert all(t.is_alive() for t in console._threads)
    c = console.counters
    assert c["bytes_in"] >= sent and c["lines"] > 50 and c["too_long"] > 0, c
    assert c["replaced"] > 0 and c["ignored"] > 0 and c["interrupts"] > 0, c
    print(f"\nfuzz ({mode}): {sent} bytes in 3 s; console counters: {dict(c)}")


def test_fuzz_random_bytes_then_a_normal_prompt(engine, console, term):
    sent = fuzz(term, 3.0, seed=1234)
    interrupt_a_long_reply(engine, term, b"/reset\r/max 200\rtell me everything\r", b"w")
    ask(term, "/max 5")
    ask(term, "/reset")            # the fuzz's lines filled the conversation
    assert len(ask(term, "a normal prompt").split()) == 5
    check_fuzz_counters(console, sent, "human")


# --- machine mode -----------------------------------------------------------------------
def jsonl(term, timeout: float = 10.0) -> dict:
    return json.loads(term.read_until(b"\n", timeout))


@pytest.fixture
def machine(engine, scheduler, term, consoles):
    c = make_console(engine, scheduler, term.path, mode="jsonl").start()
    consoles.append(c)
    ready = jsonl(term)
    assert ready == {"ready": True, "model": engine.name, "max_ctx": 256}
    return c


def request(term, req) -> list[dict]:
    term.type((json.dumps(req) if not isinstance(req, str) else req) + "\n")
    events = [jsonl(term)]
    while not ({"done", "error"} & events[-1].keys()):
        events.append(jsonl(term))
    return events


def test_machine_mode_round_trip(machine, term):
    events = request(term, {"id": 7, "prompt": "hi", "max_tokens": 5, "temperature": 0})
    *deltas, done = events
    assert all(e["id"] == 7 and set(e) == {"id", "delta"} for e in deltas)
    assert len("".join(e["delta"] for e in deltas).split()) == 5
    assert done["done"] is True and done["finish_reason"] == "length" and done["id"] == 7
    assert done["usage"]["completion_tokens"] == 5 and done["usage"]["prompt_tokens"] > 0

    msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    *deltas, done = request(term, {"messages": msgs, "max_tokens": 3, "stop": ["nothing"]})
    assert "id" not in done and done["usage"]["completion_tokens"] == 3


def test_machine_mode_errors(machine, term):
    cases = [("{not json", "bad_json"), ('["a list"]', "bad_request"),
             ({"prompt": "x", "temprature": 1}, "bad_request"), ({"prompt": "x", "temperature": -1}, "bad_request"),
             ({"prompt": "x", "messages": []}, "bad_request"), ({"messages": [{"role": "user"}]}, "bad_request"),
             ({"prompt": "x", "max_tokens": 0}, "bad_request"), ({"prompt": "w1 " * 300}, "context_full")]
    for req, code in cases:
        (event,) = request(term, req)
        assert event["error"]["code"] == code, (req, event)
    (event,) = request(term, {"id": "abc", "prompt": 5})
    assert event["id"] == "abc" and event["error"]["code"] == "bad_request"
    term.type(b'{"prompt": "\xff"}\n')
    assert jsonl(term)["error"]["code"] == "bad_bytes"
    term.type(b"x" * 5000 + b"\n")
    assert jsonl(term)["error"]["code"] == "line_too_long"
    assert request(term, {"prompt": "fine", "max_tokens": 2})[-1]["done"]


def test_machine_mode_fuzz_then_a_normal_request(engine, machine, term):
    sent = fuzz(term, 3.0, seed=99)
    interrupt_a_long_reply(engine, term, json.dumps({"prompt": "long", "max_tokens": 200}).encode() + b"\n",
                           b'"delta"')
    *deltas, done = request(term, {"id": "after", "prompt": "hi", "max_tokens": 5})
    assert done["id"] == "after" and done["usage"]["completion_tokens"] == 5
    check_fuzz_counters(machine, sent, "jsonl")


def test_machine_mode_queues_a_burst_and_ctrl_c_cancels(engine, machine, term):
    slow_down(engine, 0.02)
    burst = "".join(json.dumps({"id": i, "prompt": "go", "max_tokens": 4}) + "\n" for i in range(3))
    term.type(burst)
    ids = []
    for _ in range(3):
        events = [jsonl(term)]
        while "done" not in events[-1]:
            events.append(jsonl(term))
        assert len({e["id"] for e in events}) == 1        # no reply interleaved with another
        ids.append(events[0]["id"])
    assert ids == [0, 1, 2]

    term.type(json.dumps({"id": 9, "prompt": "long", "max_tokens": 200}) + "\n")
    assert "delta" in jsonl(term)
    term.type(b"\x03")
    event = jsonl(term, timeout=2)
    while "done" not in event:
        event = jsonl(term, timeout=2)
    assert event["finish_reason"] == "cancelled" and event["usage"]["completion_tokens"] < 100


def test_machine_mode_type_ahead_overflow_drops_whole_lines(engine, scheduler, term, consoles):
    """An overflow drops whole lines: none is cut in two (its head would join the next
    request, refused as bad JSON with its id lost)."""
    slow_down(engine, 0.03)
    consoles.append(make_console(engine, scheduler, term.path, mode="jsonl", typeahead_limit=120).start())
    assert jsonl(term)["ready"]
    term.type(json.dumps({"id": "busy", "prompt": "go", "max_tokens": 20}) + "\n")
    assert jsonl(term)["id"] == "busy"
    kept = json.dumps({"id": "kept", "prompt": "a", "max_tokens": 1}) + "\n"
    cut = json.dumps({"id": "cut", "prompt": "b" * 150, "max_tokens": 1})
    term.type(kept + cut[:100])
    time.sleep(0.1)
    term.type(cut[100:] + "\n")
    time.sleep(0.1)
    term.type(json.dumps({"id": "next", "prompt": "c", "max_tokens": 2}) + "\n")
    seen = {}
    while "next" not in seen:
        event = jsonl(term)
        if "done" in event or "error" in event:
            seen[event.get("id")] = event
    assert seen["kept"]["done"] and seen["next"]["done"] and seen["next"]["usage"]["completion_tokens"] == 2
    assert "cut" not in seen and seen[None]["error"]["code"] == "input_dropped"


def test_machine_mode_engine_failure_keeps_the_request_id(engine, machine, term, monkeypatch):
    def broken(seqs):
        raise FloatingPointError("the model produced no finite logit")
    monkeypatch.setattr(engine, "step", broken)
    (event,) = request(term, {"id": 41, "prompt": "hi", "max_tokens": 2})
    assert event["id"] == 41 and event["error"]["code"] == "internal", event


# --- the port itself --------------------------------------------------------------------
def test_port_vanishes_and_comes_back(engine, scheduler, tmp_path, consoles):
    """USB unplugged and replugged: the master closes (the slave read fails), the device
    node disappears (symlink removed), then a new pty appears under the same name."""
    link = tmp_path / "ttyUSB0"
    first = Terminal()
    link.symlink_to(first.path)
    logs = []
    console = make_console(engine, scheduler, str(link), logs).start()
    consoles.append(console)
    first.read_until(b"> ")
    assert WORDS.match(ask(first, "before"))

    first.close()                                   # unplugged
    link.unlink()
    deadline = time.monotonic() + 5
    while not any("is not there" in m for m in logs):
        assert time.monotonic() < deadline, logs
        time.sleep(0.05)
    assert any("lost" in m for m in logs) and not console.connected.is_set()

    second = Terminal()                             # plugged back in
    try:
        link.symlink_to(second.path)
        assert b"edge-llm serial console" in second.read_until(b"> ", timeout=5)
        assert WORDS.match(ask(second, "after"))
        assert len(console.protocol.conv.turns) == 4        # the conversation survived
        assert console.counters["connects"] == 2 and console.counters["disconnects"] == 1
    finally:
        second.close()


def test_a_port_that_drops_as_soon_as_it_opens_backs_off(engine, scheduler, monkeypatch, consoles):
    """Each open gets a tty whose other end hangs up at once (a gadget port whose host keeps
    dropping): the console must back off and not log two lines per attempt."""
    opened = []

    def flapping(settings):
        master, slave = os.openpty()
        port = serial.Serial(os.ttyname(slave), timeout=0.05)
        os.close(master)
        os.close(slave)
        opened.append(time.monotonic())
        return port
    monkeypatch.setattr(serial_port, "open_port", flapping)
    logs = []
    consoles.append(make_console(engine, scheduler, "/dev/ttyGS0", logs).start())   # retry 0.05 s .. 0.2 s
    time.sleep(1.5)
    assert 4 <= len(opened) <= 12, len(opened)
    gaps = [b - a for a, b in zip(opened, opened[1:])]
    assert gaps[-1] > 0.15, gaps
    assert sum("console on" in m for m in logs) == 2 and sum("keeps dropping" in m for m in logs) == 1, logs


def test_port_absent_at_start_is_waited_for(engine, scheduler, tmp_path, consoles):
    link = tmp_path / "ttyGS0"
    logs = []
    consoles.append(make_console(engine, scheduler, str(link), logs).start())
    time.sleep(0.3)
    assert any(f"{link} is not there" in m for m in logs), logs
    t = Terminal()
    try:
        link.symlink_to(t.path)
        t.read_until(b"> ", timeout=5)
        assert WORDS.match(ask(t, "hello"))
    finally:
        t.close()


def test_port_in_use_is_a_clear_error(engine, scheduler, term, bundle_dir, capsys):
    holder = serial.Serial(term.path, exclusive=True)
    try:
        with pytest.raises(SerialConsoleError, match="in use by another program"):
            make_console(engine, scheduler, term.path).start()
        status = cli.main(["serial", "--port", term.path, "--model", str(bundle_dir), "--ctx", "64"])
        assert status == 1 and "in use by another program" in capsys.readouterr().err
    finally:
        holder.close()


def test_not_a_serial_port_is_a_clear_error(engine, scheduler, tmp_path):
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(SerialConsoleError, match="cannot use .* as a serial port"):
        make_console(engine, scheduler, str(plain)).start()


def test_blocked_port_cancels_the_reply_and_frees_the_engine(engine, scheduler, term, consoles):
    """Output stopped (XOFF / CTS low) for longer than stall_timeout: the reply is cancelled,
    other clients get the engine meanwhile, and the console works again once output resumes."""
    slow_down(engine, 0.02)        # the whole reply would hold the engine for 4 s
    logs = []
    console = make_console(engine, scheduler, term.path, logs, max_tokens=200, out_limit=64,
                           stall_timeout=0.5).start()
    consoles.append(console)
    term.read_until(b"> ")
    termios.tcflow(term.slave, termios.TCOOFF)
    try:
        term.type("flood me\r")
        time.sleep(1.0)
        assert term.read_for(0.1) == b""                             # flow control respected
        other = GenerationParams(max_tokens=5, sampling=SamplingParams(temperature=0.0))
        t0 = time.monotonic()
        *_, last = scheduler.stream([1, 2, 3], other)                # another interface's request
        assert last.usage.completion_tokens == 5 and time.monotonic() - t0 < 1.5
        assert console.counters["stalls"] == 1 and any("reply cancelled" in m for m in logs)
        assert console.last_usage.completion_tokens < 200
    finally:
        termios.tcflow(term.slave, termios.TCOON)
    assert b"the port took nothing for 0.5 s: reply cancelled" in term.read_until(PROMPT, timeout=5)
    ask(term, "/max 3")
    assert len(ask(term, "ok now?").split()) == 3


# --- serve --serial: both interfaces in one process -------------------------------------
def test_start_from_args_with_serve_style_args(engine, scheduler, term, consoles):
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8080)                  # serve's HTTP port
    add_sampling_args(p)                                              # as serve does
    add_serial_args(p)
    assert start_from_args(p.parse_args([]), engine, scheduler) is None
    a = p.parse_args(["--serial", term.path, "--serial-baud", "9600", "--serial-mode", "jsonl",
                      "--serial-flow", "xonxoff", "--temperature", "0"])
    console = start_from_args(a, engine, scheduler, log=lambda m: None)
    consoles.append(console)
    assert console.settings == PortSettings(term.path, 9600, 8, "N", 1, "xonxoff")
    assert console.params.max_tokens == 256 and console.params.sampling.temperature == 0
    assert jsonl(term)["ready"]


def test_serial_and_http_at_the_same_time(engine, scheduler, console, term):
    from fastapi.testclient import TestClient

    from edge.api.openai_api import create_app
    from edge.api.runtime import ServerState
    slow_down(engine, 0.02)
    state = ServerState("tiny")
    state.set_ready(engine, scheduler)
    client = TestClient(create_app(state))
    result = {}

    def http():
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 11}
        result["r"] = client.post("/v1/chat/completions", json=body)

    ask(term, "/max 7")
    thread = threading.Thread(target=http)
    term.type("hello from serial\r")
    thread.start()
    out = term.read_until(PROMPT, timeout=15)
    thread.join(timeout=15)
    reply = out[len(b"hello from serial\r\n"):-len(PROMPT)]
    assert WORDS.match(reply) and len(reply.split()) == 7, out
    r = result["r"]
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert re.fullmatch(r"w\d+( w\d+){10}", content), content


def test_machine_mode_takes_tools_and_response_format(machine, term):
    tools = [{"type": "function", "function": {"name": "set_light", "parameters": {
        "type": "object", "properties": {"on": {"type": "boolean"}}}}}]
    *deltas, done = request(term, {"prompt": "hi", "tools": tools, "max_tokens": 3})
    assert done["done"] and done["usage"]["completion_tokens"] == 3 and "tool_calls" not in done
    for req, words in [({"prompt": "hi", "tools": [{"type": "function"}]}, "tools[0].function"),
                       ({"prompt": "hi", "tools": tools, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                        "tool_choice"),
                       ({"prompt": "hi", "response_format": {"type": "yaml"}}, "response_format.type"),
                       ({"prompt": "hi", "response_format": {"type": "json_object"}},  # tiny word-level tokenizer
                        "cannot be used for constrained decoding")]:
        (event,) = request(term, req)
        assert event["error"]["code"] == "bad_request" and words in event["error"]["message"], event
