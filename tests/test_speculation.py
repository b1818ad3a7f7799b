"""Prompt-lookup speculative decoding: the drafter, and the promise that drafting changes
nothing but speed (same greedy tokens, same sampled distribution, same KV cache)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from edge.engine.engine import Engine, GenerationParams
from edge.engine.sampler import SamplingParams
from edge.launch.scheduling import start_scheduler
from edge.engine.speculation import PromptLookup, Speculator, VerifyCost
from edge.launch.request import RequestDefaults
from edge.model.bundle import Bundle

GREEDY = SamplingParams(temperature=0.0)
# repeats, so the real drafter finds n-grams in the prompt
PROMPT = [5, 17, 33, 2 + 7, 9, 40, 41, 5, 17, 33, 9, 9, 40, 41, 5, 17, 60, 61, 62, 5, 17]


def engine_for(bundle, backend, eos=(), **kw):
    engine = Engine(Bundle.open(bundle), max_ctx=160, backend=backend, **kw)
    engine.eos_ids = frozenset(eos)
    return engine


def run(engine, prompt, speculate, **params):
    engine.reset()
    params.setdefault("sampling", GREEDY)
    events = list(engine.generate(prompt, GenerationParams(speculate=speculate, **params)))
    return ([e.token_id for e in events if e.token_id is not None], "".join(e.text for e in events),
            events[-1].finish_reason)


class Scripted:
    """A drafter the test controls: `plan(history, k)` -> draft; counts what it drafted."""

    def __init__(self, plan):
        self.plan, self.drafted = plan, 0

    def __call__(self, history, k):
        d = list(self.plan(history, k))[:k]
        self.drafted += len(d)
        return d


def oracle(prompt, reference):
    """Drafts the reference continuation (every draft fully accepted), up to its end and past
    it (tokens the sequence never reaches)."""
    full = list(prompt) + list(reference) + [3, 4, 5, 6, 7, 8, 9, 10]
    return lambda h, k: full[len(h):len(h) + k]


def contrary(reference_of):
    """Drafts tokens that are never the next greedy token (every draft fully rejected)."""
    return lambda h, k: [(reference_of(h) + 1 + i) % 256 for i in range(k)]


# --- the drafter ---------------------------------------------------------------------------
def test_prompt_lookup_copies_what_followed_the_latest_longest_match():
    look = PromptLookup(ngram_max=3, ngram_min=2)
    h = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 0, 2, 3]
    assert look(h, 3) == [7, 8, 0]            # [0 2 3]: none earlier; [2 3]: latest is at 6..7
    assert PromptLookup(3, 2)(h[:-3] + [1, 2, 3], 3) == [4, 5, 9]   # the longer match wins
    h2 = h + [4]
    assert look(h2, 2) == [5, 9]              # [2 3 4] occurred once, at 1..3 (index grown in place)
    assert look(h2 + [77], 4) == []           # [4 77] never seen
    assert look([1, 2, 1, 2], 5) == [1, 2]    # what follows may run into the suffix itself


def test_speculator_adapts_k_and_pauses_on_poor_acceptance():
    spec = Speculator(lambda h, k: [0] * k, k_start=4, k_max=8)
    assert len(spec.draft([1], 10)) == 4
    spec.update(4, 4)
    assert spec.k == 6                         # all accepted: longer drafts
    spec.update(6, 1)
    assert spec.k == 2                         # one accepted: draft what was accepted + 1
    for _ in range(6):
        spec.update(2, 0)
    assert spec.draft([1], 10) == []           # a run of rejections pauses drafting
    assert len(spec.draft([1], 1)) <= 1


def test_draft_length_follows_the_measured_verify_cost():
    cost = VerifyCost(k_max=8)
    for rows in range(1, 10):                  # a machine where every extra row costs half a step
        cost.observe(rows, 0.010 * (1 + 0.5 * (rows - 1)))
    good, poor = Speculator(lambda h, k: [0] * k), Speculator(lambda h, k: [0] * k)
    good.hits, good.misses = 9.0, 1.0           # 90 % of draft tokens accepted
    poor.hits, poor.misses = 1.0, 3.0           # 25 %
    assert 1 <= good.best_k(8, cost) <= 8
    assert poor.best_k(8, cost) == 0 and poor.draft([1, 2], 8, cost) == []
    tries = [len(poor.draft([1, 2], 8, cost)) for _ in range(40)]
    assert 0 < sum(t > 0 for t in tries) < 8       # paused, yet tried again now and then (backing off)
    flat = VerifyCost(k_max=8)
    for rows in range(1, 10):                  # extra rows nearly free: long drafts pay
        flat.observe(rows, 0.010 * (1 + 0.01 * (rows - 1)))
    assert good.best_k(8, flat) == 8 and good.best_k(8, flat) >= good.best_k(8, cost)


# --- greedy: identical output -------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "litert"])
def test_greedy_output_is_unchanged_by_speculation(tiny_bundle, tiny_int8, backend):
    bundle = tiny_int8 if backend == "litert" else tiny_bundle
    engine = engine_for(bundle, backend)
    want = run(engine, PROMPT, False, max_tokens=40)
    assert run(engine, PROMPT, True, max_tokens=40) == want                 # the real drafter

    ref = list(PROMPT) + want[0]
    for name, plan in [("accepted", oracle(PROMPT, want[0])),
                       ("rejected", contrary(lambda h: ref[len(h)] if len(h) < len(ref) else 0)),
                       ("half", lambda h, k: [ref[len(h)] if len(h) < len(ref) else 0, 255, 254][:k])]:
        drafter = Scripted(plan)
        engine.new_drafter = lambda: drafter
        assert run(engine, PROMPT, True, max_tokens=40) == want, name
        assert drafter.drafted > 0, name


@pytest.mark.parametrize("backend", ["numpy", "litert"])
def test_a_draft_running_past_eos_or_a_stop_string_ends_where_plain_decoding_ends(tiny_bundle, tiny_int8, backend):
    bundle = tiny_int8 if backend == "litert" else tiny_bundle
    plain = engine_for(bundle, backend)
    tokens, text, _ = run(plain, PROMPT, False, max_tokens=30)
    eos = tokens[12]                                   # make a token in mid-reply the eos
    first = tokens.index(eos)
    engine = engine_for(bundle, backend, eos=[eos])
    want = run(engine, PROMPT, False, max_tokens=30)
    assert want[0] == tokens[:first] and want[2] == "stop"
    engine.new_drafter = lambda: Scripted(oracle(PROMPT, tokens))   # drafts across the eos
    assert run(engine, PROMPT, True, max_tokens=30) == want

    word = text.split()[9]                              # a stop string in mid-reply
    stop = word + " "
    want = run(plain, PROMPT, False, max_tokens=30, stop=[stop])
    assert want[2] == "stop" and stop not in want[1] and len(want[0]) < 30
    plain.new_drafter = lambda: Scripted(oracle(PROMPT, tokens))
    assert run(plain, PROMPT, True, max_tokens=30, stop=[stop]) == want
    for n in (1, 5, 17):                               # max_tokens inside a draft
        plain.new_drafter = lambda: Scripted(oracle(PROMPT, tokens))
        assert run(plain, PROMPT, True, max_tokens=n) == run(plain, PROMPT, False, max_tokens=n)


def test_logprobs_are_those_of_plain_decoding(tiny_int8):
    engine = engine_for(tiny_int8, "litert")
    tokens = run(engine, PROMPT, False, max_tokens=20)[0]
    got = {}
    for speculate in (False, True):
        engine.new_drafter = lambda: Scripted(oracle(PROMPT, tokens[:7] + [1, 2, 3] + tokens[10:]))
        engine.reset()
        events = list(engine.generate(PROMPT, GenerationParams(max_tokens=20, sampling=GREEDY, logprobs=2,
                                                               speculate=speculate)))
        got[speculate] = [(s.token_id, s.logprob, [t.token_id for t in s.top])
                          for e in events for s in (e.logprobs or [])]
    assert len(got[False]) == 20 and got[True] == got[False]


# --- KV rollback ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "litert"])
def test_rolled_back_kv_equals_a_run_that_never_drafted(tiny_bundle, tiny_int8, backend):
    bundle = tiny_int8 if backend == "litert" else tiny_bundle
    plain, spec = engine_for(bundle, backend), engine_for(bundle, backend)
    want = run(plain, PROMPT, False, max_tokens=25)
    ref = list(PROMPT) + want[0]
    # every draft: the right next token, then two wrong ones (partly accepted, rows rolled back)
    drafter = Scripted(lambda h, k: [ref[len(h)] if len(h) < len(ref) else 0, 250, 251])
    spec.new_drafter = lambda: drafter
    assert run(spec, PROMPT, True, max_tokens=25) == want and drafter.drafted > 0
    a, b = plain.slots[0].cache, spec.slots[0].cache
    assert a.tokens == b.tokens == ref[:-1]
    assert a.canonical == b.canonical

    def same(upto):                                # rows < upto as the plain run's, the rest zero
        if backend == "litert":                    # int8 rows are exact: identical arrays
            assert np.array_equal(a.k[:, :, :upto], b.k[:, :, :upto])
            assert np.array_equal(a.v[:, :, :upto], b.v[:, :, :upto])
        else:                                      # BLAS may round a stacked row differently
            np.testing.assert_allclose(a.k[:, :, :upto], b.k[:, :, :upto], rtol=0, atol=1e-5)
            np.testing.assert_allclose(a.v[:, :, :upto], b.v[:, :, :upto], rtol=0, atol=1e-5)
        assert not b.k[:, :, upto:].any() and not b.v[:, :, upto:].any()   # no rejected row left

    same(a.length)
    assert not a.k[:, :, a.length:].any()
    spec.reset()                                   # again, step by step: after every verify step
    b.k[...] = 0
    b.v[...] = 0
    seq = spec.start(PROMPT, GenerationParams(max_tokens=25, sampling=GREEDY, speculate=True))
    checked = 0
    while not seq.done:
        spec.step([seq])
        if not seq.done and seq.decoding:
            assert b.tokens == ref[:b.length]
            same(b.length)
            checked += 1
    assert checked > 3


def test_a_rejected_draft_never_reaches_prefix_reuse(tiny_int8):
    engine = engine_for(tiny_int8, "litert")
    want = run(engine, PROMPT, False, max_tokens=25)
    engine.new_drafter = lambda: Scripted(lambda h, k: [7] * k)
    run(engine, PROMPT, True, max_tokens=25)
    cache = engine.slots[0].cache
    assert cache.tokens == list(PROMPT) + want[0][:-1]    # only what was taken is recorded
    follow = list(PROMPT) + want[0] + [9, 9]
    assert engine.model.reusable(follow, cache) <= cache.canonical


# --- sampling: the same distribution ---------------------------------------------------------
def chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square homogeneity test; categories under 10 expected draws pooled."""
    import torch
    keys = sorted(set(a) | set(b), key=lambda t: -(a[t] + b[t]))
    na, nb = sum(a.values()), sum(b.values())
    rows, rest = [], [0, 0]
    for t in keys:
        if (a[t] + b[t]) * min(na, nb) / (na + nb) >= 10:
            rows.append([a[t], b[t]])
        else:
            rest[0] += a[t]
            rest[1] += b[t]
    if sum(rest):
        rows.append(rest)
    obs = np.array(rows, dtype=np.float64)
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_sampled_tokens_follow_the_same_distribution_with_speculation(tiny_bundle):
    engine = engine_for(tiny_bundle, "numpy")
    prompt = [5, 17, 33]
    hot = SamplingParams(temperature=0.7, top_k=4, repetition_penalty=1.3)   # few, close candidates
    engine.reset()
    greedy = [e.token_id for e in engine.generate(prompt, GenerationParams(max_tokens=3, sampling=GREEDY))]
    # after the first token (from the prompt's pass): draft the greedy 2nd and 3rd tokens, both
    # likely, neither certain, so drafts get accepted, partly accepted and rejected
    engine.new_drafter = lambda: Scripted(lambda h, k: greedy[1:3][:k] if len(h) == len(prompt) + 1 else [])
    draws = 2500
    seen = {False: Counter(), True: Counter()}
    for speculate in (False, True):
        for i in range(draws):
            seed = i + (draws if speculate else 0)            # independent draws, not replays
            engine.reset()
            events = list(engine.generate(prompt, GenerationParams(
                max_tokens=3, sampling=dataclasses.replace(hot, seed=seed), speculate=speculate)))
            seen[speculate][tuple(e.token_id for e in events if e.token_id is not None)] += 1
    seconds = Counter(t[1] for t in seen[True].elements())
    assert 0.05 < seconds[greedy[1]] / draws < 0.95            # drafts got both accepted and rejected
    assert len(seen[False]) > 10                           # a spread-out distribution, not one answer
    assert chi_square_p(seen[False], seen[True]) > 1e-3
    for i in range(3):                                     # and one seed gives one answer, drafted or not
        p = GenerationParams(max_tokens=6, sampling=SamplingParams(temperature=1.0, seed=i))
        outs = []
        for speculate in (False, True):
            engine.reset()
            outs.append([e.token_id for e in engine.generate(prompt, GenerationParams(
                max_tokens=p.max_tokens, sampling=p.sampling, speculate=speculate))])
        assert outs[0] == outs[1]


