"""The models a server has loaded, by name: one engine and scheduler each, within a budget.

A request for an installed model that is not loaded loads it (`acquire`); the request holds
it until its reply has ended (`release`). Loading keeps within two bounds:

- `max_loaded` models at once (`serve --max-loaded-models`);
- memory: what the model needs (its bundle plus its KV caches, `estimate`) must fit in the
  available memory less `MEMORY_HEADROOM`.

When a bound is reached the least recently used model with no request running is unloaded
first: another model before the served default one, never a pinned one (the serial console
and the Wyoming service hold the default model's engine). When every candidate is busy the
load waits until one is free (up to `wait` seconds, then `ModelsBusy`); when nothing left
to unload makes room it is `NotEnoughMemory`.

Keep-alive (Ollama's `keep_alive`): after a model's last request ends it stays loaded that
long; 0 unloads it as soon as no request holds it, a negative value keeps it forever. A
request's own keep_alive wins; otherwise the served default model stays loaded and another
stays `keep_alive` seconds (`serve --keep-alive`). A reaper thread unloads expired models.

Loading, unloading and the reaper run in the calling threads or the reaper's own; nothing
here knows HTTP. Unloading a model ends its scheduler's worker and drops every reference
this registry holds, then gives freed memory back to the system.
"""
from __future__ import annotations

import gc
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge.launch.memory import release_free_memory

log = logging.getLogger("edge.models")

