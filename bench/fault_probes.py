"""The probes of bench/faults.py that send requests (phase A; the restarts and system limits
of phases B and C are bench/fault_limits.py's). Each sends its faults, watches what the
server does, and adds one or more rows (probe, expected, seen, ok) to the table."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.fault_server import Server, Table, http_request, raw_exchange, wyoming_event, wyoming_read

GREEDY = {"temperature": 0}
PROMPT = "The capital of France is"
LONG_SYSTEM = " ".join(f"rule {i}: answer briefly and politely." for i in range(50))   # ~450 tokens
LONG_ANSWER = 1900          # tokens: longer than a client waits in the disconnect probe (ctx 2048)


def is_4xx(code) -> bool:
    return isinstance(code, int) and 400 <= code < 500


def complete(server: Server, prompt: str = PROMPT, max_tokens: int = 16, timeout: float = 60, **extra) -> dict:
    r = httpx.post(f"{server.openai}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, **GREEDY,
                                                             **extra}, timeout=timeout)
    r.raise_for_status()
    return r.json()


def chat_long(server: Server) -> tuple[str, int]:
    """The long-system-prompt chat (the prompt cache's case): (text, cached tokens)."""
    r = httpx.post(f"{server.openai}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Hello?"}],
        "max_tokens": 12, **GREEDY})
    r.raise_for_status()
    usage = r.json()["usage"]
    return r.json()["choices"][0]["message"]["content"], (usage.get("prompt_tokens_details") or {}).get(
        "cached_tokens", 0)


def reference(server: Server) -> dict:
    return {"text": complete(server)["choices"][0]["text"]}


def answer(ask):
    """`ask()`, or what went wrong as text ("HTTP 500", "ReadTimeout"); a pair stays a pair."""
    try:
        return ask()
    except httpx.HTTPStatusError as e:
        return f"HTTP {e.response.status_code}", None
    except httpx.HTTPError as e:
        return type(e).__name__, None


def ollama_model(server: Server) -> str:
    return httpx.get(f"{server.ollama}/api/tags", timeout=10).json()["models"][0]["model"]


def revive(server: Server, table: Table) -> None:
    """After a probe: restart a server that no longer answers, and say so."""
    if server.responsive():
        return
    if not server.managed:
        table.add("server still answering", "a 1-token request answers", "no answer: later probes will fail", False)
        return
    server.stop(signal.SIGKILL)
    table.add("server still answering", "a 1-token request answers in 20 s",
              "frozen: restarted for the next probes" if server.start() else "frozen, and did not restart", False)


# --- phase A: requests ---------------------------------------------------------------------

def empty_stop(server: Server, table: Table, parallel: int) -> None:
    model = ollama_model(server)

    def one(_):
        try:
            return httpx.post(f"{server.ollama}/api/generate", timeout=20, json={
                "model": model, "prompt": "hi", "stream": False, "options": {"stop": [""], "num_predict": 8}}).status_code
        except httpx.HTTPError as e:
            return type(e).__name__
    with ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(one, range(parallel)))
    health = httpx.get(f"{server.openai}/health", timeout=10).json()
    after = server.responsive()
    table.add(f"{parallel} Ollama requests with stop [\"\"] (= --parallel)",
              "each a 4xx; then a request answers; /health ok",
              f"codes {codes}; next request {'answers' if after else 'FROZEN'}; /health {health.get('status')} "
              f"busy={health.get('busy')}", all(map(is_4xx, codes)) and after)
    if not after:
        time.sleep(5)
        h = httpx.get(f"{server.openai}/health", timeout=10)
        table.add("/health while the engine is wedged", "not ok (so the watchdog restarts it)",
                  f"{h.status_code} {h.text[:80]}", h.status_code != 200 or h.json().get("status") != "ok")


