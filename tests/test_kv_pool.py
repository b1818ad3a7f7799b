"""The shared KV pool: one slot grows long while the others stay short, idle prefixes are
evicted (and their memory really given back), a request waits for room held by running
ones, and none of it changes a request's tokens."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from edge.engine.engine import Engine, GenerationParams
from edge.engine.prompt_cache import PromptCache
from edge.engine.sampler import SamplingParams
from edge.launch.scheduling import start_scheduler
from edge.model.bundle import Bundle
from edge.model.kv_cache import ContextFull
from edge.model.forward import PREFILL_CHUNK

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=1.0, seed=11)
CTX = 448                     # per sequence; the tiny model's blocks are 128 tokens


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + salt) % 250 + 3 for i in range(n)]


def engine_with(bundle, pool_tokens: int | None, parallel: int = 3, **kw) -> Engine:
    b = Bundle.open(bundle)
    probe = Engine(b, max_ctx=CTX, backend="numpy")
    per_token = probe.slots[0].cache.token_bytes
    e = Engine(b, max_ctx=CTX, backend="numpy", parallel=parallel,
               kv_pool_bytes=None if pool_tokens is None else pool_tokens * per_token, **kw)
    e.eos_ids = frozenset()               # random weights: every request runs to max_tokens
    return e


def run(engine, ids, params):
    events = list(engine.generate(ids, params))
    return [e.token_id for e in events if e.token_id is not None], events[-1]


def resident_rows(cache) -> int:
    """Token rows' worth of K/V the system holds for this cache now."""
    got = cache.resident_bytes()
    assert got is not None, "mincore is needed to check memory (Linux)"
    return got // cache.token_bytes


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """The unchanged layout: room for every slot at full context, nothing ever evicted."""
    return engine_with(tiny_bundle, None, parallel=1)


def test_one_slot_grows_long_while_the_others_stay_short(tiny_bundle):
    e = engine_with(tiny_bundle, 640)          # 5 blocks for 3 slots of up to 448 tokens
    assert e.kv_pool.budget == 640 and e.max_ctx == CTX
    assert all(s.cache.committed == 0 and resident_rows(s.cache) == 0 for s in e.slots)
    run(e, prompt(20, 1), GenerationParams(max_tokens=4, sampling=GREEDY))
    seq_long = e.start(prompt(250, 2), GenerationParams(max_tokens=100, sampling=GREEDY))
    seq_short = e.start(prompt(10, 3), GenerationParams(max_tokens=5, sampling=GREEDY))
    while not (seq_long.done and seq_short.done):
        e.step([s for s in (seq_long, seq_short) if not s.done])
    caches = sorted((s.cache for s in e.slots), key=lambda c: c.length)
    assert [c.length for c in caches] == [14, 23, 349]
    assert [c.committed for c in caches] == [128, 128, 384]        # each holds the blocks of its own tokens
    assert e.kv_pool.used == 640 and e.kv_pool.evictions == 0
    assert all(resident_rows(c) <= c.committed for c in caches)
    assert resident_rows(caches[-1]) >= 349


def test_same_request_same_tokens_whatever_the_pool_did(tiny_bundle, reference):
    ids, params = prompt(150, 5), GenerationParams(max_tokens=60, sampling=SEEDED)
    reference.reset()
    want = run(reference, ids, params)[0]
    e = engine_with(tiny_bundle, 384)
    for salt in (6, 7, 8):                     # fill the slots: the pool must evict to make room
        run(e, prompt(100, salt), GenerationParams(max_tokens=20, sampling=GREEDY))
    assert e.kv_pool.evictions == 0 and e.kv_pool.used == 384
    assert run(e, ids, params)[0] == want
    assert e.kv_pool.evictions > 0
    assert run(e, ids, params)[0] == want        # again, from a slot that grew and was trimmed
    assert e.kv_pool.used <= e.kv_pool.budget


def test_prefix_reuse_across_requests_still_works(tiny_bundle, reference):
    e = engine_with(tiny_bundle, 512)
    first = prompt(200, 9)
    run(e, first, GenerationParams(max_tokens=8, sampling=GREEDY))
    ids = first + prompt(30, 10)
    got, last = run(e, ids, GenerationParams(max_tokens=12, sampling=GREEDY))
    assert last.usage.cached_tokens == len(first) // PREFILL_CHUNK * PREFILL_CHUNK   # the first prompt's whole chunks
    reference.reset()
    assert got == run(reference, ids, GenerationParams(max_tokens=12, sampling=GREEDY))[0]


