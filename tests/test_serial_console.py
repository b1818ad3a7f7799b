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

import re
import time


from edge.serial.line_editor import Discarded, Interrupt, Line, LineEditor, TooLong
from edge.model.forward import PREFILL_CHUNK
from tests.serial_terminal import (PROMPT, WORDS, ask, check_fuzz_counters, fuzz, interrupt_a_long_reply, make_console, slow_down)
from tests.serial_terminal import bundle_dir, console, consoles, engine, scheduler, term  # noqa: F401 (fixtures)


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
    # whole prefill chunks of the first prompt are reused (the same answer as cold)
    assert "2 turn(s)" in stats and int(re.search(r"(\d+) reused", stats).group(1)) == (used - 12) // PREFILL_CHUNK * PREFILL_CHUNK, stats

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


def test_fuzz_random_bytes_then_a_normal_prompt(engine, console, term):
    sent = fuzz(term, 3.0, seed=1234)
    interrupt_a_long_reply(engine, term, b"/reset\r/max 200\rtell me everything\r", b"w")
    ask(term, "/max 5")
    ask(term, "/reset")            # the fuzz's lines filled the conversation
    assert len(ask(term, "a normal prompt").split()) == 5
    check_fuzz_counters(console, sent, "human")
