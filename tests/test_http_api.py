"""The OpenAI-compatible HTTP API on a real uvicorn server, driven by the official client.

Most tests run a tiny random model (fast); the main client test and prefix reuse run the
real default model, SmolLM2-135M-Instruct, converted once per session.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from edge.cli import main as cli
from edge.service import serve
from edge.model.bundle import Bundle
from edge.engine.engine import Engine
from edge.api.runtime import ServerState
from edge.engine.scheduler import Scheduler
from edge.launch.scheduling import start_scheduler
from edge.model.forward import PREFILL_CHUNK
from tests.http_server import SMOL_NAME, endless_engine, engine_text, free_port, ready_state, running

REPO = Path(__file__).resolve().parents[1]
TINY_CTX = 128


def client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> Engine:
    return endless_engine(tiny_bundle, TINY_CTX)


def slow_engine(state: ServerState, seconds_per_event: float = 0.0, gate: threading.Event | None = None):
    """Make each generated event take longer (a scheduler listener runs in the engine's thread)."""
    def hold(job, event):
        if gate is not None:
            gate.wait(30)
        time.sleep(seconds_per_event)
    state.scheduler.listeners.append(hold)


def finishes(state: ServerState) -> list:
    """Record the final event of every generation the scheduler runs."""
    seen = []
    state.scheduler.listeners.append(lambda job, ev: seen.append(ev) if ev.usage is not None else None)
    return seen


def wait_for(condition, timeout: float = 10.0, step: float = 0.01) -> float:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(step)
    return time.monotonic() - t0


def assert_openai_error(r: httpx.Response, status: int, message: str, param: str | None = ...):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert re.search(message, body["error"]["message"]), body["error"]["message"]
    if param is not ...:
        assert body["error"]["param"] == param, body


# --- the official client on the real default model --------------------------------------

def test_openai_client_on_default_model_matches_engine(smol, smol_base):
    api = client(smol_base)
    assert [m.id for m in api.models.list().data] == [smol.name]

    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three colours of the rainbow."}]
    sampling = dict(temperature=0.8, top_p=0.95, seed=11)
    want, want_finish, want_usage = engine_text(smol, smol.encode_chat(messages), 24, **sampling)
    assert want.strip()

    reply = api.chat.completions.create(model=smol.name, messages=messages, max_tokens=24, **sampling)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == want_finish
    assert reply.usage.prompt_tokens == want_usage.prompt_tokens
    assert reply.usage.completion_tokens == want_usage.completion_tokens
    assert reply.usage.total_tokens == want_usage.prompt_tokens + want_usage.completion_tokens

    chunks = list(api.chat.completions.create(model=smol.name, messages=messages, max_tokens=24, stream=True,
                                              stream_options={"include_usage": True}, **sampling))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [want_finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want_usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    prompt = "The three primary colours are"
    want, want_finish, _ = engine_text(smol, smol.encode_text(prompt), 12, temperature=0.0)
    done = api.completions.create(model=smol.name, prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == want and done.choices[0].finish_reason == want_finish == "length"
    streamed = api.completions.create(model=smol.name, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


@pytest.mark.slow
def test_second_chat_turn_reuses_prefix_and_matches_uncached(smol, smol_base):
    api = client(smol_base)
    system = ("You are the help desk of a small library in a mountain village. Answer briefly, politely "
              "and only about the library: opening hours are 9 to 17 on weekdays, loans last three weeks, "
              "children's books are on the ground floor.")
    turns = [{"role": "system", "content": system}, {"role": "user", "content": "When are you open?"}]
    first = api.chat.completions.create(model=smol.name, messages=turns, max_tokens=20, temperature=0)
    turns += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "How long can I keep a book?"}]
    second = api.chat.completions.create(model=smol.name, messages=turns, max_tokens=20, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    assert cached == len(smol.encode_chat(turns[:2])) // PREFILL_CHUNK * PREFILL_CHUNK     # whole prefill chunks are reused

    smol.reset()                                   # the same request without any cache
    want, _, usage = engine_text(smol, smol.encode_chat(turns), 20, temperature=0.0)
    assert usage.cached_tokens == 0
    assert second.choices[0].message.content == want
    assert second.usage.completion_tokens == usage.completion_tokens


# --- concurrency, queue, cancellation, time limit (tiny model) ---------------------------

def test_eight_concurrent_streams_each_get_their_own_text(tiny, tiny_base):
    requests = [(f"w{10 + i} w{40 + 3 * i} w{90 + i}", 100 + i) for i in range(8)]
    wanted = [engine_text(tiny, tiny.encode_chat(user(text)), 16 + i, temperature=1.0, seed=seed)[0]
              for i, (text, seed) in enumerate(requests)]
    assert len(set(wanted)) == 8

    def ask(i):
        text, seed = requests[i]
        stream = client(tiny_base).chat.completions.create(
            model="tiny", messages=user(text), max_tokens=16 + i, temperature=1.0, seed=seed, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == wanted


def test_stop_strings_and_llama_cpp_fields_reach_the_engine(tiny, tiny_base):
    ids = tiny.encode_chat(user("w1 w2"))
    extra = dict(top_k=20, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2)
    full, _, _ = engine_text(tiny, ids, 12, temperature=1.0, seed=5, **extra)
    word = full.split()[4]
    want, finish, _ = engine_text(tiny, ids, 12, stop=[word], temperature=1.0, seed=5, **extra)
    assert finish == "stop" and word not in want
    body = dict(messages=user("w1 w2"), max_tokens=12, temperature=1.0, seed=5, stop=word, top_k=20,
                min_p=0.05, repeat_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2)
    r = httpx.post(f"{tiny_base}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == want and choice["finish_reason"] == "stop"


def test_full_queue_answers_429_with_retry_after(tiny):
    state = ready_state(tiny, max_queue=1)
    gate = threading.Event()
    slow_engine(state, gate=gate)
    body = dict(messages=user("w3"), max_tokens=5, stream=True)
    with running(state) as base, ThreadPoolExecutor(2) as pool:
        def stream_all():
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
                return r.status_code, r.read().decode()
        running_job = pool.submit(stream_all)
        wait_for(lambda: state.scheduler.busy)
        waiting_job = pool.submit(stream_all)
        wait_for(lambda: state.scheduler.queue_depth == 1)

        r = httpx.post(f"{base}/v1/chat/completions", json=body)
        assert_openai_error(r, 429, "busy")
        assert int(r.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client(base).chat.completions.create(model="tiny", messages=user("w3"), max_tokens=5)

        gate.set()
        for job in (running_job, waiting_job):
            status, text = job.result(timeout=30)
            assert status == 200 and text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text
        assert "edge_llm_requests_total{status=\"429\"} 2" in httpx.get(f"{base}/metrics").text


def test_client_leaving_a_stream_frees_the_engine(tiny):
    state = ready_state(tiny)
    slow_engine(state, seconds_per_event=0.05)         # 100 tokens would take 5 s
    ends = finishes(state)
    with running(state) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30,
                          json=dict(messages=user("w7"), max_tokens=100, stream=True)) as r:
            lines = r.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data:")) == 3
        left = time.monotonic()
        wait_for(lambda: ends, timeout=2)
        assert ends[0].finish_reason == "cancelled" and ends[0].usage.completion_tokens < 20

        reply = client(base).chat.completions.create(model="tiny", messages=user("w8"), max_tokens=2)
        assert reply.choices[0].finish_reason == "length"
        assert time.monotonic() - left < 1.5


def test_client_leaving_a_plain_request_frees_the_engine(tiny):
    state = ready_state(tiny)
    slow_engine(state, seconds_per_event=0.05)
    ends = finishes(state)
    with running(state) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json=dict(prompt="w9", max_tokens=100), timeout=0.5)
        wait_for(lambda: ends, timeout=2)
        assert ends[0].finish_reason == "cancelled" and ends[0].usage.completion_tokens < 30
        wait_for(lambda: 'edge_llm_requests_total{status="499"} 1' in httpx.get(f"{base}/metrics").text)


def test_request_time_limit(tiny):
    state = ready_state(tiny, request_timeout=0.3)
    slow_engine(state, seconds_per_event=0.05)
    with running(state) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=dict(messages=user("w4"), max_tokens=100))
        assert_openai_error(r, 504, "time limit of 0.3 s")
        with pytest.raises(openai.APIError, match="time limit"):
            list(client(base).chat.completions.create(model=tiny.name, messages=user("w4"), max_tokens=100, stream=True))


# --- auth ---------------------------------------------------------------------------------

def test_api_key_required_when_configured(tiny):
    with running(ready_state(tiny, api_key="s3cret-key")) as base:
        url, body = f"{base}/v1/chat/completions", dict(messages=user("w5"), max_tokens=2)
        assert_openai_error(httpx.post(url, json=body), 401, "Missing API key")
        r = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"})
        assert_openai_error(r, 401, "Incorrect API key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        reply = client(base, "s3cret-key").chat.completions.create(model=tiny.name, messages=user("w5"), max_tokens=2)
        assert reply.usage.completion_tokens == 2


def test_serve_refuses_an_open_non_loopback_bind(monkeypatch, capsys, caplog):
    monkeypatch.delenv("EDGE_LLM_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err

    assert serve.check_exposure("0.0.0.0", "k", no_auth=False) == "k"
    assert serve.check_exposure("127.0.0.1", None, no_auth=False) is None
    assert serve.check_exposure("::1", None, no_auth=False) is None
    with pytest.raises(ValueError, match="without an API key"):
        serve.check_exposure("192.168.1.20", None, no_auth=False)
    with pytest.raises(ValueError, match="contradict"):
        serve.check_exposure("0.0.0.0", "k", no_auth=True)
    with caplog.at_level(logging.WARNING, logger="edge.serve"):
        assert serve.check_exposure("0.0.0.0", None, no_auth=True) is None
    assert "WITHOUT AUTHENTICATION" in caplog.text


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("EDGE_LLM_API_KEY", "from-env")
    args = cli.build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    assert serve.check_exposure(args.host, serve.api_key(args), args.no_auth) == "from-env"


# --- errors: 4xx in OpenAI's shape, and the server carries on ----------------------------

BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON", None),
    ("not an object", "/v1/chat/completions", b'[1, 2]', 400, "must be a JSON object", None),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages", "messages"),
    ("no messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages is required", "messages"),
    ("temperature a string", "/v1/chat/completions", {"messages": user("w1"), "temperature": "hot"}, 400,
     "valid number", "temperature"),
    ("max_tokens a float", "/v1/chat/completions", {"messages": user("w1"), "max_tokens": 2.5}, 400,
     "valid integer", "max_tokens"),
    ("negative max_tokens", "/v1/chat/completions", {"messages": user("w1"), "max_tokens": -5}, 400,
     "greater than or equal to 1", "max_tokens"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "w1"}]}, 400,
     "'system', 'developer', 'user', 'assistant', 'tool' or 'ipython'", "messages.0.role"),
    ("n=9", "/v1/chat/completions", {"messages": user("w1"), "n": 9}, 400, "n must be between 1 and 8", "n"),
    ("top_p out of range", "/v1/chat/completions", {"messages": user("w1"), "top_p": 0}, 400, "greater than 0",
     "top_p"),
    ("tool without a function", "/v1/chat/completions", {"messages": user("w1"), "tools": [{"type": "function"}]},
     400, r"tools\[0\].function must be an object", "tools[0].function"),
    ("empty stop string", "/v1/completions", {"prompt": "w1", "stop": [""]}, 400, "must not be empty", "stop"),
    ("two prompts", "/v1/completions", {"prompt": ["w1", "w2"]}, 400, "one prompt per request", None),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [1, 999]}, 400, "outside the vocabulary",
     "prompt"),
    ("overlong prompt", "/v1/completions", {"prompt": "w5 " * 200}, 400,
     rf"maximum context length is {TINY_CTX} tokens, but the prompt has 201 tokens", "prompt"),
    ("overlong chat", "/v1/chat/completions", {"messages": user("w5 " * 200)}, 400,
     rf"maximum context length is {TINY_CTX} tokens", "messages"),
    ("oversized body", "/v1/completions", {"prompt": "w1 " * 400_000}, 413, "larger than the limit", None),
]