def test_evicting_an_idle_slot_gives_its_memory_back(tiny_bundle):
    e = engine_with(tiny_bundle, 512, parallel=2)
    run(e, prompt(330, 11), GenerationParams(max_tokens=5, sampling=GREEDY))
    idle = max(e.slots, key=lambda s: s.cache.length).cache
    assert idle.length == 334 and idle.committed == 384 and resident_rows(idle) >= 334
    seq = e.start(prompt(300, 12), GenerationParams(max_tokens=3, sampling=GREEDY))   # needs 384 of 512
    assert idle.length == 0 and idle.committed == 0 and resident_rows(idle) == 0
    assert e.kv_pool.evictions == 1 and e.kv_pool.used == 384
    while not seq.done:
        e.step([seq])


def test_a_finished_request_keeps_only_its_tokens(tiny_bundle):
    e = engine_with(tiny_bundle, 640, parallel=1)
    seq = e.start(prompt(10, 13), GenerationParams(max_tokens=300, sampling=GREEDY))
    while not seq.done:
        e.step([seq])
    cache = e.slots[0].cache
    assert cache.length == 309 and cache.committed == 384
    ids = prompt(40, 14)                                   # shares nothing: the slot shrinks to fit it
    assert e.start(ids, GenerationParams(max_tokens=1, sampling=GREEDY)) is not None
    assert cache.committed == 128 and resident_rows(cache) <= 128


def test_a_request_waits_for_room_held_by_a_running_one(tiny_bundle, reference):
    e = engine_with(tiny_bundle, 384, parallel=2)
    params_b = GenerationParams(max_tokens=10, sampling=GREEDY)
    ids_b = prompt(200, 16)
    a = e.start(prompt(250, 15), GenerationParams(max_tokens=20, sampling=GREEDY))
    assert e.free_slots() == 1
    assert e.start(ids_b, params_b, wait=False) is None          # a slot is free, the memory is not
    started = threading.Event()
    got = {}

    def waiting():
        seq = e.start(ids_b, params_b)        # blocks until the pool has room
        started.set()
        got["seq"] = seq
    t = threading.Thread(target=waiting)
    t.start()
    assert not started.is_set()
    while not a.done:
        assert not started.is_set()
        e.step([a])
    assert started.wait(60)
    t.join(60)
    b = got["seq"]
    events = []
    while not b.done:
        for _, evs in e.step([b]):
            events += evs
    reference.reset()
    assert [ev.token_id for ev in events if ev.token_id is not None] == run(reference, ids_b, params_b)[0]


def test_the_scheduler_admits_a_waiting_request_when_another_finishes(tiny_bundle, reference):
    e = engine_with(tiny_bundle, 384, parallel=2)
    order = []
    scheduler = start_scheduler(e, max_queue=4)
    scheduler.listeners.append(lambda job, ev: order.append((job, ev.finish_reason)))
    pa = GenerationParams(max_tokens=30, sampling=GREEDY)
    pb = GenerationParams(max_tokens=10, sampling=SEEDED)
    ids_a, ids_b = prompt(250, 17), prompt(200, 18)
    ja = scheduler.submit(ids_a, pa)
    jb = scheduler.submit(ids_b, pb)
    toks_b = [ev.token_id for ev in jb.events() if ev.token_id is not None]
    toks_a = [ev.token_id for ev in ja.events() if ev.token_id is not None]
    first_b = next(i for i, (job, _) in enumerate(order) if job is jb)
    end_a = next(i for i, (job, reason) in enumerate(order) if job is ja and reason is not None)
    assert end_a < first_b                        # b ran only once a had given its room back
    reference.reset()
    assert toks_a == run(reference, ids_a, pa)[0]
    reference.reset()
    assert toks_b == run(reference, ids_b, pb)[0]


def test_two_growing_replies_that_cannot_both_fit_end_one_as_length(tiny_bundle):
    e = engine_with(tiny_bundle, 384, parallel=2)
    a = e.start(prompt(100, 19), GenerationParams(max_tokens=250, sampling=GREEDY))
    b = e.start(prompt(100, 20), GenerationParams(max_tokens=250, sampling=GREEDY))
    finals = {}
    while not (a.done and b.done):
        for seq, evs in e.step([s for s in (a, b) if not s.done]):
            for ev in evs:
                if ev.finish_reason:
                    finals[seq] = (ev.finish_reason, ev.usage.completion_tokens)
    assert sorted(r for r, _ in finals.values()) == ["length", "length"]
    counts = sorted(n for _, n in finals.values())
    assert counts[1] == 250 and counts[0] < 250               # one finished, the other gave way
    assert e.kv_pool.used <= e.kv_pool.budget


