"""Web pages and the HTTP APIs: a page on another site cannot run requests on either port
(OpenAI or Ollama), while clients without a browser, loopback pages, origins the operator
allows and the chat page itself keep working."""
from __future__ import annotations

import httpx
import ollama
import pytest
from openai import OpenAI

from edge.api.ollama_api import create_ollama_app
from edge.api.origins import OriginPolicy, parse_origins
from tests.http_server import endless_engine, ready_state, running, serve_process

EVIL = "http://evil.example"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 2}
OLLAMA_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "w1 w2"}], "stream": False,
               "options": {"num_predict": 2}}


# --- the allow-list ---------------------------------------------------------------------

@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost", True), ("http://localhost:3000", True), ("https://127.0.0.1:8443", True),
    ("http://[::1]:8080", True), ("http://0.0.0.0:11434", True), ("HTTP://LOCALHOST:5", True),
    ("app://obsidian.md", True), ("chrome-extension://abcdef", True), ("vscode-webview://x", True),
    ("http://evil.example", False), ("null", False), ("http://localhost.evil.example", False),
    ("http://127.0.0.1.nip.io", False), ("https://192.168.1.20:8123", False), ("", False),
])
def test_default_policy_is_loopback_and_local_apps(origin, allowed):
    assert OriginPolicy().allows(origin) is allowed


def test_the_pages_own_origin_is_allowed_whatever_its_address():
    policy = OriginPolicy()
    assert policy.allows("http://192.168.1.20:8080", host="192.168.1.20:8080")
    assert policy.allows("https://pi.lan", host="pi.lan")
    assert not policy.allows("http://192.168.1.20:8081", host="192.168.1.20:8080")


def test_allow_origin_follows_ollama_origins_syntax():
    policy = OriginPolicy(["https://ha.example:8123, http://192.168.1.*", "https://*.corp.example"])
    assert policy.allows("https://ha.example:8123")
    assert not policy.allows("https://ha.example")                 # exact: the port is part of it
    assert policy.allows("http://192.168.1.77:8080")
    assert policy.allows("https://chat.corp.example")
    assert not policy.allows("https://corp.example.evil.example")
    assert not policy.allows("http://192.168.2.1")
    assert OriginPolicy(["*"]).allows("http://anything.example")
    assert parse_origins(['"https://a.example/"', " ", "http://b.example,"]) == ["https://a.example", "http://b.example"]
    for bad in ("evil.example", "http://*.*.example"):
        with pytest.raises(ValueError, match="--allow-origin"):
            parse_origins([bad])


# --- both ports ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    return endless_engine(tiny_bundle, 64)


@pytest.fixture(scope="module")
def ports(tiny):
    """(OpenAI base, Ollama base, state): both apps as serve builds them, one origin allowed."""
    state = ready_state(tiny, allowed_origins=["https://ha.example:8123"])
    with running(state) as openai_base, running(state, make_app=create_ollama_app) as ollama_base:
        yield openai_base, ollama_base, state


@pytest.mark.parametrize("port, path, body", [(0, "/v1/chat/completions", CHAT), (1, "/api/chat", OLLAMA_CHAT),
                                             (1, "/api/generate", {"model": "tiny", "prompt": "w1", "stream": False})])