def serial_empty_stop(server: Server, table: Table, parallel: int) -> None:
    if server.pty_master is None:
        return table.add("serial JSON line with stop [\"\"]", "-", "no serial console here", None)
    fd = server.pty_master
    os.write(fd, b'{"id": 1, "prompt": "hi", "stop": [""], "max_tokens": 4}\n'
                 b'{"id": 2, "prompt": "hi", "max_tokens": 4}\n')
    got, buf, deadline = {}, b"", time.monotonic() + 20
    os.set_blocking(fd, False)
    while time.monotonic() < deadline and not ({1, 2} <= got.keys() and got.get(2) == "done"):
        try:
            buf += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                ev = json.loads(line.strip().decode(errors="replace"))
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("id") in (1, 2):
                got[ev["id"]] = "error" if "error" in ev else "done" if ev.get("done") else got.get(ev["id"], "delta")
    table.add("serial JSON line with stop [\"\"], then a normal one", "id 1 error, id 2 done",
              f"id 1 {got.get(1, 'nothing')}, id 2 {got.get(2, 'nothing')}", got.get(1) == "error" and got.get(2) == "done")


RECURSIVE = {"type": "json_schema", "json_schema": {"name": "tree", "schema": {
    "$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["children", "next"]}}}}}


def stream_text(server: Server, prompt: str, max_tokens: int, started: threading.Event | None = None) -> tuple[str, str]:
    """(text, how it ended: "done" / "error: ..." / "cut")."""
    parts = []
    try:
        with httpx.stream("POST", f"{server.openai}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": max_tokens, "stream": True, **GREEDY}) as r:
            if r.status_code != 200:
                return "", f"error: {r.status_code}"
            for line in r.iter_lines():
                if started is not None:
                    started.set()
                if line == "data: [DONE]":
                    return "".join(parts), "done"
                if line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        return "".join(parts), f"error: {ev['error'].get('message', '')[:60]}"
                    parts.append(ev["choices"][0]["text"])
    except httpx.HTTPError as e:
        return "".join(parts), f"error: {type(e).__name__}"
    return "".join(parts), "cut"


def innocent_streams(server: Server, table: Table, parallel: int) -> None:
    prompts = ["w1 w2 w3", "Once upon a time", "List three colours:"][:max(1, parallel - 1)]
    alone = [stream_text(server, p, 200)[0] for p in prompts]
    flags = [threading.Event() for _ in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream_text, server, p, 200, f) for p, f in zip(prompts, flags)]
        for f in flags:
            f.wait(30)
        try:
            bad = httpx.post(f"{server.openai}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "json please"}], "max_tokens": 64,
                "response_format": RECURSIVE}).status_code
        except httpx.HTTPError as e:
            bad = type(e).__name__
        ends = [f.result() for f in futures]
    same = [text == want for (text, _), want in zip(ends, alone)]
    table.add("innocent streams beside a recursive-$ref response_format",
              "the bad request alone fails (4xx); the others finish, text unchanged",
              f"bad: {bad}; streams: {[e for _, e in ends]}; unchanged: {same}",
              (is_4xx(bad) or bad == 200) and all(e == "done" for _, e in ends) and all(same))