def test_a_prompt_that_could_never_fit_is_refused_at_once(tiny_bundle):
    e = engine_with(tiny_bundle, 256)
    assert e.max_ctx == 256                          # the pool bounds one sequence too
    with pytest.raises(ContextFull):
        e.start(prompt(256), GenerationParams(max_tokens=1, sampling=GREEDY))


def test_prompt_cache_restores_into_a_grown_or_shrunk_slot(tiny_bundle, reference, tmp_path):
    ids = prompt(300, 21)
    params = GenerationParams(max_tokens=12, sampling=GREEDY)
    reference.reset()
    want = run(reference, ids, params)[0]
    e = engine_with(tiny_bundle, 512, parallel=1, prompt_cache=PromptCache(tmp_path, "tiny", 1 << 30))
    assert run(e, ids[:290], params)[0]
    e.wait_for_writes()
    (entry,) = e.prompt_cache.entries()
    kept = 290 // PREFILL_CHUNK * PREFILL_CHUNK      # the whole prefill chunks of the prompt read
    assert len(entry.tokens) == kept
    for grown in (True, False):
        after = engine_with(tiny_bundle, 512, parallel=1, prompt_cache=PromptCache(tmp_path, "tiny", 1 << 30))
        if grown:                                   # a slot that grew long for another conversation
            run(after, prompt(420, 22), GenerationParams(max_tokens=20, sampling=GREEDY))
            assert after.slots[0].cache.committed == 512
        got, last = run(after, ids, params)
        assert last.usage.cached_tokens == kept and got == want
        assert after.slots[0].cache.committed == 384


def test_speculation_rollback_in_a_pooled_slot(tiny_bundle, reference):
    from edge.engine.speculation import PromptLookup
    ids = prompt(60, 23) * 3                          # repeats: the drafter finds drafts
    params = GenerationParams(max_tokens=80, sampling=GREEDY, speculate=True)
    reference.reset()
    want = run(reference, ids, GenerationParams(max_tokens=80, sampling=GREEDY, speculate=False))[0]
    e = engine_with(tiny_bundle, 384, parallel=1)
    drafted = []

    class Counting(PromptLookup):
        def __call__(self, history, k):
            d = super().__call__(history, k)
            drafted.append(len(d))
            return d
    e.new_drafter = Counting
    got = run(e, ids, params)[0]
    assert got == want and sum(drafted) > 0
    cache = e.slots[0].cache
    assert not cache.k[:, :, cache.length:cache.committed].any()      # rejected drafts' rows erased


def test_a_home_assistant_prompt_over_2048_tokens_with_the_default_serve_settings(smol_bundle, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    """The `ollama` client sending what Home Assistant sends for a 50-entity home (num_ctx
    8192, the Assist tools) to a server built from `serve`'s own defaults."""
    import ollama

    from bench.assist import TOOLS, conversation
    from edge.api.ollama_api import create_ollama_app
    from edge.cli.main import build_parser
    from edge.launch import engine_from_args
    from edge.launch.request import DEFAULT_CTX, DEFAULT_KV_POOL_MB, DEFAULT_PARALLEL
    from tests.http_server import ready_state, running
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    engine = engine_from_args(build_parser().parse_args(["serve", "-m", str(smol_bundle)]), log=lambda *a: None)
    assert engine.max_ctx == DEFAULT_CTX >= 8192 and engine.parallel == DEFAULT_PARALLEL
    assert engine.kv_cache_bytes <= DEFAULT_KV_POOL_MB << 20
    messages = conversation(50, __import__("datetime").datetime(2025, 4, 15, 18, 2, 11), True,
                            "Turn on the kitchen light.")
    state = ready_state(engine)
    with running(state, make_app=create_ollama_app) as base:
        got = ollama.Client(host=base, timeout=900).chat(
            model=engine.name, messages=messages, tools=TOOLS, keep_alive=-1,
            options={"num_ctx": 8192, "num_predict": 6, "temperature": 0})
    assert got.done and got.prompt_eval_count > 2048
    assert engine.kv_pool.used < 2 * got.prompt_eval_count            # what it needs, not parallel x ctx
    metrics = state.metrics.render()
    assert f"edge_llm_kv_pool_used_bytes {engine.kv_pool.used_bytes}\n" in metrics
    assert f"edge_llm_kv_pool_bytes {engine.kv_cache_bytes}\n" in metrics
    assert got.eval_count >= 1 and (got.message.content or got.message.tool_calls)
