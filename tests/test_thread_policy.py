"""The --threads auto policy (edge/model/thread_policy.py), driven by injected step times."""
from __future__ import annotations

import pytest

from edge.model.thread_policy import ThreadPolicy, parse_threads, rows_key, thread_choices


def run(policy: ThreadPolicy, key, cost: dict[int, float], steps: int) -> list[int]:
    """`steps` units whose cost per unit on each thread count is `cost`; the choices made."""
    chosen = []
    for _ in range(steps):
        n = policy.choose(key)
        policy.record(key, n, cost[n])
        chosen.append(n)
    return chosen


def best(policy: ThreadPolicy, key) -> int:
    return policy.summary()[key]["best"]


def test_warm_up_measures_each_candidate_then_keeps_the_faster():
    p = ThreadPolicy((1, 2), warmup=2)
    first = run(p, "decode", {1: 0.010, 2: 0.006}, 4)
    assert sorted(first) == [1, 1, 2, 2]
    assert first[:2] == [1, 2]                                  # in turn, not all of one first
    assert run(p, "decode", {1: 0.010, 2: 0.006}, 7) == [2] * 7  # before the first probe
    assert p.summary()["decode"]["best"] == 2


def test_quiet_machine_probes_rarely_and_keeps_all_cores():
    p = ThreadPolicy((1, 2), min_interval=8, max_interval=128)
    chosen = run(p, 1, {1: 0.010, 2: 0.006}, 1000)
    probes = chosen[4:].count(1)
    assert best(p, 1) == 2
    assert 1 <= probes <= 20                                    # the interval grew to 128
    assert probes / len(chosen) < 0.03


def test_contention_switches_to_one_thread_and_back():
    p = ThreadPolicy((1, 2), min_interval=8, max_interval=64)
    quiet, busy = {1: 0.010, 2: 0.006}, {1: 0.020, 2: 0.200}
    run(p, 1, quiet, 300)
    assert best(p, 1) == 2
    chosen = run(p, 1, busy, 1000)
    # the first slow step is a surprise: the next step probes one thread and it wins at once
    assert chosen[:2] == [2, 1]
    assert chosen[2:].count(2) <= 10                            # probes of 2 threads: rare
    # a probe of the 10x slower count costs about probe_budget (5 %) of the time, no more
    assert sum(busy[n] for n in chosen[2:]) <= 1.08 * len(chosen[2:]) * busy[1]
    back = run(p, 1, quiet, 400)                               # quiet again: back within a probe
    assert best(p, 1) == 2 and back[-100:].count(1) <= 2


def test_keys_are_timed_apart():
    p = ThreadPolicy((1, 4), warmup=1)
    run(p, rows_key(1), {1: 0.010, 4: 0.020}, 10)     # decode: one thread faster
    run(p, rows_key(64), {1: 0.004, 4: 0.001}, 10)    # prefill rows: four faster
    best = {k: v["best"] for k, v in p.summary().items()}
    assert best == {rows_key(1): 1, rows_key(64): 4}


def test_costs_are_per_unit():
    p = ThreadPolicy((1, 2), warmup=1)
    p.record("prefill", 1, 0.64, units=64)
    p.record("prefill", 2, 0.05, units=5)             # a short tail chunk: more per row
    assert p.cost("prefill", 1) == pytest.approx(0.01)
    assert p.cost("prefill", 2) == pytest.approx(0.01)


def test_one_candidate_is_fixed():
    p = ThreadPolicy((3,))
    assert run(p, 1, {3: 1.0}, 5) == [3] * 5


def test_timed_records_the_time():
    p = ThreadPolicy((1, 2), warmup=1)
    with p.timed("k") as n:
        assert n == 1
    assert p.cost("k", 1) is not None and p.cost("k", 2) is None


def test_rows_key_buckets():
    assert [rows_key(r) for r in (1, 2, 3, 4, 5, 8, 9, 64)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_thread_choices_and_parsing():
    assert thread_choices("auto", cores=4) == (1, 4)
    assert thread_choices(None, cores=2) == (1, 2)
    assert thread_choices("auto", cores=1) == (1,)
    assert thread_choices(3, cores=8) == (3,)
    assert thread_choices("2", cores=8) == (2,)
    for bad in ("0", "-1", "many", 0):
        with pytest.raises(ValueError, match="positive number or 'auto'"):
            parse_threads(bad)


def test_auto_model_runs_both_thread_counts_with_the_same_logits(tiny_bundle, tmp_path):
    """--threads auto loads the graph on 1 and 2 threads over one weight cache; whichever runs a
    pass, the logits are those of a fixed thread count (XNNPACK's kernels do not depend on it)."""
    import numpy as np

    from edge.model.bundle import Bundle
    from edge.model.litert_model import LiteRTModel
    bundle = Bundle.open(tiny_bundle)
    auto = LiteRTModel(bundle, 128, threads="auto", weight_cache=tmp_path / "cache")
    fixed = LiteRTModel(bundle, 128, threads=2, weight_cache=tmp_path / "cache")
    assert auto.policy is not None and fixed.policy is None
    assert sorted(auto.graphs) == [1, 2]
    assert len(list((tmp_path / "cache").glob("*.xnnpack"))) == 1     # one cache for all loads
    ids = list(range(3, 40))
    ca, cf = auto.new_cache(), fixed.new_cache()
    assert np.array_equal(auto.prefill(ids, ca), fixed.prefill(ids, cf))
    used = set()
    for t in range(12):
        key = rows_key(1)
        used.add(auto.policy.choose(key))     # what the next step will run on
        assert np.array_equal(auto.forward([t + 3], ca), fixed.forward([t + 3], cf))
    assert used == {1, 2}                      # the warm-up ran both
    costs = auto.policy.summary()[rows_key(1)]["cost"]
    assert costs[1] > 0 and costs[2] > 0
