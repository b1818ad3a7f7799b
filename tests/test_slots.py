"""Many users, one engine: slots, batched decode through the scheduler, cancellation of one
stream, slot choice by prefix, and the prompt cache across a restart."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.engine.engine import Engine, GenerationParams
from edge.engine.prompt_cache import PromptCache
from edge.engine.sampler import SamplingParams
from edge.launch.scheduling import start_scheduler
from edge.model.bundle import Bundle
from edge.model.forward import PREFILL_CHUNK

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[5, 17, 33, 2, 9, 40, 41], [7, 7, 100], list(range(1, 80)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


def tokens(events):
    return [e.token_id for e in events if e.token_id is not None], events[-1]


def alone(engine, prompt, params):
    engine.reset()
    return tokens(list(engine.generate(prompt, params)))


@pytest.mark.parametrize("backend", ["numpy", "litert"])
def test_concurrent_requests_equal_the_same_requests_one_at_a_time(tiny_bundle, backend):
    engine = Engine(Bundle.open(tiny_bundle), max_ctx=128, backend=backend, parallel=4)
    engine.eos_ids = frozenset()
    params = [GenerationParams(max_tokens=n, sampling=s) for n, s in
              [(12, GREEDY), (20, GREEDY), (9, GREEDY), (15, SamplingParams(temperature=1.0, seed=4))]]
    want = [alone(engine, p, q) for p, q in zip(PROMPTS, params)]
    engine.reset()
    scheduler = start_scheduler(engine, max_queue=0)
    steps = []
    real_step = engine.step
    engine.step = lambda seqs: steps.append(len(seqs)) or real_step(seqs)
    jobs = [scheduler.submit(p, q) for p, q in zip(PROMPTS, params)]
    got = [tokens(list(j.events())) for j in jobs]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1].finish_reason for g in got] == ["length"] * 4
    assert max(steps) == 4                   # they really ran together


def test_cancelling_one_of_four_streams_leaves_the_others_unchanged(tiny_bundle):
    engine = Engine(Bundle.open(tiny_bundle), max_ctx=128, backend="numpy", parallel=4)
    engine.eos_ids = frozenset()
    p = GenerationParams(max_tokens=25, sampling=GREEDY)
    want = [alone(engine, prompt, p)[0] for prompt in PROMPTS]
    engine.reset()
    real_step = engine.step
    engine.step = lambda seqs: time.sleep(0.03) or real_step(seqs)     # slow enough to interrupt
    scheduler = start_scheduler(engine)
    jobs = [scheduler.submit(prompt, p) for prompt in PROMPTS]
    out = {}

    def read(i):
        toks = []
        for ev in jobs[i].events():
            if ev.token_id is not None:
                toks.append(ev.token_id)
                if i == 1 and len(toks) == 5:
                    jobs[1].cancel()
            last = ev
        out[i] = (toks, last.finish_reason)
    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out[1][1] == "cancelled" and out[1][0] == want[1][:len(out[1][0])] and len(out[1][0]) < 25
    for i in (0, 2, 3):
        assert out[i] == (want[i], "length")
    assert engine.free_slots() == 4


def test_a_request_lands_in_the_slot_that_holds_its_prefix(tiny_bundle):
    engine = Engine(Bundle.open(tiny_bundle), max_ctx=256, backend="numpy", parallel=3)
    p = GenerationParams(max_tokens=2, sampling=GREEDY)
    system_a, system_b = [10 + i % 90 for i in range(130)], [110 + i % 90 for i in range(100)]   # 2 and 1 whole chunks
    list(engine.generate(system_a + [1, 2], p))
    list(engine.generate(system_b + [3], p))
    list(engine.generate([99, 98], p))
    slot_of = {id(s.cache): i for i, s in enumerate(engine.slots)}
    holds_a = next(i for i, s in enumerate(engine.slots) if s.cache.tokens[:130] == system_a)
    seq = engine.start(system_a + [7, 7, 7], p)
    assert slot_of[id(seq.slot.cache)] == holds_a and seq.usage.cached_tokens == 128   # its whole chunks
    *_, last = _drain(engine, seq)
    assert last.usage.cached_tokens == 128


def _drain(engine, seq):
    while not seq.done:
        for _, events in engine.step([seq]):
            yield from events


def test_the_prompt_cache_survives_a_restart(tiny_bundle, tmp_path):
    bundle = Bundle.open(tiny_bundle)
    system = [3 + i % 200 for i in range(297)]        # a long system prompt: worth keeping
    p = GenerationParams(max_tokens=6, sampling=GREEDY)
    first = Engine(bundle, max_ctx=512, backend="numpy", prompt_cache=PromptCache(tmp_path, "b1", 1 << 30))
    first.eos_ids = frozenset()
    want, _ = tokens(list(first.generate(system + [1, 2], p)))
    first.wait_for_writes()                           # written in the background ...
    assert list(tmp_path.glob("*.kv"))                # ... once the long prompt was read

    second = Engine(bundle, max_ctx=512, backend="numpy", prompt_cache=PromptCache(tmp_path, "b1", 1 << 30))
    second.eos_ids = frozenset()
    got, last = tokens(list(second.generate(system + [1, 2], p)))
    kept = len(system) // PREFILL_CHUNK * PREFILL_CHUNK
    assert last.usage.cached_tokens == kept and got == want        # the prompt's whole prefill chunks
    other, last = tokens(list(second.generate(system + [9], p)))   # a new question after the same prompt
    assert last.usage.cached_tokens == kept
    cold = Engine(bundle, max_ctx=512, backend="numpy")
    cold.eos_ids = frozenset()
    assert tokens(list(cold.generate(system + [9], p)))[0] == other

    foreign = Engine(bundle, max_ctx=512, backend="numpy", prompt_cache=PromptCache(tmp_path, "b2", 1 << 30))
    assert list(foreign.generate(system + [1, 2], p))[-1].usage.cached_tokens == 0


def test_f16_kv_cache_stays_close_to_f32(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    a = Engine(bundle, max_ctx=128, backend="numpy")
    b = Engine(bundle, max_ctx=128, backend="numpy", kv_type="f16")
    assert b.slots[0].cache.token_bytes * 2 == a.slots[0].cache.token_bytes
    same = Engine(bundle, max_ctx=128, backend="numpy", kv_type="f16", kv_pool_bytes=a.kv_cache_bytes)
    assert same.kv_pool.budget == 2 * a.kv_pool.budget          # the same memory holds twice the tokens
    ca, cb = a.model.new_cache(), b.model.new_cache(np.float16)
    la, lb = a.model.prefill(PROMPTS[2], ca, all_logits=True), b.model.prefill(PROMPTS[2], cb, all_logits=True)
    assert np.abs(la - lb).max() < 1e-2 * np.abs(la).max()


def test_eight_http_clients_streaming_at_once_get_their_own_answers(smol_bundle):
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from tests.http_server import engine_text, ready_state, running
    engine = Engine(Bundle.open(smol_bundle), max_ctx=512, parallel=4)
    questions = [f"Name {w} in one word." for w in ("a colour", "a fruit", "an animal", "a city", "a planet",
                                                    "a metal", "a tree", "a river")]
    want = [engine_text(engine, engine.encode_chat([{"role": "user", "content": q}]), 12, temperature=0)[0]
            for q in questions]
    state = ready_state(engine)
    seen = []
    real_step = engine.step
    engine.step = lambda seqs: seen.append(len(seqs)) or real_step(seqs)
    with running(state) as base:
        api = OpenAI(base_url=f"{base}/v1", api_key="x")

        def ask(q):
            return "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
                model=engine.name, messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0, stream=True))
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, questions))
    assert got == want
    assert max(seen) == 4


def test_n_choices_read_the_prompt_once_and_decode_together(tiny_bundle):
    engine = Engine(Bundle.open(tiny_bundle), max_ctx=128, backend="numpy", parallel=4)
    engine.eos_ids = frozenset()
    prompt = PROMPTS[2]                                    # 79 tokens
    params = [GenerationParams(max_tokens=8, sampling=SamplingParams(temperature=1.0, seed=s)) for s in (1, 2, 3)]
    want = [alone(engine, prompt, p)[0] for p in params]
    engine.reset()
    rows = []
    real = engine.model.forward_batch
    engine.model.forward_batch = lambda items, **kw: rows.append(sum(len(t) for t, _ in items)) or real(items, **kw)
    scheduler = start_scheduler(engine)
    jobs = scheduler.submit_choices(prompt, params)
    got = [tokens(list(j.events())) for j in jobs]
    assert [g[0] for g in got] == want
    kept = (len(prompt) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
    assert [g[1].usage.cached_tokens for g in got] == [0, kept, kept]      # the twin's whole chunks
    assert sum(rows) == len(prompt) + 2 * (len(prompt) - kept) + 3 * 7   # the rest of the prompt per fork


def test_a_job_whose_reader_cancels_it_while_waiting_gives_its_queue_place_back(tiny_bundle):
    """The serial console cancels through the event it passed to submit (Ctrl-C), not through
    Job.cancel: such a job, dropped from the queue, must still give its place back, or the
    queue fills with ghosts and refuses everyone ("busy: 0 requests are already waiting")."""
    engine = Engine(Bundle.open(tiny_bundle), max_ctx=128, backend="numpy", parallel=1)
    engine.eos_ids = frozenset()
    real_step = engine.step
    engine.step = lambda seqs: time.sleep(0.02) or real_step(seqs)     # the one slot stays busy
    scheduler = start_scheduler(engine, max_queue=2)
    running = scheduler.submit(PROMPTS[0], GenerationParams(max_tokens=100, sampling=GREEDY))
    p = GenerationParams(max_tokens=3, sampling=GREEDY)
    for _ in range(4):                          # more rounds than the queue has places
        cancel = threading.Event()
        waiting = [scheduler.submit(PROMPTS[1], p, cancel=cancel) for _ in range(2)]
        cancel.set()
        for job in waiting:
            assert list(job.events())[-1].finish_reason == "cancelled"
    running.cancel()
    assert list(running.events())[-1].finish_reason == "cancelled"
    assert tokens(list(scheduler.submit(PROMPTS[2], p).events()))[1].finish_reason == "length"
