"""What bench/faults.py drives: an `edge-llm serve` process (or one already running), raw
HTTP and Wyoming clients, and the probe table."""
from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    probe: str
    expected: str
    seen: str
    ok: bool | None          # None: not run (with the reason in `seen`)


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def add(self, probe: str, expected: str, seen: str, ok: bool | None) -> None:
        self.rows.append(Row(probe, expected, seen, ok))
        mark = {True: "ok", False: "FAIL", None: "skip"}[ok]
        print(f"[{mark:4}] {probe}: {seen}", file=sys.stderr, flush=True)

    def markdown(self) -> str:
        out = ["| probe | expected | seen | |", "| --- | --- | --- | --- |"]
        for r in self.rows:
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")     # noqa: E731
            out.append(f"| {cell(r.probe)} | {cell(r.expected)} | {cell(r.seen)} | "
                       f"{ {True: 'ok', False: '**FAIL**', None: 'not run'}[r.ok] } |")
        passed = sum(r.ok is True for r in self.rows)
        failed = sum(r.ok is False for r in self.rows)
        out.append(f"\n{passed} ok, {failed} failed, {len(self.rows) - passed - failed} not run")
        return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edge-llm serve` started here (ports picked free, logs in `workdir`), or a running one
    (`start=False`: only its addresses are known and it cannot be restarted)."""

    def __init__(self, workdir: Path, model: str | None, home: Path, extra: list[str] = (), start: bool = True,
                 openai: str | None = None, ollama: str | None = None, wyoming: tuple[str, int] | None = None,
                 serial: bool = False, fd_limit: int | None = None):
        self.workdir, self.model, self.home, self.extra = workdir, model, home, list(extra)
        self.managed, self.proc, self.log_path, self.pty_master = start, None, None, None
        self.fd_limit, self.serial = fd_limit, serial
        self.openai, self.ollama, self.wyoming = openai, ollama, wyoming
        self.runs = 0

    def start(self, timeout: float = 180) -> bool:
        assert self.managed
        port, oport, wport = free_port(), free_port(), free_port()
        self.openai, self.ollama = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{oport}"
        self.wyoming = ("127.0.0.1", wport)
        cmd = [sys.executable, "-m", "edge.cli", "serve", "--port", str(port), "--ollama-port", str(oport),
               "--wyoming", f"127.0.0.1:{wport}", *self.extra]
        if self.model:
            cmd += ["--model", self.model]
        if self.serial:
            self.pty_master, slave = pty.openpty()
            cmd += ["--serial", os.ttyname(slave), "--serial-mode", "jsonl"]
        env = {**os.environ, "EDGE_LLM_HOME": str(self.home), "PYTHONPATH": str(REPO)}
        for k in ("EDGE_LLM_API_KEY", "NOTIFY_SOCKET", "STATE_DIRECTORY"):
            env.pop(k, None)
        self.runs += 1
        self.log_path = self.workdir / f"serve-{self.runs}.log"
        limit = self.fd_limit
        pre = (lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (limit, limit))) \
            if limit else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log_path.open("w"),
                                     stderr=subprocess.STDOUT, preexec_fn=pre, pass_fds=())
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.openai}/health", timeout=3).json().get("status") == "ok":
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        return False

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int | None:
        if not self.managed or self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pty_master is not None:
            os.close(self.pty_master)
            self.pty_master = None
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def responsive(self, timeout: float = 20) -> bool:
        """A one-token request answers within `timeout`."""
        try:
            r = httpx.post(f"{self.openai}/v1/completions", json={"prompt": "w1", "max_tokens": 1}, timeout=timeout)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


# --- raw clients --------------------------------------------------------------------------

def raw_exchange(base: str, requests: list[bytes], timeout: float = 20) -> list[tuple[int, dict, bytes] | None]:
    """Send each request on ONE connection, in turn; (status, headers, body) per answer, None
    where the connection had closed."""
    host, port = base.removeprefix("http://").split(":")
    out = []
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        f = s.makefile("rb")
        for req in requests:
            try:
                s.sendall(req)
                status_line = f.readline()
                if not status_line:
                    out.append(None)
                    continue
                headers = {}
                while (line := f.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = line.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers.get("content-length", 0)))
                out.append((int(status_line.split()[1]), headers, body))
            except OSError:
                out.append(None)
    return out


def http_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Length": str(len(body)), **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode() + body


def wyoming_event(kind: str, data: dict | None = None, raw_data: bytes | None = None) -> bytes:
    blob = raw_data if raw_data is not None else (json.dumps(data).encode() if data is not None else b"")
    header = {"type": kind, "version": "1.5.0"} | ({"data_length": len(blob)} if blob else {})
    return json.dumps(header).encode() + b"\n" + blob


def wyoming_read(sock: socket.socket, deadline: float, f=None) -> list[dict]:
    """Events until the socket closes, an answer ends, or `deadline` (monotonic) passes. Pass
    the same reader `f` (sock.makefile("rb")) for every read on one connection: it buffers."""
    f, events = f or sock.makefile("rb"), []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            line = f.readline()
        except (TimeoutError, OSError):
            break
        if not line:
            break
        try:
            header = json.loads(line)
        except ValueError:
            events.append({"type": "<not json>"})
            continue
        data = header.get("data") or {}
        if header.get("data_length"):
            data = {**data, **json.loads(f.read(header["data_length"]))}
        if header.get("payload_length"):
            f.read(header["payload_length"])
        events.append({"type": header.get("type"), "data": data})
        if header.get("type") in ("handled", "error", "info"):
            break
        if header.get("type") == "not-handled":          # an "error" may follow it: wait briefly
            deadline = min(deadline, time.monotonic() + 1.0)
    return events