FOREVER = math.inf
MEMORY_HEADROOM = 200 << 20     # bytes left free beside a newly loaded model (requests' own memory)

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value) -> float | None:
    """Ollama's keep_alive in seconds: a number of seconds or a Go duration string ("5m",
    "1h30m", "90s", "300"); negative = forever (`FOREVER`), 0 = unload after this request.
    None stays None (not given). Raises ValueError naming the value otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"keep_alive must be a duration such as \"5m\" or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"keep_alive must be a duration such as \"5m\", \"1h30m\" or \"90s\", or a number "
                                 f"of seconds; got {value!r}") from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise ValueError(f"keep_alive must be a duration such as \"5m\" or a number of seconds, got {value!r}")
    if math.isnan(seconds):
        raise ValueError(f"keep_alive must be a number, got {value!r}")
    return FOREVER if seconds < 0 else seconds


class ModelsBusy(RuntimeError):
    """Every loaded model that would have to make room is answering a request."""


class NotEnoughMemory(RuntimeError):
    """The model does not fit in the available memory, even with every idle model unloaded."""


@dataclass(eq=False)
class Loaded:
    """A loaded model. `users`: requests holding it; `expires`: monotonic time it unloads at
    once no request holds it (None: never)."""
    key: str                     # the bundle's path: one entry per bundle whatever it is called
    engine: object
    scheduler: object
    size: int                    # bytes: bundle + KV caches (what `estimate` said)
    default: bool = False
    pinned: bool = False
    users: int = 0
    keep_alive: float = FOREVER
    last_used: float = field(default_factory=time.monotonic)
    expires: float | None = None
    unloading: bool = False
    stopping: bool = False       # asked to unload (`expire`) while requests held it
    extra: dict = field(default_factory=dict)     # an interface's per-model state (e.g. a limiter)
    name: str = ""

    def __post_init__(self):
        self.name = self.name or self.engine.name

    def expires_wall(self) -> float | None:
        """The wall-clock time it unloads at if no request comes (None: it stays)."""
        if self.pinned or self.keep_alive == FOREVER:
            return None
        left = self.keep_alive if self.users or self.expires is None else self.expires - time.monotonic()
        return time.time() + max(0.0, left)


class LoadedModels:
    """`open(key) -> (engine, scheduler)` loads the bundle at `key`; `estimate(key)` is the
    bytes it will take; `available()` the memory available now (None: unknown, not checked)."""

    def __init__(self, open: Callable[[str], tuple], max_loaded: int, keep_alive: float,
                 estimate: Callable[[str], int] = lambda key: 0,
                 available: Callable[[], int | None] = lambda: None, wait: float | None = 300.0):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self._open, self._estimate, self._available = open, estimate, available
        self.max_loaded, self.keep_alive, self.wait = max_loaded, keep_alive, wait
        self._models: dict[str, Loaded] = {}
        self._loading: set[str] = set()
        self._closing: set[str] = set()          # taken out of the table, memory not yet freed
        self._cond = threading.Condition()
        self._closed = False
        self.default_key: str | None = None
        self.listeners: list[Callable[[str, Loaded], None]] = []     # ("loaded" | "unloaded", entry)
        self._reaper = threading.Thread(target=self._reap, name="edge-llm-models", daemon=True)
        self._reaper.start()

    # --- what is loaded ------------------------------------------------------------------
    def add(self, key: str, engine, scheduler, size: int = 0, default: bool = False) -> Loaded:
        """A model loaded outside (the served default one, at start-up)."""
        entry = Loaded(key, engine, scheduler, size, default=default)
        with self._cond:
            if default:
                self.default_key = key
            self._models[key] = entry
            self._cond.notify_all()
        self._tell("loaded", entry)
        return entry

    def get(self, key: str) -> Loaded | None:
        with self._cond:
            return self._models.get(key)

    def default(self) -> Loaded | None:
        with self._cond:
            return next((e for e in self._models.values() if e.default), None)

    def loaded(self) -> list[Loaded]:
        """Most recently used first."""
        with self._cond:
            return sorted(self._models.values(), key=lambda e: -e.last_used)

    def pin(self, key: str) -> None:
        """Never unload this one (another interface holds its engine)."""
        with self._cond:
            self._models[key].pinned = True

    # --- requests --------------------------------------------------------------------------
    def try_acquire(self, key: str) -> Loaded | None:
        """The model at `key` held for one request if it is loaded; None if it is not."""
        with self._cond:
            entry = self._models.get(key)
            if entry is None or entry.unloading:
                return None
            entry.users += 1
            entry.last_used = time.monotonic()
            return entry

    def acquire(self, key: str) -> Loaded:
        """The model at `key`, loaded if it is not, held for one request until `release`."""
        deadline = None if self.wait is None else time.monotonic() + self.wait
        victims: list[Loaded] = []
        with self._cond:
            while True:
                entry = self._models.get(key)
                if entry is not None and not entry.unloading:
                    entry.users += 1
                    entry.last_used = time.monotonic()
                    return entry
                if entry is None and not self._loading and not self._closing:    # one load at a time
                    victims = self._make_room()
                    if victims is not None:
                        self._loading.add(key)
                        break
                if deadline is not None and time.monotonic() >= deadline:
                    raise ModelsBusy(f"every loaded model is answering requests (--max-loaded-models "
                                     f"{self.max_loaded}); retry shortly")
                self._cond.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        try:
            for victim in victims:
                self._close(victim)
            need = self._estimate(key)
            self._check_memory(key, need)
            engine, scheduler = self._open(key)
        except BaseException:
            with self._cond:
                self._loading.discard(key)
                self._cond.notify_all()
            raise
        default = key == self.default_key        # another model goes by its installed name (unique)
        entry = Loaded(key, engine, scheduler, _size(engine, need), default=default, users=1,
                       name=engine.name if default else Path(key).name)
        entry.keep_alive = self.default_keep_alive(entry)
        with self._cond:
            self._loading.discard(key)
            self._models[key] = entry
            self._cond.notify_all()
        log.info("loaded %s (%d of at most %d models)", entry.name, len(self._models), self.max_loaded)
        self._tell("loaded", entry)
        return entry

    def release(self, entry: Loaded, keep_alive: float | None = None) -> None:
        """A request that held `entry` has ended; `keep_alive` is its own (None: the model's)."""
        with self._cond:
            entry.users -= 1
            entry.last_used = time.monotonic()
            if entry.stopping:
                entry.keep_alive = 0.0
            elif not entry.pinned:
                entry.keep_alive = keep_alive if keep_alive is not None else self.default_keep_alive(entry)
            entry.expires = None if entry.keep_alive == FOREVER else entry.last_used + entry.keep_alive
            self._cond.notify_all()

    def default_keep_alive(self, entry: Loaded) -> float:
        """A request that gives no keep_alive: the served default model stays, another
        stays `keep_alive` seconds."""
        return FOREVER if entry.default else self.keep_alive

    def expire(self, key: str) -> Loaded | None:
        """keep_alive 0 without a request (`edge-llm stop`): unloaded now if no request holds
        it, else when the last one ends. None if it is not loaded. A pinned model stays."""
        with self._cond:
            entry = self._models.get(key)
            if entry is None or entry.pinned:
                return entry
            entry.keep_alive, entry.expires, entry.stopping = 0.0, time.monotonic(), True
            self._cond.notify_all()
        self._reap_once()
        return entry

    # --- unloading -------------------------------------------------------------------------
    def _idle(self, entry: Loaded) -> bool:
        return entry.users == 0 and not entry.pinned and not entry.unloading

    def _make_room(self) -> list[Loaded] | None:
        """Under the lock: the models to unload so that one more fits `max_loaded`, least
        recently used first and the default one last, taken out of the table now (a request
        for one of them waits, then loads it again). None: all are busy; wait."""
        over = len(self._models) + len(self._loading) + 1 - self.max_loaded
        if over <= 0:
            return []
        idle = [e for e in sorted(self._models.values(), key=lambda e: (e.default, e.last_used)) if self._idle(e)]
        if len(idle) < over:
            return None
        for e in idle[:over]:
            self._take_out(e)
        return idle[:over]

    def _take_out(self, entry: Loaded) -> None:
        entry.unloading = True
        del self._models[entry.key]
        self._closing.add(entry.key)

    def _check_memory(self, key: str, need: int) -> None:
        """Unload idle models (LRU, others before the default) until `need` fits beside the
        headroom; NotEnoughMemory when nothing idle is left and it still does not fit."""
        while need and (avail := self._available()) is not None and need + MEMORY_HEADROOM > avail:
            with self._cond:
                order = sorted(self._models.values(), key=lambda e: (e.default, e.last_used))
                victim = next((e for e in order if self._idle(e)), None)
                if victim is not None:
                    self._take_out(victim)
            if victim is None:
                raise NotEnoughMemory(f"{key}: needs {need / 2**20:.0f} MiB (weights and KV cache) + "
                                      f"{MEMORY_HEADROOM >> 20} MiB headroom, {avail / 2**20:.0f} MiB is available "
                                      "and no idle model is left to unload; stop a model (edge-llm stop NAME), or "
                                      "serve with a smaller --ctx or --parallel")
            self._close(victim)

    def _close(self, entry: Loaded) -> None:
        """End its scheduler (no request holds it), keep its prompt cache, free its memory."""
        try:
            entry.scheduler.close()
            entry.engine.persist()
        except Exception as e:             # its memory goes all the same
            log.warning("unloading %s: %s", entry.name, e)
        entry.engine = entry.scheduler = None
        entry.extra.clear()
        gc.collect()
        release_free_memory()
        with self._cond:
            self._closing.discard(entry.key)
            self._cond.notify_all()
        log.info("unloaded %s", entry.name)
        self._tell("unloaded", entry)

    def _expired(self, now: float) -> list[Loaded]:
        out = [e for e in self._models.values()
               if self._idle(e) and e.expires is not None and e.expires <= now]
        for e in out:
            self._take_out(e)
        return out

    def _reap_once(self) -> None:
        with self._cond:
            gone = self._expired(time.monotonic())
            if gone:
                self._cond.notify_all()
        for e in gone:
            self._close(e)

    def _reap(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                gone = self._expired(now)
                if not gone:
                    due = [e.expires for e in self._models.values() if e.expires is not None and self._idle(e)]
                    self._cond.wait(max(0.0, min(due) - now) if due else None)
                    continue
                self._cond.notify_all()
            for e in gone:
                self._close(e)

    def _tell(self, what: str, entry: Loaded) -> None:
        for listener in list(self.listeners):
            try:
                listener(what, entry)
            except Exception:
                log.exception("a models listener failed")

    def close(self) -> None:
        """Stop the reaper (the process is ending); the models stay as they are."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def model_key(bundle_path) -> str:
    """A model's key: its bundle's resolved path (one entry whatever name it was asked by)."""
    return str(Path(bundle_path).resolve())


def _size(engine, estimate: int) -> int:
    try:
        return model_bytes(engine)
    except (AttributeError, KeyError, TypeError):      # a stand-in engine: what was estimated
        return estimate


def model_bytes(engine) -> int:
    """What a loaded model takes: its bundle's files and its KV caches."""
    files = engine.bundle.manifest.get("files", {})
    return sum(f.get("size", 0) for f in files.values()) + engine.kv_cache_bytes


def loader_like(engine, scheduler) -> Callable[[str], tuple]:
    """`open` for `LoadedModels`: another bundle with this model's context, slots and queue."""
    from edge.engine.engine import Engine
    from edge.engine.scheduler import Scheduler
    from edge.model.bundle import Bundle

    def open_model(key: str):
        other = Engine(Bundle.open(key), max_ctx=engine.max_ctx, parallel=engine.parallel)
        return other, Scheduler(other, max_queue=scheduler.max_queue, time_limit=scheduler.time_limit,
                                stall_seconds=scheduler.stall_seconds)
    return open_model


def estimate_bytes(key: str, ctx: int, parallel: int, kv_type: str, kv_pool_mb: int) -> int:
    """What loading the bundle at `key` will take: its files and its KV pool (at most every
    slot at its context; `--ctx 0`: the context `load_engine` would choose)."""
    from edge.launch import available_memory, kv_bytes_per_token, kv_pool_bytes, max_context
    from edge.model.bundle import Bundle
    bundle = Bundle.open(key, verify=False)
    cfg = bundle.config
    if ctx == 0:
        ctx = max_context(cfg, available_memory(), kv_type, parallel)
    files = sum(f.get("size", 0) for f in bundle.manifest.get("files", {}).values())
    slots = parallel * min(ctx, cfg.max_position_embeddings) * kv_bytes_per_token(cfg, kv_type)
    return files + min(slots, kv_pool_bytes(kv_pool_mb))


def available_to_us() -> int | None:
    """Memory this process may still take: the system's MemAvailable, bounded by its cgroup's
    memory.max less memory.current when one is set (systemd's MemoryMax= for the service)."""
    from edge.launch import available_memory
    avail = available_memory()
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        root = Path("/sys/fs/cgroup") / path.lstrip("/")
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int((root / "memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError, StopIteration):
        pass
    return avail
