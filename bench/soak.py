"""Soak test of `edge-llm serve`: N concurrent clients x M requests each, a mix of valid,
malformed and abandoned requests, on loopback. Prints sent / ok / 429 / 4xx / 5xx / lost and
the server's RSS before and after (issue 12's target: 16 x 200, 0 lost, 0 5xx, RSS < +5 %).

    python -m bench.soak --clients 16 --requests 200 [--model BUNDLE] [--port 18250]

It starts the server itself (same flags as a user would give), warms it up with a few
requests, reads VmRSS from /proc, runs the load and reads VmRSS again. "lost" counts valid
requests that got no HTTP answer at all (connection error or client timeout); abandoned
requests are the client leaving on purpose (mid-stream, or before the answer) and are not
counted as lost.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

KINDS = ["chat", "chat", "chat_stream", "completion", "malformed_json", "wrong_type", "unknown_role",
         "abandon_stream", "abandon_wait", "partial_request", "health"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(base: str, kind: str, rng: random.Random, max_tokens: int) -> str:
    """Run one request of `kind`; return its outcome: a status code, "abandoned" or "lost"."""
    words = " ".join(rng.choice(["library", "book", "open", "when", "map", "loan", "snow", "river"])
                     for _ in range(rng.randint(2, 20)))
    chat = {"messages": [{"role": "user", "content": words}], "max_tokens": max_tokens,
            "temperature": rng.choice([0, 0.7, 1.0])}
    try:
        if kind == "chat":
            return str(httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=300).status_code)
        if kind == "completion":
            body = {"prompt": words, "max_tokens": max_tokens}
            return str(httpx.post(f"{base}/v1/completions", json=body, timeout=300).status_code)
        if kind == "chat_stream":
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat | {"stream": True},
                              timeout=300) as r:
                last = ""
                for line in r.iter_lines():
                    last = line or last
                if r.status_code == 200 and last != "data: [DONE]":
                    return "lost"            # a stream that ended without [DONE]
                return str(r.status_code)
        if kind == "malformed_json":
            return str(httpx.post(f"{base}/v1/chat/completions", content=b'{"messages": [',
                                  headers={"Content-Type": "application/json"}, timeout=60).status_code)
        if kind == "wrong_type":
            return str(httpx.post(f"{base}/v1/chat/completions", json=chat | {"temperature": "hot"},
                                  timeout=60).status_code)
        if kind == "unknown_role":
            body = chat | {"messages": [{"role": "wizard", "content": words}]}
            return str(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code)
        if kind == "health":
            return str(httpx.get(f"{base}/health", timeout=60).status_code)
        if kind == "abandon_stream":
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat | {"stream": True},
                              timeout=300) as r:
                if r.status_code != 200:
                    return str(r.status_code)
                for i, _ in enumerate(r.iter_lines()):
                    if i >= 2:
                        break                # leave mid-stream
            return "abandoned"
        if kind == "abandon_wait":
            try:
                r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=0.3)
                return str(r.status_code)
            except httpx.TimeoutException:
                return "abandoned"
        if kind == "partial_request":            # half the headers, then leave
            host, port = base.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
                time.sleep(rng.uniform(0.05, 0.5))
            return "abandoned"
    except httpx.HTTPError:
        return "lost"
    raise ValueError(kind)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--model", default=None, help="bundle or checkpoint (default: serve's default model)")
    p.add_argument("--port", type=int, default=18250)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra flag for serve (repeatable)")
    a = p.parse_args(argv)

    cmd = [sys.executable, "-m", "edge.cli", "serve", "--port", str(a.port), *a.serve_arg]
    if a.model:
        cmd += ["--model", a.model]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"edge-llm-soak-{a.port}.log", "w")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{a.port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"serve did not become ready; see {log.name}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        rng = random.Random(a.seed)
        for _ in range(8):                                           # warm-up: steady-state RSS
            one(base, "chat_stream", rng, a.max_tokens)
        before = rss_mb(server.pid)

        outcomes: Counter = Counter()
        lock = threading.Lock()

        def client(c: int) -> None:
            crng = random.Random(a.seed * 1000 + c)
            for _ in range(a.requests):
                kind = crng.choice(KINDS)
                out = one(base, kind, crng, a.max_tokens)
                with lock:
                    outcomes[out] += 1
                    outcomes["kind:" + kind] += 1
                if out == "429":
                    time.sleep(crng.uniform(0.05, 0.3))               # a polite client backs off a little
        t0 = time.monotonic()
        with ThreadPoolExecutor(a.clients) as pool:
            list(pool.map(client, range(a.clients)))
        seconds = time.monotonic() - t0
        time.sleep(2)
        after = rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(60)
        log.close()

    codes = {k: v for k, v in outcomes.items() if not k.startswith("kind:")}
    sent = sum(codes.values())
    ok = codes.get("200", 0)
    n429 = codes.get("429", 0)
    n4xx = sum(v for k, v in codes.items() if k.isdigit() and 400 <= int(k) < 500 and k != "429")
    n5xx = sum(v for k, v in codes.items() if k.isdigit() and int(k) >= 500)
    report = {"clients": a.clients, "requests_per_client": a.requests, "seconds": round(seconds, 1),
              "sent": sent, "ok": ok, "429": n429, "4xx": n4xx, "5xx": n5xx, "lost": codes.get("lost", 0),
              "abandoned": codes.get("abandoned", 0), "server_alive": alive,
              "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
              "rss_growth_pct": round(100 * (after - before) / before, 2),
              "codes": dict(sorted(codes.items())),
              "kinds": {k[5:]: v for k, v in sorted(outcomes.items()) if k.startswith("kind:")}}
    print(json.dumps(report, indent=1))
    return 0 if report["lost"] == 0 and n5xx == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