@pytest.mark.parametrize("path, body, status, message, param", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_answered_in_openai_shape(tiny_base, path, body, status, message, param):
    if isinstance(body, bytes):
        r = httpx.post(tiny_base + path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(tiny_base + path, json=body)
    assert_openai_error(r, status, message, param)
    ok = httpx.post(f"{tiny_base}/v1/completions", json={"prompt": "w1", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_unknown_path_and_wrong_method_in_openai_shape(tiny_base):
    assert_openai_error(httpx.get(f"{tiny_base}/v1/nothing"), 404, "no such endpoint")
    r = httpx.get(f"{tiny_base}/v1/chat/completions")
    assert_openai_error(r, 405, "does not accept GET")
    assert "POST" in r.headers["allow"]
    assert_openai_error(httpx.get(f"{tiny_base}/v1/models/other"), 404, "does not exist", "model")


def test_curl_without_json_content_type_gets_a_hint(tiny_base):
    r = httpx.post(f"{tiny_base}/v1/completions", content=b'{"prompt": "w1"}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_openai_error(r, 400, "Content-Type: application/json")


# --- health, loading, metrics, logs, CORS -------------------------------------------------

def test_loading_then_ok(tiny):
    state = ServerState("tiny-model")
    with running(state) as base:
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.json()["model"] == "tiny-model"
        r = httpx.post(f"{base}/v1/chat/completions", json=dict(messages=user("w1")))
        assert_openai_error(r, 503, "still loading")
        assert r.headers["retry-after"]
        state.set_ready(tiny, start_scheduler(tiny))
        r = httpx.get(f"{base}/health")
        assert r.status_code == 200 and r.json() == {"status": "ok", "model": tiny.name, "queue_depth": 0,
                                                     "busy": False, "max_context": TINY_CTX, "loaded": [tiny.name]}


def test_health_names_the_stall_time(tiny, monkeypatch):
    """A busy engine without a token for `stall_seconds` is reported with that time."""
    scheduler = start_scheduler(tiny, stall_seconds=0.25)
    state = ServerState("tiny-model")
    state.set_ready(tiny, scheduler)
    with running(state) as base:
        monkeypatch.setattr(Scheduler, "busy", property(lambda self: True))   # wedged mid-reply
        scheduler.last_progress = time.monotonic() - 1
        r = httpx.get(f"{base}/health")
        monkeypatch.undo()
    assert r.status_code == 503 and r.json()["status"] == "stalled", r.text
    assert "no progress for 0.25 s" in r.json()["error"]["message"], r.text


def test_metrics_in_prometheus_text_format(tiny):
    state = ready_state(tiny)
    with running(state) as base:
        prompt = " ".join(f"w{i}" for i in range(3, 73))          # its whole prefill chunks are reused
        replies = [client(base).completions.create(model=tiny.name, prompt=prompt, max_tokens=n) for n in (3, 5)]
        httpx.post(f"{base}/v1/completions", json={"prompt": 5})
        text = httpx.get(f"{base}/metrics").text
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"\})?', name), line
            samples[name] = float(value)
    assert samples['edge_llm_requests_total{status="200"}'] == 2
    assert samples['edge_llm_requests_total{status="400"}'] == 1
    assert samples["edge_llm_generated_tokens_total"] == 8
    assert samples["edge_llm_prompt_tokens_total"] == sum(r.usage.prompt_tokens for r in replies)
    assert samples["edge_llm_cached_prompt_tokens_total"] == sum(
        r.usage.prompt_tokens_details.cached_tokens for r in replies) > 0
    assert samples["edge_llm_queue_depth"] == 0 and samples["edge_llm_model_loaded"] == 1
    assert samples["edge_llm_last_tokens_per_second"] > 0
    assert samples['edge_llm_time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    assert samples['edge_llm_request_time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    assert 1 <= samples["edge_llm_inter_token_seconds_count"] <= (3 - 1) + (5 - 1)
    assert samples["edge_llm_running"] == 0
    assert samples["edge_llm_time_to_first_token_seconds_count"] == 2
    assert "# TYPE edge_llm_time_to_first_token_seconds histogram" in text


def test_one_log_line_per_request_without_prompt_text(tiny, caplog):
    for log_prompts in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edge.http"), \
                running(ready_state(tiny, log_prompts=log_prompts)) as base:
            r = httpx.post(f"{base}/v1/chat/completions", json=dict(messages=user("w42 w43"), max_tokens=3))
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "edge.http"]
        assert len(lines) == 1, lines
        assert lines[0].startswith(r.headers["x-request-id"]) and r.json()["id"].endswith(r.headers["x-request-id"])
        assert re.search(r"POST /v1/chat/completions 200 .* prompt=\d+ cached=\d+ generated=3 ttft=\S+s tps=", lines[0])
        assert ("w42 w43" in lines[0]) == log_prompts


def test_cors_off_by_default_and_opt_in(tiny):
    preflight = {"Origin": "http://pi.local:3000", "Access-Control-Request-Method": "POST"}
    with running(ready_state(tiny)) as base:
        r = httpx.options(f"{base}/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        assert_openai_error(r, 403, "are not allowed")                 # a foreign page: the origin policy
        r = httpx.options(f"{base}/v1/chat/completions", headers=preflight | {"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in r.headers
        assert_openai_error(r, 405, "does not accept OPTIONS")
    with running(ready_state(tiny, cors_origins=["http://pi.local:3000"])) as base:
        r = httpx.options(f"{base}/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://pi.local:3000"


# --- the real `serve` and `prepare` commands, as systemd runs them -----------------------

def test_serve_command_loads_in_background_and_notifies_systemd(tiny_bundle, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    port, name = free_port(), Bundle.open(tiny_bundle).name
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "EDGE_LLM_MODEL": str(tiny_bundle),
           "EDGE_LLM_HOME": str(tmp_path / "home")}
    env.pop("EDGE_LLM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--port", str(port), "--ctx", "64"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        messages = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(notify.recv(4096).decode())
        assert any(m.startswith("STATUS=loading") for m in messages)
        assert any("warming up" in m for m in messages)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["status"] == "ok" and health["model"] == name
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"prompt": "w5", "max_tokens": 2, "temperature": 0})
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == 2 and usage["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)          # what systemd sends
        out = proc.communicate(timeout=30)[0]
        notify.close()
    assert proc.returncode in (0, -signal.SIGTERM), out    # uvicorn re-raises the signal it caught
    assert "Shutting down" in out
    assert "listening on http://127.0.0.1" in out and f"ready: {name}" in out


def test_prepare_converts_loads_and_warms_up(tiny_src, tmp_path):
    env = {**os.environ, "EDGE_LLM_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "edge.cli", "prepare", "--model", str(tiny_src), "--ctx", "64"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stderr and "first token" in r.stderr
    assert list((tmp_path / "home" / "bundles").iterdir())


def test_serve_exits_1_when_the_model_cannot_load(tmp_path):
    env = {**os.environ, "EDGE_LLM_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "--model", str(tmp_path / "missing"),
                        "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "could not load the model" in r.stderr and "missing" in r.stderr
