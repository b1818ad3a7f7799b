"""edge.sd_notify against a real AF_UNIX datagram socket standing in for systemd."""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest

from edge.service import sd_notify


@pytest.fixture
def systemd_socket(tmp_path, monkeypatch):
    """A bound datagram socket at NOTIFY_SOCKET; yields a function returning received messages."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield lambda: sock.recv(4096).decode()
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_messages_arrive(systemd_socket):
    assert sd_notify.status("loading model\n(layer 3/16)")
    assert systemd_socket() == "STATUS=loading model (layer 3/16)"
    assert sd_notify.ready()
    assert systemd_socket() == "READY=1"
    assert sd_notify.ready("serving on 127.0.0.1:8080")
    assert systemd_socket() == "READY=1\nSTATUS=serving on 127.0.0.1:8080"
    assert sd_notify.watchdog()
    assert systemd_socket() == "WATCHDOG=1"
    assert sd_notify.extend_timeout(90)
    assert systemd_socket() == "EXTEND_TIMEOUT_USEC=90000000"
    assert sd_notify.stopping()
    assert systemd_socket() == "STOPPING=1"
    assert sd_notify.notify("READY=1\nSTATUS=ok")
    assert systemd_socket() == "READY=1\nSTATUS=ok"


def test_abstract_socket(monkeypatch):
    name = f"edge-llm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_noop(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify("READY=1") is False
    assert sd_notify.ready() is False
    assert sd_notify.status("x") is False
    assert sd_notify.watchdog() is False
    # set but nobody listening, or not a unix socket address: still no exception
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing.sock"))
    assert sd_notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sd_notify.ready() is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sd_notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sd_notify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))   # meant for another process
    assert sd_notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "", "abc", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sd_notify.watchdog_interval() is None


def test_watchdog_pings_at_half_the_interval_and_stops_when_unhealthy(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "200000")           # 0.2 s -> a ping every 0.1 s
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        healthy = threading.Event()
        healthy.set()
        dog = sd_notify.Watchdog(healthy.is_set)
        assert dog.interval == pytest.approx(0.2)
        with dog:
            time.sleep(1.0)
            pings = drain(sock)
            assert set(pings) == {"WATCHDOG=1"}
            assert 6 <= len(pings) <= 13, pings                   # ~10-11 expected in 1 s

            healthy.clear()                                     # the engine wedges
            time.sleep(0.15)                                    # let an in-flight ping land
            drain(sock)
            time.sleep(0.6)
            assert drain(sock) == []                            # no pings: systemd would restart us
            assert dog.is_alive()

            healthy.set()                                       # recovered in time: pings resume
            time.sleep(0.35)
            assert len(drain(sock)) >= 2
        assert not dog.is_alive()
        time.sleep(0.25)
        assert drain(sock) == []                                # stopped for good


def test_watchdog_health_that_raises_counts_as_unhealthy(tmp_path, monkeypatch):
    pings = []

    def health():
        raise RuntimeError("engine lock poisoned")

    dog = sd_notify.Watchdog(health, interval=0.1, ping=lambda: pings.append(1) or True)
    with dog:
        time.sleep(0.3)
    assert pings == []


def test_watchdog_without_interval_does_not_start(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = sd_notify.Watchdog(lambda: True).start()
    assert not dog.enabled
    assert not dog.is_alive()
    dog.stop()                                                  # harmless
