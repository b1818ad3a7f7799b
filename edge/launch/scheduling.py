"""The shared scheduler with the product's queue bound and request time limit."""
from __future__ import annotations

from edge.engine.engine import Engine
from edge.engine.scheduler import Scheduler
from edge.launch.memory import release_free_memory
from edge.launch.request import DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_SECONDS


def start_scheduler(engine: Engine, max_queue: int = DEFAULT_MAX_QUEUE,
                    time_limit: float | None = DEFAULT_REQUEST_SECONDS,
                    stall_seconds: float | None = None) -> Scheduler:
    """`time_limit` None or 0: no limit; `stall_seconds` None: never reported wedged."""
    return Scheduler(engine, max_queue=max_queue, time_limit=time_limit or None, stall_seconds=stall_seconds,
                     on_idle=release_free_memory)
