"""The Ollama API when the server stops and when a client leaves, held to the OpenAI API's
standard: answers cut by the shutdown say so, waiting requests get 503 in Ollama's shape (a
stream an error line), and a client that leaves frees the engine at once (logged as 499).
Driven by the official `ollama` client where it can express the case."""
from __future__ import annotations

import logging
import threading
import time

import httpx
import ollama
import pytest

from edge.api.ollama_api import create_ollama_app
from tests.http_server import endless_engine, ready_state, running

CTX = 256
LONG = 200          # tokens asked for: far more than run before the shutdown or the client leaves


def slow_state(tiny_bundle, parallel: int = 2, seconds_per_token: float = 0.03, **config):
    engine = endless_engine(tiny_bundle, CTX, parallel=parallel)
    state = ready_state(engine, max_queue=8, **config)
    events = []
    state.scheduler.listeners.append(lambda job, ev: (events.append((job, ev)), time.sleep(seconds_per_token)))
    return state, events


def wait_for(condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
    return value


def jobs_of(events) -> list:
    out = []
    for job, _ in events:
        if not any(job is j for j in out):
            out.append(job)
    return out


def tokens_of(events, job) -> int:
    return sum(1 for j, ev in events if j is job and ev.text)


def test_shutdown_cuts_running_answers_with_a_reason_and_refuses_waiting_ones(tiny_bundle):
    state, events = slow_state(tiny_bundle)
    with running(state, make_app=create_ollama_app) as base:
        client = ollama.Client(host=base, timeout=60)
        model = client.list().models[0].model
        options = {"num_predict": LONG, "temperature": 0}
        results = {}

        def ask(name: str, stream: bool) -> None:
            try:
                if stream:
                    results[name] = list(client.generate(model=model, prompt="w1 w2", stream=True, options=options))
                else:
                    results[name] = client.generate(model=model, prompt="w1 w2", options=options)
            except ollama.ResponseError as e:
                results[name] = e

        threads = {}
        for name, stream in (("running whole", False), ("running stream", True)):
            threads[name] = threading.Thread(target=ask, args=(name, stream))
            threads[name].start()
        wait_for(lambda: state.scheduler.running == 2 and len(jobs_of(events)) == 2 and
                 all(tokens_of(events, job) >= 3 for job in jobs_of(events)))
        for name, stream in (("waiting whole", False), ("waiting stream", True)):
            threads[name] = threading.Thread(target=ask, args=(name, stream))
            threads[name].start()
        wait_for(lambda: state.scheduler.queue_depth == 2)
        state.drain()                                        # what SIGTERM does (DrainingServer.on_drain)
        for t in threads.values():
            t.join(30)

    whole = results["running whole"]
    assert isinstance(whole, ollama.GenerateResponse), whole
    assert whole.done and whole.done_reason == "shutdown" and 0 < whole.eval_count < LONG
    assert whole.response
    parts = results["running stream"]
    assert isinstance(parts, list) and parts[-1].done and parts[-1].done_reason == "shutdown", parts[-1:]
    assert 0 < parts[-1].eval_count < LONG and "".join(p.response for p in parts)
    for name in ("waiting whole", "waiting stream"):
        error = results[name]
        assert isinstance(error, ollama.ResponseError), (name, error)
        assert "shutting down" in error.error
    assert results["waiting whole"].status_code == 503
    # /api/tags, the two cut answers and the waiting stream (its 200 went out before the error line)
    assert state.metrics.requests.get("503") == 1 and state.metrics.requests.get("200") == 4


def test_a_waiting_stream_at_shutdown_gets_an_error_line_not_an_empty_body(tiny_bundle):
    state, events = slow_state(tiny_bundle, parallel=1)
    with running(state, make_app=create_ollama_app) as base:
        body = {"model": state.model_id, "prompt": "w1", "options": {"num_predict": LONG}}
        first = threading.Thread(target=lambda: httpx.post(f"{base}/api/generate", json=body | {"stream": False},
                                                           timeout=60))
        first.start()
        wait_for(lambda: events)
        lines = []

        def stream():
            with httpx.stream("POST", f"{base}/api/generate", json=body, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)
        second = threading.Thread(target=stream)
        second.start()
        wait_for(lambda: state.scheduler.queue_depth == 1)
        state.drain()
        first.join(30)
        second.join(30)
    assert len(lines) == 1 and '"error"' in lines[0] and "shutting down" in lines[0], lines


def test_a_non_streaming_client_that_leaves_frees_the_engine_and_is_logged_as_499(tiny_bundle, caplog):
    caplog.set_level(logging.INFO, logger="edge.http")
    state, events = slow_state(tiny_bundle, parallel=1, seconds_per_token=0.05)
    with running(state, make_app=create_ollama_app) as base:
        body = {"model": state.model_id, "prompt": "w1", "stream": False, "options": {"num_predict": LONG}}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/api/generate", json=body, timeout=1.0)
        last = wait_for(lambda: next((ev for _, ev in reversed(events) if ev.usage is not None), None), 10)
        assert last.finish_reason == "cancelled" and last.usage.completion_tokens < LONG // 2
        wait_for(lambda: state.metrics.requests.get("499") == 1, 10)
        assert not state.scheduler.busy
        # and the next client is served at once
        r = httpx.post(f"{base}/api/generate", json=body | {"options": {"num_predict": 2}}, timeout=30)
        assert r.status_code == 200 and r.json()["done_reason"] == "length"
    assert any("POST /api/generate 499" in rec.getMessage() for rec in caplog.records if rec.name == "edge.http")


def test_the_time_limit_is_a_504_in_ollamas_shape(tiny_bundle):
    state, events = slow_state(tiny_bundle, parallel=1, seconds_per_token=0.05, request_timeout=0.5)
    with running(state, make_app=create_ollama_app) as base:
        r = httpx.post(f"{base}/api/generate", timeout=30, json={
            "model": state.model_id, "prompt": "w1", "stream": False, "options": {"num_predict": LONG}})
    assert r.status_code == 504 and set(r.json()) == {"error"} and "time limit" in r.json()["error"]