def test_a_cross_site_text_plain_post_is_refused_before_it_runs(ports, port, path, body, monkeypatch):
    """What `fetch(url, {mode: "no-cors", method: "POST", body})` on any web site sends."""
    import json
    base, state = ports[port], ports[2]
    started, admit = [], state.scheduler.admit
    monkeypatch.setattr(state.scheduler, "admit", lambda: started.append(1) or admit())
    r = httpx.post(base + path, content=json.dumps(body), headers={"Content-Type": "text/plain;charset=UTF-8",
                                                                   "Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                                                                   "Sec-Fetch-Mode": "no-cors"})
    assert r.status_code == 403, r.text
    if port == 0:
        assert r.json()["error"]["code"] == "origin_not_allowed" and r.json()["error"]["type"] == "permission_error"
    else:
        assert set(r.json()) == {"error"} and "not allowed" in r.json()["error"]
    assert started == []


@pytest.mark.parametrize("port, path, body", [(0, "/v1/chat/completions", CHAT), (1, "/api/chat", OLLAMA_CHAT)])
def test_a_browser_request_without_origin_needs_a_json_body(ports, port, path, body):
    import json
    r = httpx.post(ports[port] + path, content=json.dumps(body),
                   headers={"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 415, r.text
    assert "application/json" in (r.json()["error"] if port else r.json()["error"]["message"])


def test_a_null_origin_and_a_preflight_from_another_site_are_refused(ports):
    for base in ports[:2]:
        assert httpx.get(base + ("/v1/models" if base == ports[0] else "/api/tags"),
                         headers={"Origin": "null"}).status_code == 403
        assert httpx.options(base + "/api/chat", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
                             ).status_code == 403


def test_clients_without_a_browser_and_allowed_pages_still_work(ports, tiny):
    import json
    openai_base, ollama_base, _ = ports
    # the official clients (no Origin)
    out = OpenAI(base_url=openai_base + "/v1", api_key="x").chat.completions.create(
        model="tiny", messages=CHAT["messages"], max_tokens=2)
    assert out.usage.completion_tokens == 2
    assert ollama.Client(host=ollama_base).chat(model=tiny.name, messages=CHAT["messages"],
                                                options={"num_predict": 2}).eval_count == 2
    # curl -d '{...}' sends application/x-www-form-urlencoded and no Origin: Ollama's documented usage
    r = httpx.post(ollama_base + "/api/generate", content=json.dumps({"model": tiny.name, "prompt": "w1", "stream": False,
                                                                      "options": {"num_predict": 2}}),
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["eval_count"] == 2
    # a loopback page, the page's own origin, and an origin the operator allowed (text/plain too,
    # where the API reads any body as JSON, as Ollama does; the OpenAI API wants JSON from anyone)
    for base in (openai_base, ollama_base):
        host = base.removeprefix("http://")
        path, body = ("/v1/chat/completions", CHAT) if base == openai_base else \
            ("/api/chat", OLLAMA_CHAT | {"model": tiny.name})
        for origin, ctype in (("http://localhost:5173", "application/json"), (f"http://{host}", "application/json"),
                              ("https://ha.example:8123", "application/json" if base == openai_base else "text/plain")):
            r = httpx.post(base + path, content=json.dumps(body), headers={"Origin": origin, "Content-Type": ctype})
            assert r.status_code == 200, (origin, r.text)


def test_refusals_keep_the_connection_usable(ports):
    openai_base = ports[0]
    with httpx.Client(base_url=openai_base) as client:
        assert client.get("/v1/models", headers={"Origin": EVIL}).status_code == 403
        assert client.get("/v1/models").status_code == 200
        assert client.get("/health").status_code == 200


# --- edge-llm serve ----------------------------------------------------------------------

def test_serve_applies_the_policy_on_both_ports_and_refuses_a_malformed_allow_origin(tiny_bundle, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "EDGE_LLM_HOME": str(tmp_path / "home"), "PYTHONPATH": str(repo)}
    env.pop("EDGE_LLM_API_KEY", None)
    bad = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "-m", str(tiny_bundle), "--port", "0",
                          "--ollama-port", "off", "--allow-origin", "ha.example"], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--allow-origin 'ha.example': an origin is SCHEME://HOST[:PORT]" in bad.stderr, \
        bad.stderr
    from tests.http_server import free_port
    oport = free_port()
    with serve_process(["-m", str(tiny_bundle), "--ctx", "64", "--ollama-port", str(oport),
                        "--allow-origin", "http://192.168.1.*"], env, cwd=repo) as base:
        ollama_base = f"http://127.0.0.1:{oport}"
        model = httpx.get(ollama_base + "/api/tags").json()["models"][0]["model"]
        body = {"model": model, "prompt": "w1", "stream": False, "options": {"num_predict": 2}}
        for origin, want in ((EVIL, 403), ("http://192.168.1.9:3000", 200), (None, 200)):
            headers = {"Content-Type": "text/plain"} | ({"Origin": origin} if origin else {})
            r = httpx.post(ollama_base + "/api/generate", content=__import__("json").dumps(body), headers=headers)
            assert r.status_code == want, (origin, r.text)
            r = httpx.post(base + "/v1/completions", json={"prompt": "w1", "max_tokens": 2},
                           headers={"Origin": origin} if origin else {})
            assert r.status_code == want, (origin, r.text)
        assert httpx.get(base + "/", headers={"Origin": base}).status_code == 200      # the chat page
