"""issue 12, hardening: one test per reproduction (hostile LAN client, unlucky Pi owner).
Loopback only, each bounded in time."""
from __future__ import annotations

import json

import httpx
import pytest

from edge.engine.engine import Engine
from edge.model.bundle import Bundle
from tests.http_server import ready_state, running

CTX = 128


@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> Engine:
    engine = Engine(Bundle.open(tiny_bundle), max_ctx=CTX)
    engine.eos_ids = frozenset()       # random weights: run to max_tokens
    return engine


@pytest.fixture(scope="module")
def tiny_base(tiny):
    with running(ready_state(tiny)) as base:
        yield base


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- item 3: no 500s --------------------------------------------------------------------

@pytest.mark.parametrize("extreme, same_as", [
    ({"temperature": 1e-50, "top_p": 0.9, "min_p": 0.05}, {"temperature": 0}),
    ({"temperature": 1.0, "repeat_penalty": 1e-300, "min_p": 0.05}, {"temperature": 0, "repeat_penalty": 1e-300}),
])
def test_extreme_sampling_values_answer_200_with_the_greedy_text(tiny_base, extreme, same_as):
    """temperature 1e-50 was 0 in float32 (NaN weights: IndexError under min-p, else always the
    last id); a vanishing repeat_penalty made a logit inf. Both are greedy in effect."""
    body = dict(messages=user("w3 w4 w3"), max_tokens=6)
    r = httpx.post(f"{tiny_base}/v1/chat/completions", json=body | extreme)
    assert r.status_code == 200, r.text
    want = httpx.post(f"{tiny_base}/v1/chat/completions", json=body | same_as).json()
    assert r.json()["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path, body, where", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "w1 \\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/completions", '{"prompt": "w1\\ud800w2"}', "prompt"),
    ("/v1/completions", '{"prompt": "w1", "stop": ["\\ud83d"]}', "stop.0"),
])
def test_lone_surrogate_is_a_400_naming_the_field(tiny_base, path, body, where):
    r = httpx.post(tiny_base + path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "surrogate" in message and message.startswith(where + ":"), message
