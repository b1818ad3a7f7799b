"""The probes of bench/faults.py that restart the server or starve it: damaged caches (phase
B) and system limits (phase C). Each adds one or more rows (probe, expected, seen, ok) to the
table; the request probes (phase A) are bench/fault_probes.py's."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.fault_probes import GREEDY, answer, chat_long, complete
from bench.fault_server import REPO, Server, Table, http_request

# --- phase B: damaged caches ---------------------------------------------------------------

def xnnpack_damage(server: Server, table: Table, ref: dict) -> None:
    caches = [p for p in (server.home / "xnnpack-cache").rglob("*") if p.is_file() and p.stat().st_size > 65536]
    if not caches:
        return table.add("damaged XNNPACK weight cache", "-", "no XNNPACK cache file (numpy backend?)", None)
    cache = max(caches, key=lambda p: p.stat().st_size)
    pristine, rng = cache.read_bytes(), random.Random(0)
    try:
        _xnnpack_damage(server, table, ref, cache, pristine, rng)
    finally:
        cache.write_bytes(pristine)                  # the probes after this one need a server that starts


def _xnnpack_damage(server: Server, table: Table, ref: dict, cache: Path, pristine: bytes, rng) -> None:
    for name, damage in (("20,000 flipped bytes", "flip"), ("4 MiB of 0x7f", "fill")):
        data = bytearray(pristine)
        if damage == "flip":
            for i in rng.sample(range(len(data)), min(20000, len(data) // 2)):
                data[i] ^= 0xFF
        else:
            start = len(data) // 4
            data[start:start + (4 << 20)] = b"\x7f" * len(data[start:start + (4 << 20)])
        cache.write_bytes(bytes(data))
        try:
            ready = server.start()
            text = answer(lambda: (complete(server)["choices"][0]["text"], None))[0] if ready else None
        finally:
            server.stop()
        table.add(f"XNNPACK cache: {name}, restart", "starts; same greedy answer as before (cache rebuilt)",
                  f"{'started' if ready else 'did not start'}; answer {'same' if text == ref['text'] else repr(text)}",
                  ready and text == ref["text"])


def _damages(data: bytes) -> dict[str, bytes]:
    head, _, body = data.partition(b"\n")
    header = json.loads(head)
    mid = len(head) + 1 + len(body) // 2
    flipped = bytearray(data)
    for i in range(mid, min(len(data), mid + 64)):
        flipped[i] ^= 0x10
    nans = bytearray(data)
    nans[mid:mid + 256] = b"\x00\x00\xc0\x7f" * 64
    tail = data[:-4096] + os.urandom(4096)
    missing = {k: v for k, v in header.items() if k != "shape"}
    return {"bit flips after the header": bytes(flipped), "NaNs in the data": bytes(nans),
            "overwritten tail": tail,
            'header "dtype": "floaT32"': json.dumps(header | {"dtype": "floaT32"}).encode() + b"\n" + body,
            'header "n": "512"': json.dumps(header | {"n": str(header.get("n"))}).encode() + b"\n" + body,
            "header without a key": json.dumps(missing).encode() + b"\n" + body}


def prompt_cache_damage(server: Server, table: Table, ref: dict) -> None:
    entries = sorted((server.home / "prompt-cache").rglob("*.kv"), key=lambda p: p.stat().st_size)
    if not entries or "long" not in ref:
        return table.add("damaged prompt-cache entries", "-", "no prompt-cache entry was written", None)
    entry = entries[-1]
    pristine = entry.read_bytes()
    for name, damaged in _damages(pristine).items():
        for p in entries:
            if p.exists() and p != entry:
                p.unlink()
        entry.write_bytes(damaged)
        try:
            ready = server.start()
            text, cached = answer(lambda: chat_long(server)) if ready else (None, None)
            still = entry.exists() and entry.read_bytes() == damaged
        finally:
            server.stop()
        table.add(f"prompt cache: {name}, restart", "starts; same answer; entry ignored and removed",
                  f"{'started' if ready else 'did not start'}; answer {'same' if text == ref['long'] else repr(text)}; "
                  f"cached_tokens {cached}; damaged file {'still there' if still else 'removed'}",
                  ready and text == ref["long"] and not still)


# --- phase C: system limits ----------------------------------------------------------------

def low_fd_limit(workdir: Path, model: str, table: Table) -> None:
    server = Server(workdir, model, workdir / "home-ulimit", ["--ctx", "4096"], fd_limit=256)
    ready = server.start()
    seen = "did not start: " + server.log()[-200:] if not ready else ""
    ok = False
    if ready:
        port = int(server.openai.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "w1 w2 w3", "max_tokens": 4000, "stream": True, "logprobs": 5, **GREEDY}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stream:
            stream.sendall(http_request("POST", "/v1/completions", body, {"Content-Type": "application/json"}))
            stream.recv(64)
            codes = []
            for _ in range(4):
                try:
                    codes.append(httpx.get(f"{server.openai}/health", timeout=10).status_code)
                except httpx.HTTPError as e:
                    codes.append(type(e).__name__)
        limit = [line for line in server.log().splitlines() if "file-descriptor limit" in line]
        seen, ok = f"/health beside a stream: {codes}; {limit[0].split(': ', 1)[-1][:90] if limit else ''}", \
            codes == [200] * 4
    server.stop()
    table.add("ulimit -n 256", "serve starts with a working connection bound; /health answers beside a stream",
              seen, ok)


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil_which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def shutil_which(name: str) -> str | None:
    import shutil
    return shutil.which(name)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)      # still busy: detach it


def full_disk_convert(workdir: Path, src: Path, table: Table) -> None:
    disk = workdir / "full-disk"
    if not _tmpfs(disk, "256k"):
        return table.add("convert on a full disk", "-", "needs root to mount a small tmpfs", None)
    try:
        out = disk / "bundle"
        r = subprocess.run([sys.executable, "-m", "edge.cli", "convert", str(src), "-o", str(out), "--quant", "f32"],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        error = (r.stderr.strip().splitlines() or [""])[-1]
        left = [p.name for p in disk.iterdir()]
        table.add("convert -o on a full disk", "exit 1; the message names the path; nothing left behind",
                  f"exit {r.returncode}; {error[:120]!r}; left: {left}",
                  r.returncode == 1 and str(out) in error and not left)
    finally:
        _umount(disk)


def killed_convert(workdir: Path, src: Path, table: Table) -> None:
    out_dir = workdir / "killed"
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    dest = out_dir / "b"
    cmd = [sys.executable, "-m", "edge.cli", "convert", str(src), "-o", str(dest), "--quant", "f32"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out_dir.glob(".b.*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    partial = list(out_dir.glob(".b.*.partial"))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    left = [p.name for p in out_dir.iterdir() if p.name != "b"]
    table.add("SIGKILL mid-convert, then convert again", "the next convert removes the .partial",
              f"partial after kill: {len(partial)}; second convert exit {r.returncode}; left: {left}",
              bool(partial) and r.returncode == 0 and not left)


def full_disk_xnnpack(workdir: Path, model: str, table: Table) -> None:
    """The disk fills while the XNNPACK cache is written: EDGE_LLM_HOME on a tmpfs that passes
    the free-space check, and a ballast file that takes the rest once the cache's temporary
    file appears."""
    from edge.model.litert_runner import CACHE_SPARE_BYTES
    home = workdir / "full-home"
    graph = Path(model) / "model.tflite"
    size = (graph.stat().st_size + CACHE_SPARE_BYTES >> 20) + 8 if graph.exists() else 0
    if not size or not _tmpfs(home, f"{size}m"):
        return table.add("XNNPACK cache write fills the disk", "-",
                         "needs root to mount a tmpfs" if size else "the model has no model.tflite", None)
    stop, filled = threading.Event(), []

    def ballast() -> None:
        while not stop.is_set():
            if any(".tmp-" in p.name for p in home.rglob("*")):
                try:
                    with open(home / "ballast", "wb") as f:
                        while True:
                            f.write(b"\0" * (1 << 20))
                except OSError:
                    filled.append(True)
                return
            time.sleep(0.002)
    watcher = threading.Thread(target=ballast, daemon=True)
    watcher.start()
    try:
        server = Server(workdir, model, home, ["--ollama-port", "off"])
        ready = server.start()
        answered = ready and server.responsive()
        code = server.stop()
        table.add("XNNPACK cache write fills the disk (tmpfs filled once the cache file appears)",
                  "serves (packing in memory), a log line; no abort",
                  f"disk filled: {bool(filled)}; {'answered' if answered else 'did not answer'}; exit {code}; "
                  f"{_last_warning(server.log())}", bool(answered) and bool(filled))
    finally:
        stop.set()
        watcher.join(10)
        _umount(home)


def _last_warning(log: str) -> str:
    lines = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    return lines[-1].split(": ", 1)[-1][:100] if lines else "no warning logged"