def cross_site(server: Server, table: Table, parallel: int) -> None:
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain;charset=UTF-8",
            "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    model = ollama_model(server)
    seen = {}
    for name, url, body in (
            ("openai", f"{server.openai}/v1/chat/completions",
             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            ("ollama", f"{server.ollama}/api/chat",
             {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False,
              "options": {"num_predict": 2}})):
        seen[name] = httpx.post(url, content=json.dumps(body), headers=evil, timeout=30).status_code
    table.add("cross-site text/plain POST (Origin: http://evil.example), both ports", "403 on both",
              f"OpenAI {seen['openai']}, Ollama {seen['ollama']}", seen == {"openai": 403, "ollama": 403})
    page = httpx.get(server.openai + "/", timeout=10)
    own = httpx.post(f"{server.openai}/v1/chat/completions", timeout=30,
                     headers={"Origin": server.openai, "Content-Type": "application/json"},
                     json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    table.add("the chat page and its own-origin request", "200, 200", f"{page.status_code}, {own.status_code}",
              page.status_code == 200 and "<html" in page.text.lower() and own.status_code == 200)


def wyoming_idle(server: Server, table: Table, parallel: int) -> None:
    if not server.wyoming:
        return table.add("16 idle Wyoming connections", "-", "no Wyoming address", None)
    idle = [socket.create_connection(server.wyoming, timeout=5) for _ in range(16)]
    try:
        with socket.create_connection(server.wyoming, timeout=10) as s:
            s.sendall(wyoming_event("describe"))
            events = wyoming_read(s, time.monotonic() + 10)
    finally:
        for s in idle:
            s.close()
    kinds = [e["type"] for e in events]
    table.add("16 idle Wyoming connections, then a new client's describe", "info",
              f"{kinds or 'nothing'}", "info" in kinds)


def wyoming_transcripts(server: Server, table: Table, parallel: int) -> None:
    if not server.wyoming:
        return table.add("Wyoming transcripts", "-", "no Wyoming address", None)
    before = server.rss_mb()
    big = {"text": "word " * 200_000}                   # 1,000,012 bytes of data: under the 1 MiB block limit

    def send(ev: bytes) -> list[str]:
        with socket.create_connection(server.wyoming, timeout=30) as s:
            s.sendall(ev)
            return [e["type"] for e in wyoming_read(s, time.monotonic() + 30)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, [wyoming_event("transcript", big)] * 4))
    peak = server.rss_mb()
    time.sleep(3)
    after = server.rss_mb()
    grew = None if before is None or after is None else after - before
    table.add("4 parallel 1 MB Wyoming transcripts", "each refused (not-handled/error) before tokenizing; RSS back "
              "within +100 MB", f"{answers}; RSS {before and round(before)} -> {peak and round(peak)} -> "
              f"{after and round(after)} MB 3 s later",
              all(set(a) & {"not-handled", "error"} and "handled" not in a for a in answers)
              and (grew is None or grew < 100))
    for name, ev in (("transcript without text", wyoming_event("transcript", {"language": "en"})),
                     ("transcript with a non-object context", wyoming_event("transcript", {"text": "hi", "context": 7}))):
        with socket.create_connection(server.wyoming, timeout=30) as s:
            f = s.makefile("rb")
            s.sendall(ev)
            kinds = [e["type"] for e in wyoming_read(s, time.monotonic() + 20, f)]
            s.sendall(wyoming_event("describe"))
            then = [e["type"] for e in wyoming_read(s, time.monotonic() + 10, f)]
        table.add(f"Wyoming {name}", "an error event (no dropped connection without one)",
                  f"{kinds or 'nothing'}; a describe after it: {then or 'connection closed'}", "error" in kinds)


SURROGATE_BODIES = {     # each with a short answer length, in case one is answered after all
    "/api/chat content": '{"model": "%s", "stream": false, "options": {"num_predict": 4}, '
                         '"messages": [{"role": "user", "content": "w1 \\ud800"}]}',
    "/api/generate prompt": '{"model": "%s", "stream": false, "options": {"num_predict": 4}, "prompt": "w1 \\udfff"}',
    "/api/generate system": '{"model": "%s", "stream": false, "options": {"num_predict": 4}, "prompt": "w1", '
                            '"system": "\\ud83d"}',
    "/api/chat stop": '{"model": "%s", "stream": false, "messages": [{"role": "user", "content": "w1"}], '
                      '"options": {"num_predict": 4, "stop": ["\\ud800"]}}',
}
MALFORMED = [b"", b"{", b"[]", b"null", b"\"x\"", b"{\"model\": 5}", b"{\"messages\": 7}", b"\xff\xfe",
             b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": -1}",
             b"{\"messages\": [{\"role\": \"user\", \"content\": {\"a\": 1}}]}",
             b"{\"prompt\": \"hi\", \"options\": {\"num_predict\": \"many\"}}",
             b"{\"prompt\": \"hi\", \"options\": {\"temperature\": 1e999}}",
             b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\", \"images\": [\"@@@\"]}]}",
             b"{\"prompt\": \"hi\", \"format\": {\"type\": \"nonsense\"}}",
             b"{\"prompt\": \"\\u0000\"}"]


def _bounded(body: bytes, ollama_model: str | None) -> bytes:
    """A malformed body that is a JSON object gets a short answer length (and the Ollama model),
    so that one the server accepts after all is over at once."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    if not isinstance(obj, dict):
        return body
    if ollama_model is None:
        return json.dumps({"max_tokens": 4} | obj).encode()
    options = obj.get("options") if isinstance(obj.get("options"), dict) else None
    extra = {"options": {"num_predict": 4} | options} if options is not None else \
        {} if "options" in obj else {"options": {"num_predict": 4}}
    return json.dumps({"model": ollama_model, "stream": False} | obj | extra).encode()


def bad_input(server: Server, table: Table, parallel: int) -> None:
    model = ollama_model(server)
    codes = {}
    for name, body in SURROGATE_BODIES.items():
        path = "/" + name.split()[0].strip("/")
        r = httpx.post(server.ollama + path, content=(body % model).encode(), timeout=30,
                       headers={"Content-Type": "application/json"})
        codes[name] = (r.status_code, "error" in r.json() if r.headers.get("content-type", "").startswith(
            "application/json") else False)
    table.add("lone surrogate in Ollama text fields", "400 {\"error\": ...} each",
              ", ".join(f"{k}: {c}" for k, (c, _) in codes.items()), all(c == 400 and e for c, e in codes.values()))
    # malformed bodies on every POST route of both ports: never a 5xx
    fives = []
    for base, paths in ((server.openai, ["/v1/chat/completions", "/v1/completions"]),
                        (server.ollama, ["/api/chat", "/api/generate", "/api/show"])):
        for path in paths:
            for body in MALFORMED:
                body = _bounded(body, model if base == server.ollama else None)
                try:
                    r = httpx.post(base + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
                except httpx.HTTPError as e:
                    fives.append(f"{path} {body[:40]!r}: {type(e).__name__}")
                    continue
                if r.status_code >= 500:
                    fives.append(f"{path} {body[:40]!r}: {r.status_code}")
    table.add(f"{len(MALFORMED)} malformed bodies x 5 routes, both ports", "no 5xx",
              f"{len(fives)} 5xx" + (f": {fives[:3]}" if fives else ""), not fives)
    # an error answer keeps the keep-alive connection usable
    for base, bad, good in (
            (server.ollama, http_request("POST", "/api/chat", (SURROGATE_BODIES["/api/chat content"] % model).encode(),
                                         {"Content-Type": "application/json"}),
             http_request("GET", "/api/tags")),
            (server.openai, http_request("POST", "/v1/completions", b'{"prompt": "w1", "max_tokens": "x"}',
                                         {"Content-Type": "application/json"}), http_request("GET", "/v1/models"))):
        first, second = raw_exchange(base, [bad, good])
        table.add(f"error then a request on one keep-alive connection ({'Ollama' if base == server.ollama else 'OpenAI'})",
                  "4xx, then 200 on the same connection",
                  f"{first and first[0]}, then {second and second[0] or 'connection closed'}",
                  bool(first and is_4xx(first[0]) and second and second[0] == 200))


def nested(depth: int) -> str:
    """A JSON schema nested `depth` JSON levels deep (`depth // 2` objects, each in "properties"),
    as text: json.dumps itself stops near 1,000 levels."""
    n = depth // 2
    return '{"type": "object", "required": ["a"], "properties": {"a": ' * n + '{"type": "string"}' + "}}" * n


def deep_schemas(server: Server, table: Table, parallel: int) -> None:
    deep, model = "@DEEP@", ollama_model(server)
    tool = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    msgs = [{"role": "user", "content": "hi"}]
    cases = {
        "OpenAI response_format": (f"{server.openai}/v1/chat/completions", {"messages": msgs, "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": deep}}}),
        "OpenAI tool parameters": (f"{server.openai}/v1/chat/completions", {"messages": msgs, "max_tokens": 4,
                                                                            "tools": tool, "tool_choice": "required"}),
        "Ollama format": (f"{server.ollama}/api/chat", {"model": model, "messages": msgs, "stream": False,
                                                        "format": deep, "options": {"num_predict": 4}}),
        "Ollama tool parameters": (f"{server.ollama}/api/chat", {"model": model, "messages": msgs, "stream": False,
                                                                 "tools": tool, "options": {"num_predict": 4}}),
    }
    seen = {}
    for name, (url, body) in cases.items():
        try:
            text = json.dumps(body).replace('"@DEEP@"', nested(900))
            seen[name] = httpx.post(url, content=text, headers={"Content-Type": "application/json"},
                                    timeout=60).status_code
        except httpx.HTTPError as e:
            seen[name] = type(e).__name__
    table.add("schemas nested 900 deep", "4xx (or 200), never 5xx",
              ", ".join(f"{k}: {v}" for k, v in seen.items()),
              all(isinstance(v, int) and v < 500 for v in seen.values()))


def wait_idle(server: Server, limit: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if not httpx.get(f"{server.openai}/health", timeout=5).json().get("busy"):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def ollama_disconnect(server: Server, table: Table, parallel: int) -> None:
    model = ollama_model(server)
    wait_idle(server, 30)
    t0 = time.monotonic()
    try:
        done = httpx.post(f"{server.ollama}/api/generate", timeout=1.5, json={
            "model": model, "prompt": "Tell me a very long story.", "stream": False,
            "options": {"num_predict": LONG_ANSWER, "temperature": 0}})
        left, tokens = None, done.json().get("eval_count") if done.status_code == 200 else done.status_code
    except httpx.TimeoutException:
        left = time.monotonic() - t0
    if left is None:
        return table.add("Ollama non-streaming client leaves after 1.5 s", "engine freed within 2 s",
                         f"the answer ({tokens} tokens) was complete within 1.5 s: model too fast to tell", None)
    freed = wait_idle(server, 30)
    table.add("Ollama non-streaming client leaves after 1.5 s", "engine freed within 2 s",
              f"freed after {freed:.1f} s" if freed is not None else "still busy after 30 s",
              freed is not None and freed < 2)


# --- phase A, last: SIGTERM ----------------------------------------------------------------

def long_prompt(server: Server, ref: dict) -> None:
    """Read the long system prompt once, so that the prompt cache holds it (and note the answer)."""
    ref["long"] = chat_long(server)[0]


def ollama_shutdown(server: Server, table: Table, parallel: int) -> None:
    model, results = ollama_model(server), [None] * 12

    def one(i: int) -> None:
        body = {"model": model, "prompt": f"Story number {i}:", "stream": i % 2 == 0,
                "options": {"num_predict": LONG_ANSWER, "temperature": 0}}
        try:
            with httpx.stream("POST", f"{server.ollama}/api/generate", json=body, timeout=120) as r:
                lines = [line for line in r.iter_lines() if line.strip()]
                results[i] = (r.status_code, body["stream"], lines, r.headers.get("content-type", ""))
        except httpx.HTTPError as e:
            results[i] = (type(e).__name__, body["stream"], [], "")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while not httpx.get(f"{server.openai}/health", timeout=5).json().get("busy") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    code = server.stop(signal.SIGTERM)
    for t in threads:
        t.join(60)
    cut_as_stop, queued_ok, queued_bad, complete = 0, 0, [], 0
    for status, streamed, lines, ctype in results:
        last = {}
        try:
            last = json.loads(lines[-1]) if lines else {}
        except ValueError:
            pass
        if status == 200 and last.get("done"):
            if last.get("eval_count", 0) < LONG_ANSWER and last.get("done_reason") == "stop":
                cut_as_stop += 1
            else:
                complete += 1
        elif (status == 503 and ctype.startswith("application/json") and isinstance(last.get("error"), str)) or \
                (status == 200 and streamed and isinstance(last.get("error"), str)):
            queued_ok += 1
        else:
            queued_bad.append(f"{status} {'stream' if streamed else 'whole'} {lines[-1][:50] if lines else 'empty'}")
    table.add("Ollama: SIGTERM with 12 requests (4 running)",
              "running answers end with a truncation reason (not \"stop\"); queued: 503 {\"error\"} / an error line",
              f"exit {code}; ended properly {complete}, cut but \"stop\" {cut_as_stop}, queued refused properly "
              f"{queued_ok}, other {queued_bad[:3]}", cut_as_stop == 0 and not queued_bad)
