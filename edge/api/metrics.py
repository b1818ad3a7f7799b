"""Prometheus metrics in the text exposition format (0.0.4), written by hand: no dependency.

Token counts come from the engine's own usage report, through a Scheduler listener (so any
interface's requests are counted); request counts by HTTP status come from the HTTP layer;
the queue depth is read from the scheduler at scrape time.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import Counter

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets=TTFT_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)    # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {running}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()     # by HTTP status code
        self.generations: Counter[str] = Counter()  # by finish reason
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.last_tokens_per_second = 0.0
        self.last_duration = 0.0                    # seconds the last generation held the engine
        self.ttft = Histogram()
        self.ttft_queued = Histogram()              # from submission: queue wait included
        self.inter_token = Histogram(ITL_BUCKETS)   # gap between a stream's tokens, other streams beside it
        self._last_token: dict[int, float] = {}
        self.queue_depth = lambda: 0
        self.running = lambda: 0
        self.loaded = lambda: False
        self.kv_pool = lambda: (0, 0)       # KV pool bytes (granted to slots, budget)

    def count_request(self, status: int) -> None:
        with self._lock:
            self.requests[str(status)] += 1

    def on_event(self, job, event) -> None:
        """Scheduler listener: called in the engine's thread for every event."""
        now = time.monotonic()
        with self._lock:
            if event.token_id is not None:
                last = self._last_token.get(id(job))
                if last is None:
                    self.ttft_queued.observe(now - job.submitted)
                else:
                    self.inter_token.observe(now - last)
                self._last_token[id(job)] = now
            if event.usage is not None:
                self._last_token.pop(id(job), None)
        if event.usage is None:
            return
        u = event.usage
        with self._lock:
            self.generations[event.finish_reason or "unknown"] += 1
            self.generated_tokens += u.completion_tokens
            self.prompt_tokens += u.prompt_tokens
            self.cached_tokens += u.cached_tokens
            self.last_duration = u.time_to_first_token + u.decode_seconds
            if u.completion_tokens:
                self.ttft.observe(u.time_to_first_token)
            if u.completion_tokens > 1:
                self.last_tokens_per_second = u.decode_tokens_per_second

    def render(self) -> str:
        with self._lock:
            parts = [
                _family("edge_llm_requests_total", "counter", "HTTP requests by status code.",
                        [f'edge_llm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]),
                _family("edge_llm_generations_total", "counter", "Finished generations by finish reason.",
                        [f'edge_llm_generations_total{{finish_reason="{r}"}} {n}'
                         for r, n in sorted(self.generations.items())]),
                _simple("edge_llm_generated_tokens_total", "counter", "Tokens generated.", self.generated_tokens),
                _simple("edge_llm_prompt_tokens_total", "counter", "Prompt tokens received.", self.prompt_tokens),
                _simple("edge_llm_cached_prompt_tokens_total", "counter",
                        "Prompt tokens whose KV cache was reused (not recomputed).", self.cached_tokens),
                _simple("edge_llm_last_tokens_per_second", "gauge",
                        "Decode speed of the last request, tokens per second.", self.last_tokens_per_second),
                _simple("edge_llm_queue_depth", "gauge", "Requests waiting for a slot.", self.queue_depth()),
                _simple("edge_llm_running", "gauge", "Requests generating now (busy slots).", self.running()),
                _simple("edge_llm_kv_pool_used_bytes", "gauge",
                        "KV cache memory granted to slots (running and idle) out of the pool.", self.kv_pool()[0]),
                _simple("edge_llm_kv_pool_bytes", "gauge", "The KV pool's budget (--kv-pool-mb).", self.kv_pool()[1]),
                _simple("edge_llm_model_loaded", "gauge", "1 once the model is loaded and warm.",
                        int(bool(self.loaded()))),
                _family("edge_llm_time_to_first_token_seconds", "histogram",
                        "Time from the start of a generation to its first token.",
                        self.ttft.lines("edge_llm_time_to_first_token_seconds")),
                _family("edge_llm_request_time_to_first_token_seconds", "histogram",
                        "Time from a request's submission (queue wait included) to its first token.",
                        self.ttft_queued.lines("edge_llm_request_time_to_first_token_seconds")),
                _family("edge_llm_inter_token_seconds", "histogram",
                        "Time between two tokens of one stream (other streams run beside it).",
                        self.inter_token.lines("edge_llm_inter_token_seconds")),
            ]
        return "".join(parts)


def _family(name: str, kind: str, help_: str, samples: list[str]) -> str:
    return f"# HELP {name} {help_}\n# TYPE {name} {kind}\n" + "".join(s + "\n" for s in samples)


def _simple(name: str, kind: str, help_: str, value) -> str:
    return _family(name, kind, help_, [f"{name} {_num(value)}"])


def _num(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
