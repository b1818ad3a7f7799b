"""Helpers and fixtures for the serial console tests: a pseudo-terminal pair typed on like
picocom would, a console over the tiny model, and the fuzzers both modes share."""
from __future__ import annotations

import json
import os
import random
import re
import select
import time

import pytest

from edge.model.bundle import Bundle
from edge.engine.engine import Engine
from edge.engine.sampler import SamplingParams
from edge.launch.scheduling import start_scheduler
from edge.launch.request import RequestDefaults
from edge.serial.console import SerialConsole
from edge.serial.port import PortSettings

PROMPT = b"\r\n> "
WORDS = re.compile(rb"^(w\d+( w\d+)*)?$")     # the tiny model's replies: "w12 w99 ..."



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
