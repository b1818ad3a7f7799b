"""Liveness means progress: with requests pending (running or waiting) and neither an engine
step nor an admission for `stall_seconds`, /health says "stalled" (503) and the systemd
watchdog stops being fed, so systemd restarts the service; idle is always healthy, and
progress makes it healthy again."""
from __future__ import annotations

import threading
import time

import httpx

from edge.engine.engine import GenerationParams
from edge.launch.scheduling import start_scheduler
from edge.service import sd_notify
from tests.http_server import endless_engine, ready_state, running

STALL = 0.5


def wait_for(condition, timeout: float = 30.0):
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.02)


class Pings:
    def __init__(self):
        self.count = 0
        self.lock = threading.Condition()

    def __call__(self) -> bool:
        with self.lock:
            self.count += 1
            self.lock.notify_all()
        return True

    def wait_more(self, than: int, timeout: float = 30.0) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: self.count > than, timeout), "no ping"


def watched(tiny_bundle):
    """(engine, state, scheduler): two slots, the scheduler's stall time STALL."""
    engine = endless_engine(tiny_bundle, 128, backend="numpy", parallel=2)
    state = ready_state(engine)
    state.scheduler.stall_seconds = STALL
    return engine, state, state.scheduler


def test_an_engine_whose_step_blocks_is_reported_and_not_fed_to_the_watchdog(tiny_bundle):
    engine, state, scheduler = watched(tiny_bundle)
    gate, entered = threading.Event(), threading.Event()
    real = engine.step

    def step(seqs):
        if not gate.is_set():
            entered.set()
            gate.wait()                      # wedged: a step that does not return
        return real(seqs)
    pings = Pings()
    dog = sd_notify.Watchdog(scheduler.healthy, interval=0.1, ping=pings).start()
    try:
        with running(state) as base:
            time.sleep(2 * STALL)                            # idle for longer than the stall time ...
            assert httpx.get(f"{base}/health").json()["status"] == "ok"     # ... is not a stall
            pings.wait_more(0)
            engine.step = step
            job = scheduler.submit([5, 6, 7], GenerationParams(max_tokens=3))
            assert entered.wait(30)
            wait_for(lambda: not scheduler.healthy())
            r = httpx.get(f"{base}/health")
            assert r.status_code == 503 and r.json()["status"] == "stalled", r.text
            # no ping once stalled: after three watchdog periods the count has not moved
            with pings.lock:
                seen = pings.count
            time.sleep(0.35)
            assert pings.count <= seen + 1                   # at most one already past its health check
            gate.set()                                       # the step returns: progress again
            assert [ev.finish_reason for ev in job.events()][-1] == "length"
            wait_for(scheduler.healthy)
            with pings.lock:
                seen = pings.count
            pings.wait_more(seen)                            # fed again
            assert httpx.get(f"{base}/health").status_code == 200
    finally:
        gate.set()
        dog.stop(5)


def test_waiting_requests_that_can_never_get_a_slot_are_a_stall(tiny_bundle):
    """Every slot held and never given back (as a failed start once left it): the waiting
    request makes no progress, so /health reports it, although nothing is running."""
    engine, state, scheduler = watched(tiny_bundle)
    leaked = [engine.slot_pool.claim([1], owner=object(), wait=False) for _ in range(2)]
    assert engine.free_slots() == 0
    with running(state) as base:
        job = scheduler.submit([5, 6, 7], GenerationParams(max_tokens=3))
        assert not scheduler.busy and scheduler.pending
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 503)
        assert httpx.get(f"{base}/health").json()["status"] == "stalled"
        engine.slot_pool.release(leaked[0], leaked[0].owner)         # a slot comes back: it runs
        assert [ev.finish_reason for ev in job.events()][-1] == "length"
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 200)


def test_a_long_queue_behind_busy_slots_is_progress_not_a_stall(tiny_bundle):
    """Requests waiting while others run are fine as long as steps go on."""
    engine = endless_engine(tiny_bundle, 128, backend="numpy", parallel=1)
    real = engine.step
    engine.step = lambda seqs: time.sleep(0.05) or real(seqs)      # 50 ms a step: well inside the stall time
    scheduler = start_scheduler(engine, stall_seconds=STALL)
    jobs = [scheduler.submit([5, 6, 7], GenerationParams(max_tokens=8)) for _ in range(4)]
    health = []
    while not all(j._events.qsize() and j.sequence is not None and j.sequence.done for j in jobs):
        health.append(scheduler.healthy())
        time.sleep(0.02)
    assert all(health) and len(health) > 20
