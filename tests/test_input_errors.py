"""Bad input on either HTTP port is a 4xx in that API's own shape, never a 5xx, and an error
answer leaves the keep-alive connection usable."""
from __future__ import annotations

import json
import random
import socket

import httpx
import pytest

from edge.api import ollama_api, openai_api
from edge.api.ollama_api import create_ollama_app
from tests.http_server import endless_engine, ready_state, running


@pytest.fixture(scope="module")
def ports(tiny_bundle):
    engine = endless_engine(tiny_bundle, 128)
    state = ready_state(engine)
    with running(state) as openai_base, running(state, make_app=create_ollama_app) as ollama_base:
        yield openai_base, ollama_base, engine.name


# --- lone surrogates ----------------------------------------------------------------------

@pytest.mark.parametrize("path, body, where", [
    ("/api/chat", '{"model": "M", "messages": [{"role": "user", "content": "w1 \\ud800"}]}', "messages.0.content"),
    ("/api/chat", '{"model": "M", "messages": [{"role": "user", "content": "w1"}], "options": {"stop": ["\\udfff"]}}',
     "options.stop.0"),
    ("/api/chat", '{"model": "M", "messages": [{"role": "tool", "content": "x", "tool_name": "\\ud83d"}]}',
     "messages.0.tool_name"),
    ("/api/chat", '{"model": "M", "messages": [{"role": "user", "content": "w1"}], "tools": [{"type": "function", '
                  '"function": {"name": "f", "description": "\\ud800", "parameters": {"type": "object"}}}]}',
     "tools.0.function.description"),
    ("/api/generate", '{"model": "M", "prompt": "w1\\ud800w2"}', "prompt"),
    ("/api/generate", '{"model": "M", "prompt": "w1", "system": "\\udc00"}', "system"),
    ("/api/generate", '{"model": "M", "prompt": "w1", "format": {"type": "object", "properties": {"\\ud800": {}}}}',
     "format.properties"),
    ("/api/show", '{"model": "\\ud800"}', "model"),
])
def test_a_lone_surrogate_in_any_ollama_field_is_a_400_naming_it(ports, path, body, where):
    _, ollama_base, name = ports
    r = httpx.post(ollama_base + path, content=body.replace('"M"', json.dumps(name)).encode(),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert r.json()["error"].startswith(f"{where}: contains a lone UTF-16 surrogate"), r.json()


# --- no 5xx from input ----------------------------------------------------------------------

def valid_bodies(name: str) -> dict[str, dict]:
    msgs = [{"role": "user", "content": "w1 w2"}]
    return {
        "openai /v1/chat/completions": {"messages": msgs, "max_tokens": 2},
        "openai /v1/completions": {"prompt": "w1 w2", "max_tokens": 2},
        "ollama /api/chat": {"model": name, "messages": msgs, "stream": False, "options": {"num_predict": 2}},
        "ollama /api/generate": {"model": name, "prompt": "w1", "stream": False, "options": {"num_predict": 2}},
        "ollama /api/show": {"model": name},
    }


ODD_VALUES = [None, True, -1, 0, 1e308, -1e308, 2**70, "", "\x00", "w1" * 2000, [], [[]], {}, {"a": {}},
              [None], "\\ud800", {"type": "object", "properties": {"x": {"$ref": "#"}}}]


def mutations(body: dict, rng: random.Random, n: int):
    """`n` variants of `body`: a field replaced by an odd value, dropped, or an odd field added;
    nested dicts and lists are mutated too."""
    def paths(value, prefix=()):
        yield prefix
        if isinstance(value, dict):
            for k, v in value.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from paths(v, prefix + (i,))
    every = [p for p in paths(body) if p]
    for _ in range(n):
        out = json.loads(json.dumps(body))
        path = rng.choice(every)
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.7:
            parent[path[-1]] = rng.choice(ODD_VALUES)
        elif action < 0.85 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["n", "stop", "format", "tools", "options", "stream", "raw", "messages"])] = \
                rng.choice(ODD_VALUES)
        yield out


RAW_BODIES = [b"", b"{", b"[]", b"null", b"0", b'"x"', b"\xff\xfe\x00", b"{" * 5000, b'{"a": ' * 3000 + b"1",
              b'{"messages": [{"role": "user", "content": "w1"}], "max_tokens": 2, "stop": [""]}',
              b'{"model": "M", "prompt": "w1", "stream": false, "options": {"stop": [""], "num_predict": 2}}']


def test_a_few_hundred_malformed_bodies_on_both_ports_get_no_5xx(ports):
    openai_base, ollama_base, name = ports
    rng = random.Random(23)
    fives, seen = [], set()
    with httpx.Client(timeout=60) as client:
        for route, body in valid_bodies(name).items():
            api, path = route.split()
            base = openai_base if api == "openai" else ollama_base
            for variant in [*mutations(body, rng, 40)]:
                if isinstance(variant, dict) and variant.get("stream") is not False and api == "ollama":
                    variant["stream"] = False
                r = client.post(base + path, content=json.dumps(variant).replace('"\\\\ud800"', '"\\ud800"'),
                                headers={"Content-Type": "application/json"})
                seen.add(r.status_code)
                if r.status_code >= 500:
                    fives.append((route, variant, r.status_code, r.text[:200]))
            for raw in RAW_BODIES:
                r = client.post(base + path, content=raw.replace(b'"M"', json.dumps(name).encode()),
                                headers={"Content-Type": "application/json"})
                seen.add(r.status_code)
                if r.status_code >= 500:
                    fives.append((route, raw[:60], r.status_code, r.text[:200]))
    assert not fives, fives[:5]
    assert 400 in seen and 200 in seen            # the fuzz reached both the refusals and real answers


# --- an error keeps the connection --------------------------------------------------------

def exchange(base: str, requests: list[bytes]) -> list[tuple[int, bytes] | None]:
    """Send each request on one connection in turn: (status, body) per answer, None once closed."""
    host, port = base.removeprefix("http://").split(":")
    out = []
    with socket.create_connection((host, int(port)), timeout=30) as s:
        f = s.makefile("rb")
        for req in requests:
            s.sendall(req)
            status = f.readline()
            if not status:
                out.append(None)
                continue
            headers = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            out.append((int(status.split()[1]), f.read(int(headers.get("content-length", 0)))))
    return out


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def test_an_internal_error_is_a_500_in_the_apis_shape_and_the_connection_stays_usable(ports, monkeypatch):
    openai_base, ollama_base, _ = ports

    def broken(*_a, **_k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(ollama_api, "model_entry", broken)
    monkeypatch.setattr(openai_api, "model_card", broken)
    for base, bad, good, shape in ((ollama_base, "/api/tags", "/api/version", lambda b: set(b) == {"error"}),
                                   (openai_base, "/v1/models", "/health",
                                    lambda b: b["error"]["type"] == "server_error")):
        first, second = exchange(base, [get(bad), get(good)])
        assert first[0] == 500 and shape(json.loads(first[1])), first
        assert second is not None and second[0] == 200, f"{base}: the connection was closed after the 500"


def test_an_input_error_keeps_the_connection_usable(ports):
    _, ollama_base, name = ports
    body = json.dumps({"model": name, "prompt": "w1", "options": {"num_predict": "many"}}).encode()
    post = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    first, second = exchange(ollama_base, [post, get("/api/version")])
    assert first[0] == 400 and second[0] == 200
