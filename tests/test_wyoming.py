"""The Wyoming handle service through the `wyoming` package's own client, on loopback."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.handle import Handled, HandledChunk
from wyoming.info import Describe, Info

from edge.assist import wyoming_service
from edge.assist.wyoming_service import WyomingService, parse_address
from edge.engine.scheduler import Scheduler
from edge.launch.request import RequestDefaults
from tests.test_http_api import smol, smol_bundle  # noqa: F401 fixtures

GREEDY = RequestDefaults(max_tokens=24).with_overrides(temperature=0)


@pytest.fixture(scope="module")
def service(smol):
    scheduler = Scheduler(smol)
    svc = WyomingService(smol, scheduler, "127.0.0.1", 0, defaults=GREEDY).start()
    svc.submitted, svc.finished = [], []
    scheduler.listeners.append(lambda job, ev: svc.submitted.append(job.prompt_ids) if ev.usage else None)
    scheduler.listeners.append(lambda job, ev: svc.finished.append(ev.finish_reason) if ev.usage else None)
    yield svc
    svc.stop()


def ask(service, text: str, conversation_id: str | None = None) -> list:
    async def go():
        async with AsyncTcpClient("127.0.0.1", service.port) as client:
            await client.write_event(Transcript(text=text, language="en",
                                                context={"conversation_id": conversation_id}).event())
            events = []
            while (ev := await asyncio.wait_for(client.read_event(), 60)) is not None:
                events.append(ev)
                if ev.type in ("handled-stop", "not-handled", "error"):
                    break
            return events
    return asyncio.run(go())


def test_describe_announces_a_streaming_handle_program(service, smol):
    async def go():
        async with AsyncTcpClient("127.0.0.1", service.port) as client:
            await client.write_event(Describe().event())
            return Info.from_event(await asyncio.wait_for(client.read_event(), 10))
    info = asyncio.run(go())
    (program,) = info.handle
    assert program.name == "edge-llm" and program.installed and program.supports_handled_streaming
    assert program.attribution.name and program.version and program.description
    assert [m.name for m in program.models] == [smol.name] and program.models[0].languages == ["en"]


def test_transcript_is_answered_in_chunks_then_whole(service, smol):
    events = ask(service, "What is the capital of France?")
    types = [e.type for e in events]
    assert types[0] == "handled-start" and types[-2:] == ["handled", "handled-stop"]
    chunks = [HandledChunk.from_event(e).text for e in events if e.type == "handled-chunk"]
    assert len(chunks) > 1
    whole = Handled.from_event(events[-2]).text
    assert whole == "".join(chunks).strip() and "Paris" in whole
    want = "".join(e.text for e in smol.generate(
        smol.encode_chat([{"role": "user", "content": "What is the capital of France?"}]), GREEDY.build()))
    assert whole == want.strip()


def test_a_conversation_remembers_its_turns(service, smol):
    first = Handled.from_event(ask(service, "My name is Ada.", "conv-1")[-2]).text
    ask(service, "What is my name?", "conv-1")
    prompt = smol.tokenizer.decode(service.submitted[-1])
    assert "My name is Ada." in prompt and first in prompt and "What is my name?" in prompt
    ask(service, "What is my name?", "conv-2")
    assert "Ada" not in smol.tokenizer.decode(service.submitted[-1])     # another conversation


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            pass
        return out


def test_bad_framing_gets_an_error_and_the_service_lives_on(service, monkeypatch):
    assert b'"type": "error"' in raw_exchange(service.port, b"\x00\xff garbage that is not json\n")
    assert b"header line over" in raw_exchange(service.port, b"{" + b" " * (70 << 10) + b"\n")
    monkeypatch.setattr(wyoming_service, "BLOCK_TIMEOUT", 0.5)
    lie = b'{"type": "transcript", "data_length": 500}\n{"text": "hi"}'
    assert b"did not arrive" in raw_exchange(service.port, lie)
    assert b"data_length must be" in raw_exchange(service.port, b'{"type": "x", "data_length": 99999999999}\n')
    unknown = b'{"type": "audio-chunk", "data": {}}\n{"type": "describe"}\n'
    assert b'"type": "info"' in raw_exchange(service.port, unknown, timeout=2)   # unknown events are ignored
    assert ask(service, "Say hi.")[-1].type == "handled-stop"


def test_a_client_that_leaves_mid_answer_stops_its_generation(service, monkeypatch):
    monkeypatch.setattr(service, "defaults", RequestDefaults(max_tokens=None))    # until the context is full
    with socket.create_connection(("127.0.0.1", service.port)) as s:
        s.sendall(b'{"type": "transcript", "data": {"text": "Write a long story about a cat."}}\n')
        s.recv(100)                     # the answer has started
    deadline = time.monotonic() + 20
    while (service.scheduler.busy or service.connections) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not service.scheduler.busy and service.connections == 0
    assert service.finished[-1] == "cancelled"


def test_parse_address():
    assert parse_address("127.0.0.1:10400") == ("127.0.0.1", 10400)
    assert parse_address("[::1]:10400") == ("::1", 10400)
    assert parse_address("10400") == ("127.0.0.1", 10400)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("pi.local:x")


def test_wyoming_and_an_openai_stream_at_the_same_time(service, smol):
    """One engine and scheduler under both: neither waits for the other to finish."""
    import threading

    from openai import OpenAI

    from edge.api.runtime import ServerState
    from tests.http_server import running
    state = ServerState(smol.name)
    state.set_ready(smol, service.scheduler)
    got = {}
    with running(state) as base:
        def stream():
            got["openai"] = "".join(c.choices[0].delta.content or "" for c in OpenAI(
                base_url=f"{base}/v1", api_key="x").chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Count to twenty."}], max_tokens=40,
                temperature=0, stream=True))
        t = threading.Thread(target=stream)
        t.start()
        events = ask(service, "Say hi.")
        t.join(60)
    assert events[-1].type == "handled-stop" and got["openai"]
