from __future__ import annotations

import numpy as np
import pytest

from edge.engine.sampler import Sampler, SamplingParams

V = 128256  # Llama 3 vocabulary


def draws(params: SamplingParams, logits, n: int, history=()) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.sample(logits, history) for _ in range(n)])


def logits_for(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


@pytest.fixture(scope="module")
def big_logits() -> np.ndarray:
    return (np.random.default_rng(1).standard_normal(V) * 3).astype(np.float32)


def test_greedy_is_argmax(big_logits):
    rng = np.random.default_rng(2)
    sampler = Sampler(SamplingParams(temperature=0))
    for _ in range(5):
        logits = rng.standard_normal(V).astype(np.float32)
        assert sampler.sample(logits, []) == int(np.argmax(logits))


def test_top_k_1_is_greedy(big_logits):
    assert set(draws(SamplingParams(temperature=1.5, top_k=1, seed=3), big_logits, 20)) == {int(np.argmax(big_logits))}


def test_same_seed_same_tokens_other_seed_other_tokens(big_logits):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    a, b = draws(params, big_logits, 40), draws(params, big_logits, 40)
    c = draws(SamplingParams(temperature=1.0, top_p=0.95, seed=43), big_logits, 40)
    assert (a == b).all()
    assert (a != c).any()


def test_temperature_sampling_matches_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    t, n = 0.7, 20000
    expected = np.exp(logits / t) / np.exp(logits / t).sum() * n
    observed = np.bincount(draws(SamplingParams(temperature=t, seed=4), logits, n), minlength=logits.size)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_top_k_restricts_to_k_largest(big_logits):
    allowed = set(np.argsort(big_logits)[-5:].tolist())
    seen = set(draws(SamplingParams(temperature=5.0, top_k=5, seed=5), big_logits, 500).tolist())
    assert seen == allowed


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.full(1000, 0.05 / 996)
    probs[[7, 3, 11, 5]] = [0.5, 0.3, 0.1, 0.05]
    seen = set(draws(SamplingParams(temperature=1.0, top_p=0.75, seed=6), logits_for(probs), 2000).tolist())
    assert seen == {7, 3}


def test_top_p_with_a_wide_nucleus_matches_full_sort():
    # ~780 tokens hold 60 % of the mass: the sampler's sorted head must grow past 64 and 512.
    logits = np.random.default_rng(7).permutation(np.linspace(0.0, -150.0, V)).astype(np.float32)
    probs = np.exp(logits.astype(np.float64))
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), 0.6 * probs.sum())) + 1
    rank = np.empty(V, dtype=np.int64)
    rank[order] = np.arange(V)
    seen_ranks = rank[draws(SamplingParams(temperature=1.0, top_p=0.6, seed=8), logits, 400)]
    assert seen_ranks.max() < n
    assert seen_ranks.max() >= 512


def test_min_p_keeps_tokens_above_fraction_of_max():
    probs = np.full(1000, 0.05 / 996)
    probs[[9, 2, 4, 8]] = [0.5, 0.3, 0.12, 0.03]
    seen = set(draws(SamplingParams(temperature=1.0, min_p=0.2, seed=9), logits_for(probs), 2000).tolist())
    assert seen == {9, 2, 4}  # 0.03 < 0.2 * 0.5


def test_top_p_is_measured_before_min_p_as_in_hf():
    # min_p=0.45 keeps {0, 1, 2}; top_p=0.75 of the full distribution also needs {0, 1, 2}, but
    # measured after min_p (0.75 of the remaining 0.9) it would keep only {0, 1}.
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    seen = set(draws(SamplingParams(temperature=1.0, top_p=0.75, min_p=0.45, seed=10), logits, 1000).tolist())
    assert seen == {0, 1, 2}
    shorter = set(draws(SamplingParams(temperature=1.0, top_p=0.95, min_p=0.6, seed=11), logits, 1000).tolist())
    assert shorter == {0, 1}


def test_restricted_sampling_keeps_relative_probabilities():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    observed = np.bincount(draws(SamplingParams(temperature=1.0, top_k=3, seed=12), logits_for(probs), 9000), minlength=4)
    expected = np.array([0.4, 0.3, 0.2, 0.0]) / 0.9 * 9000
    assert observed[3] == 0
    chi2 = ((observed[:3] - expected[:3]) ** 2 / expected[:3]).sum()
    assert chi2 < 13.82  # 2 degrees of freedom, p = 0.001


def test_repetition_penalty_changes_argmax_like_hf():
    greedy = SamplingParams(temperature=0, repetition_penalty=1.25)
    positive = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    assert Sampler(greedy).sample(positive, []) == 0
    assert Sampler(greedy).sample(positive, [0]) == 1  # 2.0 / 1.25 = 1.6 < 1.9
    negative = np.array([-1.0, -1.1, -5.0], dtype=np.float32)
    assert Sampler(greedy).sample(negative, np.array([0, 0])) == 1  # -1.0 * 1.25 = -1.25 < -1.1


def test_frequency_penalty_counts_presence_penalty_does_not():
    logits = np.array([1.0, 0.5], dtype=np.float32)
    history = [0, 0, 0]
    assert Sampler(SamplingParams(temperature=0, frequency_penalty=0.2)).sample(logits, history) == 1  # 1 - 3*0.2
    assert Sampler(SamplingParams(temperature=0, presence_penalty=0.4)).sample(logits, history) == 0  # 1 - 0.4
    assert Sampler(SamplingParams(temperature=0, presence_penalty=0.6)).sample(logits, history) == 1  # 1 - 0.6


