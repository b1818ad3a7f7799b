"""The serial console's machine mode (JSON lines) and the port itself (unplugged, replugged, in
use, flow control) on real pseudo-terminals: see tests/serial_terminal.py."""
from __future__ import annotations

import argparse
import json
import os
import re
import termios
import threading
import time

import pytest
import serial

from edge.cli import main as cli
from edge.launch.args import add_sampling_args
from edge.serial import port as serial_port
from edge.engine.engine import GenerationParams
from edge.engine.sampler import SamplingParams
from edge.serial.args import add_serial_args, start_from_args
from edge.serial.port import PortSettings, SerialConsoleError
from tests.serial_terminal import (PROMPT, Terminal, WORDS, ask, check_fuzz_counters, fuzz, interrupt_a_long_reply, jsonl,
                                   make_console, request, slow_down)
from tests.serial_terminal import bundle_dir, console, consoles, engine, machine, scheduler, term  # noqa: F401 (fixtures)


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