def test_chi_square_helper_tells_different_distributions_apart():
    rng = np.random.default_rng(0)
    a = Counter(rng.choice(6, 2500, p=[.3, .2, .2, .1, .1, .1]).tolist())
    b = Counter(rng.choice(6, 2500, p=[.2, .2, .2, .2, .1, .1]).tolist())
    c = Counter(rng.choice(6, 2500, p=[.3, .2, .2, .1, .1, .1]).tolist())
    assert chi_square_p(a, b) < 1e-6 and chi_square_p(a, c) > 1e-3


# --- many sequences ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "litert"])
def test_concurrent_speculating_sequences_equal_one_at_a_time(tiny_bundle, tiny_int8, backend):
    bundle = tiny_int8 if backend == "litert" else tiny_bundle
    engine = engine_for(bundle, backend, parallel=3)
    engine.spec_max_batch = 3
    prompts = [PROMPT, PROMPT[3:] + PROMPT[:3], [7, 7, 100, 7, 7, 100, 7]]
    params = [GenerationParams(max_tokens=n, sampling=GREEDY, speculate=True) for n in (20, 30, 25)]
    want = [run(engine, p, True, max_tokens=q.max_tokens)[0] for p, q in zip(prompts, params)]
    assert want == [run(engine, p, False, max_tokens=q.max_tokens)[0] for p, q in zip(prompts, params)]
    engine.reset()
    scheduler = start_scheduler(engine, max_queue=0)
    widths = []
    real_step = engine.step
    engine.step = lambda seqs: widths.append(len(seqs)) or real_step(seqs)
    drafted = []
    real_verify = engine._verify
    engine._verify = lambda seq, rows, d: drafted.append(len(d)) or real_verify(seq, rows, d)
    jobs = [scheduler.submit(p, q) for p, q in zip(prompts, params)]
    got = [[e.token_id for e in j.events() if e.token_id is not None] for j in jobs]
    assert got == want
    assert max(widths) == 3 and drafted                     # they ran together, and drafted


