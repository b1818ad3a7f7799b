"""The registry of loaded models (edge.launch.loaded_models) on its own, with stand-in
engines: the count and memory budgets, least recently used first and the default model last,
busy models never unloaded, keep_alive, and Ollama's keep_alive values."""
from __future__ import annotations

import math
import threading

import pytest

from edge.launch.loaded_models import (FOREVER, MEMORY_HEADROOM, LoadedModels, ModelsBusy, NotEnoughMemory,
                                       parse_keep_alive)

MB = 1 << 20


class StandIn:
    """What the registry touches of an engine and a scheduler."""

    def __init__(self, name: str):
        self.name, self.closed, self.persisted = name, False, False

    def close(self):
        self.closed = True

    def persist(self):
        self.persisted = True


class World:
    """Models of `size` bytes each in a machine with `total` bytes; records loads/unloads."""

    def __init__(self, max_loaded=2, keep_alive=300.0, total=None, size=100 * MB, wait=5.0):
        self.size, self.total = size, total
        self.events: list[tuple[str, str]] = []
        self.unloaded = {}                  # name -> threading.Event
        self.models = LoadedModels(self.open, max_loaded, keep_alive, estimate=lambda key: self.size,
                                   available=self.available if total else (lambda: None), wait=wait)
        self.models.listeners.append(self.seen)
        self.default = self.models.add("A", StandIn("A"), StandIn("A"), size, default=True)

    def open(self, key):
        return StandIn(key), StandIn(key)

    def available(self):
        return self.total - sum(e.size for e in self.models.loaded())

    def seen(self, what, entry):
        self.events.append((what, entry.name))
        if what == "unloaded":
            self.unloaded.setdefault(entry.name, threading.Event()).set()

    def gone(self, name) -> threading.Event:
        return self.unloaded.setdefault(name, threading.Event())

    def names(self):
        return sorted(e.name for e in self.models.loaded())

    def use(self, key, keep_alive=None):
        entry = self.models.acquire(key)
        self.models.release(entry, keep_alive)
        return entry


def test_keep_alive_values_as_ollama_reads_them():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive("90s") == 90
    assert parse_keep_alive("300ms") == 0.3 and parse_keep_alive("1.5h") == 5400 and parse_keep_alive("300") == 300
    assert parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0 and parse_keep_alive(12.5) == 12.5
    assert parse_keep_alive(-1) == FOREVER and parse_keep_alive("-1m") == FOREVER and parse_keep_alive("-1") == FOREVER
    assert parse_keep_alive(None) is None
    for bad in ("soon", "5 minutes", "m", "5x", "", True, [5], "nan", math.nan):
        with pytest.raises(ValueError, match="keep_alive"):
            parse_keep_alive(bad)


def test_another_model_loads_and_the_least_recently_used_idle_one_goes_at_the_count():
    w = World(max_loaded=3)
    w.use("B")
    w.use("C")
    assert w.names() == ["A", "B", "C"]
    w.use("B")                      # B is used again: C is now the least recently used other model
    w.use("D")
    assert w.gone("C").wait(10) and w.names() == ["A", "B", "D"]
    e = w.models.get("D")
    assert e.users == 0 and not e.default and e.keep_alive == 300


def test_the_default_model_goes_last_and_comes_back_as_the_default():
    w = World(max_loaded=1)
    w.use("B")                      # the only one that can make room is the default
    assert w.gone("A").wait(10) and w.names() == ["B"]
    assert w.default.engine is None        # the registry holds nothing of it any more
    again = w.use("A")
    assert again.default and again.keep_alive == FOREVER and w.names() == ["A"]


def test_a_busy_model_is_not_unloaded_the_load_waits_for_it():
    w = World(max_loaded=2)
    held = w.models.acquire("B")            # a request running on B
    got = {}
    waiter = threading.Thread(target=lambda: got.update(c=w.models.acquire("C")))
    other = w.models.acquire("A")          # the default is busy too
    waiter.start()
    # nothing idle: C waits; B and A stay loaded and keep answering
    assert w.models.acquire("B") is held
    w.models.release(held)
    assert w.names() == ["A", "B"] and not w.gone("B").is_set()
    w.models.release(held)                 # B's last request ends: now it may go
    waiter.join(10)
    assert not waiter.is_alive() and got["c"].name == "C" and w.gone("B").is_set()
    assert w.events.index(("unloaded", "B")) < w.events.index(("loaded", "C"))
    w.models.release(other)


def test_all_busy_past_the_wait_is_models_busy():
    w = World(max_loaded=1, wait=0.0)
    held = w.models.acquire("A")
    with pytest.raises(ModelsBusy, match="--max-loaded-models 1"):
        w.models.acquire("B")
    w.models.release(held)
    assert w.names() == ["A"]


def test_memory_unloads_idle_models_before_loading_and_refuses_what_cannot_fit():
    w = World(max_loaded=4, total=3 * 100 * MB + MEMORY_HEADROOM)   # room for three
    w.use("B")
    w.use("C")
    assert w.names() == ["A", "B", "C"]
    w.use("D")                               # the count allows it, memory does not: B (LRU) goes
    assert w.gone("B").wait(10) and w.names() == ["A", "C", "D"]
    w.size = 10 * 100 * MB                   # a model larger than the machine: everything idle goes, then no
    with pytest.raises(NotEnoughMemory, match="MiB is available"):
        w.models.acquire("E")
    assert w.names() == []
    w.size = 100 * MB
    assert w.use("A").default                # the default loads again afterwards


def test_keep_alive_zero_unloads_after_the_request_negative_keeps_it():
    w = World(max_loaded=3)
    e = w.models.acquire("B")
    w.models.release(e, keep_alive=0.0)
    assert w.gone("B").wait(10) and w.names() == ["A"]
    w.use("C", keep_alive=FOREVER)
    assert w.models.get("C").expires is None and w.models.get("C").expires_wall() is None
    w.use("A", keep_alive=0.0)               # asked: the default goes too
    assert w.gone("A").wait(10) and w.names() == ["C"]


def test_expire_waits_for_running_requests_and_spares_a_pinned_model():
    w = World(max_loaded=3)
    e = w.models.acquire("B")
    assert w.models.expire("B") is e and w.names() == ["A", "B"]     # busy: it stays for now
    w.models.release(e)                       # the request's own keep_alive (none) does not undo the stop
    assert w.gone("B").wait(10)
    w.models.pin("A")
    assert w.models.expire("A").pinned and w.names() == ["A"]
    assert w.models.expire("nothing") is None


def test_a_timed_keep_alive_ends_on_its_own():
    w = World(max_loaded=3)
    w.use("B", keep_alive=0.05)
    assert w.gone("B").wait(10) and w.names() == ["A"]