def test_callers_logits_are_not_modified(big_logits):
    logits = big_logits.copy()
    params = SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.3, frequency_penalty=1.0, presence_penalty=1.0, seed=0)
    Sampler(params).sample(logits, np.arange(1000))
    assert np.array_equal(logits, big_logits)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.01),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
    ("frequency_penalty", 2.5), ("presence_penalty", -3.0),
    ("seed", -1), ("seed", 1.5),
])
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("extreme", [
    dict(temperature=1e-50), dict(temperature=5e-324), dict(temperature=1e-50, top_p=1e-300),
    dict(temperature=1.0, repetition_penalty=1e-300), dict(temperature=0.0, repetition_penalty=1e-300),
    dict(temperature=2.0, repetition_penalty=1e300, top_k=40, top_p=0.5, min_p=1.0),
])
def test_extreme_values_the_schema_admits_never_give_nan_or_index_errors(extreme, big_logits):
    """temperature 1e-50 (0 in float32: NaN logits, an IndexError) and a tiny repeat_penalty
    (a logit of inf: NaN after the shift, then always the last id) still draw valid ids."""
    history = np.argsort(big_logits)[-3:]          # the 3 most likely ids were "seen"
    picks = draws(SamplingParams(seed=0, **extreme), big_logits, 20, history)
    assert ((picks >= 0) & (picks < V)).all()
    if extreme["temperature"] < 1e-40 or extreme.get("repetition_penalty") == 1e-300:
        # a vanishing temperature is greedy; a vanishing penalty makes a seen id win outright
        want = int(np.argmax(big_logits))
        assert (picks == want).all(), picks
    else:
        assert V - 1 not in picks


def test_nan_logits_are_never_chosen_and_all_nan_is_an_error(big_logits):
    logits = big_logits.copy()
    best = int(np.argmax(logits))
    logits[best] = np.nan
    assert Sampler(SamplingParams(temperature=0)).sample(logits) != best
    assert best not in draws(SamplingParams(temperature=1.0, seed=0), logits, 50)
    with pytest.raises(FloatingPointError):
        Sampler(SamplingParams(temperature=0.5)).sample(np.full(10, np.nan, np.float32))


def _general(params: SamplingParams, logits, history) -> int:
    """What the sampler's general path picks (float64, penalised, cleaned): the reference the
    greedy fast path must equal."""
    sampler = Sampler(params)
    sampler._greedy = lambda *a: None
    return sampler.sample(logits, history)


@pytest.mark.parametrize("penalties", [{}, {"repetition_penalty": 1.3}, {"repetition_penalty": 0.7},
                                       {"frequency_penalty": 0.8, "presence_penalty": -0.5}])
def test_greedy_fast_path_equals_general_path(big_logits, penalties):
    rng = np.random.default_rng(11)
    for trial in range(30):
        logits = (rng.standard_normal(V) * 2).astype(np.float32)
        top = np.argsort(logits)[-6:]
        history = list(rng.choice(top, 4)) + list(rng.integers(0, V, 20))
        if trial % 3 == 1:                            # ties: the lowest id must win, as np.argmax picks it
            logits[top[-3:]] = logits[top[-1]]
        if trial % 3 == 2:                            # a grammar's mask, history tokens included
            mask = rng.random(V) < 0.9
            mask[top[-1]] = True
            logits[mask] = -np.inf
        for params in (SamplingParams(temperature=0, **penalties), SamplingParams(temperature=0.9, top_k=1, **penalties)):
            fast = Sampler(params).sample(logits, history)
            assert fast == _general(params, logits, history)
    # exact ties between a penalised history token and another token (float64 comparison)
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    for values, hist, expected in (({3: 4.0, 9: 2.0}, [3], 3), ({1: 2.0, 3: 4.0}, [3], 1),
                                   ({3: 4.0, 9: 2.0}, [3, 9], 3), ({2: 1.0, 5: 2.0}, [5], 2)):
        logits = np.zeros(16, np.float32)
        logits[list(values)] = list(values.values())
        assert Sampler(params).sample(logits, hist) == _general(params, logits, hist) == expected


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_greedy_fast_path_leaves_broken_logits_to_the_general_path(bad):
    logits = np.linspace(-1, 1, 50).astype(np.float32)
    if bad == "nan":
        logits[[10, 45]] = np.nan
    elif bad == "posinf":
        logits[[7, 20]] = np.inf
    else:
        logits[:] = -np.inf
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.2)):
        for history in ([], [20, 45, 49]):
            sampler = Sampler(params)
            if bad == "all_neginf":
                with pytest.raises(FloatingPointError):
                    sampler.sample(logits, history)
            else:
                assert sampler.sample(logits, history) == _general(params, logits, history)


def test_sampling_leaves_the_callers_logits_alone(big_logits):
    for logits in (big_logits, big_logits.astype(np.float64)):
        before = logits.copy()
        for params in (SamplingParams(temperature=0.8, top_k=40, seed=1), SamplingParams(temperature=0.8, seed=1),
                       SamplingParams(temperature=0, repetition_penalty=1.2)):
            Sampler(params).sample(logits, [1, 2, 3])
            Sampler(params).sample(logits, [])
        assert np.array_equal(logits, before)
