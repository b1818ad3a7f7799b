"""systemd's service notification protocol (sd_notify(3)) in a few lines of our own.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET`` (a path, or an abstract
socket name starting with "@"); every message is one datagram of ``KEY=value`` lines.
Outside systemd every call is a no-op that returns False, so callers never need to check.

    sd_notify.status("loading model")
    ...                                   # load, produce a warm-up token
    dog = sd_notify.Watchdog(scheduler.healthy).start()   # no-op without WatchdogSec=
    sd_notify.ready()

systemd starts its watchdog timer when READY=1 arrives; before that, TimeoutStartSec=
applies and a long first-use conversion can push it back with ``extend_timeout()``.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "extend_timeout",
           "watchdog_interval", "Watchdog"]


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=up") to systemd. False when not under systemd
    or when the message cannot be delivered; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not state:
        return False
    if address.startswith("@"):                 # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):           # vsock etc.: not ours to speak
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True


def ready(text: str | None = None) -> bool:
    """The service is up: model loaded and a warm-up token produced."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(text)}" if text else ""))


def status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    """One keep-alive ping."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the current start/stop timeout fires."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (``WATCHDOG_USEC``), or None when systemd expects no
    pings from this process (unset, malformed, zero, or ``WATCHDOG_PID`` names another)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Watchdog(threading.Thread):
    """Pings the watchdog every ``interval / 2`` seconds, but only while ``health()`` returns
    True. When the engine wedges (health False, raising, or hanging) the pings stop and
    systemd kills and restarts the service after ``WatchdogSec=``; pings resume if health
    recovers in time.

    ``interval`` defaults to ``watchdog_interval()``; without one, ``start()`` does nothing.
    """

    def __init__(self, health: Callable[[], bool], interval: float | None = None,
                 ping: Callable[[], bool] = watchdog) -> None:
        super().__init__(name="sd-watchdog", daemon=True)
        self.interval = watchdog_interval() if interval is None else interval
        self.health = health
        self.ping = ping
        self._stop_event = threading.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.interval and self.interval > 0)

    def start(self) -> "Watchdog":
        if self.enabled:
            super().start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        period = self.interval / 2
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            if self._healthy():
                self.ping()
            # A steady rate, without a burst of catch-up pings after a slow health check.
            next_at = max(next_at + period, time.monotonic())
            if self._stop_event.wait(max(0.0, next_at - time.monotonic())):
                break

    def _healthy(self) -> bool:
        try:
            return bool(self.health())
        except Exception:
            return False

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