def test_n_choices_with_speculation_fork_and_decode_together(tiny_int8):
    engine = engine_for(tiny_int8, "litert", parallel=2)
    engine.spec_max_batch = 2
    want = run(engine, PROMPT, False, max_tokens=15)[0]
    engine.reset()
    scheduler = start_scheduler(engine, max_queue=0)
    jobs = scheduler.submit_choices(PROMPT, [GenerationParams(max_tokens=15, sampling=GREEDY, speculate=True)] * 2)
    assert [[e.token_id for e in j.events() if e.token_id is not None] for j in jobs] == [want, want]


# --- the switch -------------------------------------------------------------------------------
def test_the_speculate_switch_has_one_default_and_checks_its_value():
    assert RequestDefaults().build().speculate is RequestDefaults.speculate
    assert RequestDefaults().build(speculate=False).speculate is False
    assert RequestDefaults().with_overrides(speculate=False).build().speculate is False
    with pytest.raises(ValueError, match="speculate"):
        RequestDefaults().build(speculate="yes")


def test_cli_speculate_flag_reaches_the_request(tiny_bundle):
    import argparse
    from edge.launch.args import add_sampling_args, request_defaults
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    assert request_defaults(p.parse_args(["--speculate", "off"])).speculate is False
    assert request_defaults(p.parse_args(["--speculate", "on"])).speculate is True
    assert request_defaults(p.parse_args([])).speculate is RequestDefaults.speculate


def test_bench_speculate_reports_acceptance_and_identical_output(tiny_bundle, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"kind": "copy", "messages": [{"role": "user", "content": "w5 w6 w7 w8 " * 6}]},
                                   {"kind": "novel", "messages": [{"role": "user", "content": "w9 w10"}]}]))
    out = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "-m", str(tiny_bundle), "--speculate",
                          "--prompts", str(prompts), "-n", "24", "-r", "1", "-t", "1", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["kind"] for r in rows] == ["copy", "novel"]
    for r in rows:
        assert r["identical"] and r["plain_tokens_per_s"] > 0 and r["spec_tokens_per_s"] > 0
        assert 0 <= r["accepted"] <= r["drafted"] and r["tokens_per_step"] >= 1
    table = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "-m", str(tiny_bundle), "--verify-curve",
                            "2", "-p", "16", "-r", "1", "-t", "1"], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "| 2 | 3 |" in table.stdout
