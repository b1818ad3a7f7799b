"""The service's systemd notify path, end to end through `serve`'s own start-up code: READY=1
only after the model has produced a token, WATCHDOG=1 at the configured rate while the engine
is healthy, and no more pings once the engine is wedged (a forward pass that never returns)."""
import os
import socket
import threading
import time

import pytest

from convert.convert import convert
from edge.service import serve
from edge.cli.main import build_parser
from edge.engine.engine import GenerationParams
from edge.api.runtime import ServerState
from tests.tiny_llama import write_tiny_llama


class StubServer:
    should_exit = False


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")          # 0.4 s: a ping every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()


def received(sock, seconds):
    """(arrival time, message) for everything that arrives within `seconds`."""
    out, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            message = sock.recv(4096).decode()
            out.append((time.monotonic(), message))
        except socket.timeout:
            break
    return out


def test_ready_after_first_token_then_watchdog_until_wedged(tmp_path, notify_socket, monkeypatch):
    write_tiny_llama(tmp_path / "src")
    bundle = convert(tmp_path / "src", tmp_path / "bundle", quant="f32", quiet=True)
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    args = build_parser().parse_args(["serve", "--model", str(bundle), "--watchdog-stall", "1.0"])

    warmed = []                        # when the warm-up token was done
    real_warm_up = serve.warm_up

    def timed_warm_up(*a):
        seconds = real_warm_up(*a)
        warmed.append(time.monotonic())
        return seconds
    monkeypatch.setattr(serve, "warm_up", timed_warm_up)
    state = ServerState("tiny", serve.server_config(args, None))
    threading.Thread(target=serve.load_and_start, args=(args, state, StubServer()), daemon=True).start()

    msgs = []                          # until ten pings have come (the first start also writes the weight cache)
    deadline = time.monotonic() + 60
    while sum(m == "WATCHDOG=1" for _, m in msgs) < 10 and time.monotonic() < deadline:
        msgs += received(notify_socket, 1.0)
    texts = [m for _, m in msgs]
    assert "READY=1" in "\n".join(texts), texts
    ready_at = next(t for t, m in msgs if "READY=1" in m)
    assert warmed and warmed[0] < ready_at, (warmed, msgs[:8])   # the model answered first
    assert any(m.startswith("STATUS=loading") for m in texts)
    for t in [t for t in threading.enumerate() if t.name == "grammar-warm-up"]:
        t.join(60)
    grammars = state.scheduler.engine.grammars        # built (or found unusable) before any request asked
    assert grammars._tokenizer is not None or grammars._error is not None
    pings = [t for t, m in msgs if m == "WATCHDOG=1"]
    assert len(pings) >= 10                                  # ~0.2 s apart over several seconds
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert 0.1 < sorted(gaps)[len(gaps) // 2] < 0.35

    wedge = threading.Event()
    model = state.scheduler.engine.model
    real_forward = model.forward_batch
    monkeypatch.setattr(model, "forward_batch", lambda *a, **k: wedge.wait() or real_forward(*a, **k))
    state.scheduler.submit([1, 2, 3], GenerationParams(max_tokens=2))
    wedged_at = time.monotonic()
    try:
        late = [m for t, m in received(notify_socket, 3.0) if t > wedged_at + 1.5]   # past the 1 s allowance
        assert "WATCHDOG=1" not in late, late
    finally:
        wedge.set()
    assert any(m == "WATCHDOG=1" for _, m in received(notify_socket, 2.0))   # healthy again
