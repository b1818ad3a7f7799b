"""Low system limits: a small file-descriptor limit still gives a working server (or a clear
start-up error), and a conversion that runs out of disk or is killed says where and leaves
nothing behind for good."""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edge.api.connections import MIN_CONNECTIONS, fit_connections
from tests.http_server import free_port, wait_ready

REPO = Path(__file__).resolve().parents[1]


def serve_env(tiny_bundle, tmp_path) -> dict:
    env = {**os.environ, "EDGE_LLM_MODEL": str(tiny_bundle), "EDGE_LLM_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO)}
    env.pop("EDGE_LLM_API_KEY", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def limit_fds(n: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


# --- file descriptors -------------------------------------------------------------------

def test_a_low_descriptor_limit_shrinks_the_accept_bursts_before_the_connection_bound():
    assert fit_connections(256, 100_000, 20) == (256, 64)
    connections, backlog = fit_connections(256, 256, 20)
    assert connections >= 64 and backlog < 64
    assert connections + 2 * backlog + 20 <= 256
    with pytest.raises(ValueError, match=r"file-descriptor limit \(120\).*raise it to at least \d+"):
        fit_connections(256, 120, 20)


def test_serve_under_ulimit_256_answers_health_beside_a_running_stream(tiny_bundle, tmp_path):
    """Under `ulimit -n 256` the connection bound leaves room for more than one connection:
    one stream does not make /health and every other request 503. The stream's connection is
    held open by a client that reads nothing past the status line, whether or not the tiny
    model has finished its reply (its context is 512 tokens: that can take well under a second),
    so it counts against the bound throughout."""
    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--port", str(port), "--ctx", "4096",
                             "--ollama-port", "off"], cwd=REPO, env=serve_env(tiny_bundle, tmp_path),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=limit_fds(256))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        body = json.dumps({"prompt": "w1 w2 w3", "max_tokens": 4000, "stream": True, "temperature": 0,
                           "logprobs": 5}).encode()
        stream = socket.create_connection(("127.0.0.1", port))
        stream.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert stream.recv(64).startswith(b"HTTP/1.1 200")             # running; not read any further
        others = [httpx.Client(base_url=url, timeout=10) for _ in range(MIN_CONNECTIONS - 2)]
        for client in others:
            r = client.get("/health")
            assert r.status_code == 200, r.text
        assert others[0].get("/v1/models").status_code == 200
        stream.close()
        for client in others:
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = log.read_text()
    fitted = re.search(r"does not fit the file-descriptor limit 256 \(LimitNOFILE\); using (\d+)", out)
    assert fitted and int(fitted[1]) >= MIN_CONNECTIONS, out[-3000:]
    assert "Too many open files" not in out and "out of system resource" not in out, out[-3000:]


def test_serve_under_a_limit_too_low_to_work_refuses_to_start_saying_so(tiny_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "--port", str(free_port()),
                        "--ollama-port", "off"], cwd=REPO, env=serve_env(tiny_bundle, tmp_path),
                       capture_output=True, text=True, timeout=60, preexec_fn=limit_fds(100))
    assert r.returncode == 1
    assert re.search(r"edge-llm: error: the file-descriptor limit \(100\) leaves room for \d+ HTTP connection\(s\), "
                     r"fewer than the 8 needed: raise it to at least \d+ \(ulimit -n", r.stderr), r.stderr


# --- disk ------------------------------------------------------------------------------

def test_a_full_disk_during_convert_names_the_bundle_and_leaves_nothing(tiny_src, tmp_path, monkeypatch):
    from convert import bundle_writer
    from convert.convert import convert
    real_add = bundle_writer.TensorFile.add
    written = []

    def add(self, key, arr):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # what write() raises: no file name
        written.append(key)
        return real_add(self, key, arr)
    monkeypatch.setattr(bundle_writer.TensorFile, "add", add)
    dest = tmp_path / "out" / "tiny"
    with pytest.raises(OSError) as caught:
        convert(tiny_src, dest, quant="f32", quiet=True)
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert "No space left on device" in message and str(dest) in message, message
    assert list(dest.parent.iterdir()) == []


def test_the_cli_reports_a_full_disk_with_the_path(tiny_src, tmp_path, monkeypatch, capsys):
    from convert import bundle_writer
    from edge.cli.main import main

    def full(self, name, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(bundle_writer.BundleWriter, "write_bytes", full)
    dest = tmp_path / "b"
    assert main(["convert", str(tiny_src), "-o", str(dest), "--quant", "f32"]) == 1
    err = capsys.readouterr().err
    assert f"edge-llm: error: [Errno 28] No space left on device: writing the bundle {dest}" in err, err


def test_a_convert_killed_midway_leaves_a_partial_that_the_next_convert_removes(tiny_src, tmp_path):
    dest = tmp_path / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "convert", str(tiny_src), "-o", str(dest),
                             "--quant", "f32"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (partials := list(tmp_path.glob(".tiny.*.partial"))):
        assert proc.poll() is None and time.monotonic() < deadline, "convert ended before it was killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert partials[0].exists() and not dest.exists()
    live = tmp_path / f".tiny.{os.getpid()}@{socket.gethostname()}.abcdefgh.partial"   # a conversion running now
    foreign = tmp_path / ".tiny.somebody-else.partial"                                 # not ours to judge
    for p in (live, foreign):
        p.mkdir()
    r = subprocess.run([sys.executable, "-m", "edge.cli", "convert", str(tiny_src), "-o", str(dest),
                        "--quant", "f32"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"removed {partials[0]}: left by an interrupted conversion" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([foreign.name, live.name, "tiny"])
