"""Sampling as a chain (logits processors, then a sampler): seeded outputs are the ones the
single-class sampler gave, a grammar mask and penalties compose per sequence, and
`logit_bias` works."""
from __future__ import annotations

import numpy as np
import pytest

from edge.engine.sampler import SamplingParams

PROMPT = list(range(100, 110))
STEPS = 24

# (vocabulary size, masked by a grammar-like allowed set, SamplingParams fields)
CASES = [
    (49152, False, dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, seed=0)),
    (49152, True, dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, seed=0)),
    (4096, False, dict(temperature=1.0, seed=1)),
    (4096, True, dict(temperature=1.3, top_p=0.9, seed=2)),
    (4096, False, dict(temperature=0.5, top_k=5, seed=3)),
    (4096, True, dict(temperature=0.9, min_p=0.1, frequency_penalty=0.5, presence_penalty=0.3, seed=4)),
    (4096, False, dict(temperature=0.0, repetition_penalty=1.3)),
    (4096, True, dict(temperature=0.0, frequency_penalty=1.5)),
    (4096, False, dict(temperature=0.8, top_k=50, repetition_penalty=0.8, seed=5)),
    (4096, False, dict(temperature=2.0, top_p=0.5, min_p=0.01, presence_penalty=-1.0, seed=6)),
]


def steps(vocab: int, case: int):
    """Each step's logits (float32, a few peaks over noise, and strong prompt tokens for the
    penalties to act on) and the grammar's allowed tokens."""
    rng = np.random.default_rng(1000 + case)
    for _ in range(STEPS):
        logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
        logits[rng.integers(vocab, size=5)] += np.float32(6)
        logits[PROMPT[:3]] += rng.uniform(4, 9, size=3).astype(np.float32)
        allowed = rng.random(vocab) < 0.3
        allowed[PROMPT[:3]] = True
        yield logits, allowed


def masked(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """What constraint.Matcher.apply does with the grammar's allowed tokens."""
    return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


# Produced by `recorded_tokens` below run against the single-class Sampler of main at add1c849
# (before sampling became a chain), its edge/ unpacked on its own:
#   git archive add1c849 edge | tar -x -C /tmp/snap && cd /tmp/snap
#   PYTHONPATH=/tmp/snap:REPO python -c "import tests.test_sampling_chain as t; print(t.recorded_tokens())"
EXPECTED: list[list[int]] = [
    [43416, 10071, 17177, 36714, 30794, 3017, 36570, 9873, 48045, 14775, 27125, 47966, 25561, 44141, 102,
     31582, 36985, 102, 33821, 19062, 30596, 45601, 39144, 21972],
    [47202, 17492, 100, 35984, 24085, 43932, 35463, 44348, 43370, 2495, 15682, 3637, 45349, 46853, 2860, 20801,
     18532, 27717, 32491, 47687, 22196, 30098, 44264, 42579],
    [102, 3798, 102, 3948, 940, 1540, 3602, 102, 101, 102, 2920, 1901, 1866, 3632, 400, 1495, 102, 2432, 511,
     122, 3505, 3214, 1536, 3421],
    [785, 9, 1718, 101, 3774, 3865, 102, 101, 249, 1894, 4052, 101, 3006, 1585, 956, 8, 1307, 102, 100, 2007,
     4069, 101, 3133, 2955],
    [102, 349, 102, 1874, 2362, 101, 1682, 1361, 2379, 100, 102, 102, 102, 3823, 1918, 101, 102, 1380, 102,
     2255, 2985, 101, 101, 1907],
    [2410, 102, 3271, 100, 1319, 100, 101, 1685, 3588, 3889, 3964, 3400, 3230, 102, 102, 72, 101, 3368, 472,
     2518, 3154, 4038, 3364, 100],
    [1512, 1724, 1402, 405, 2233, 2341, 1019, 3098, 4078, 3092, 3461, 3678, 3694, 17, 102, 444, 3616, 946,
     3705, 2649, 571, 741, 3783, 1222],
    [1843, 553, 101, 100, 1916, 3022, 2438, 591, 102, 275, 4078, 100, 932, 1192, 2074, 2663, 3378, 3716, 1035,
     3762, 1370, 1780, 161, 2819],
    [101, 100, 1099, 30, 100, 102, 100, 2582, 836, 100, 2136, 750, 102, 102, 102, 101, 100, 215, 100, 2115,
     1469, 101, 100, 3077],
    [3955, 578, 975, 2829, 4056, 764, 1356, 493, 58, 102, 102, 2440, 102, 2861, 1462, 2569, 1982, 537, 1948,
     2489, 561, 102, 1174, 1267],
]


def recorded_tokens() -> list[list[int]]:
    """The single-class sampler's tokens for every case: grammar mask applied to the logits
    first, then `Sampler.sample(logits, history)`."""
    from edge.engine.sampler import Sampler
    out = []
    for case, (vocab, mask, fields) in enumerate(CASES):
        sampler, history, tokens = Sampler(SamplingParams(**fields)), list(PROMPT), []
        for logits, allowed in steps(vocab, case):
            token = sampler.sample(masked(logits, allowed) if mask else logits, history)
            tokens.append(token)
            history.append(token)
        out.append(tokens)
    return out


class Mask:
    """A grammar's matcher as the chain sees it (`apply`), over a fixed allowed set per step."""

    def __init__(self):
        self.allowed = None

    def apply(self, logits):
        return masked(logits, self.allowed)


def test_seeded_outputs_are_the_single_class_samplers():
    assert recorded_tokens() == EXPECTED


def test_the_grammar_mask_as_the_chains_first_processor_gives_the_same_tokens():
    from edge.engine.sampler import Sampler, make_logits_processors, make_sampler
    for case, (vocab, mask, fields) in enumerate(CASES):
        params, matcher = SamplingParams(**fields), Mask() if mask else None
        sampler, history, tokens = Sampler(params, matcher), list(PROMPT), []
        processors, pick = make_logits_processors(params, matcher), make_sampler(params)   # mlx-lm's way
        by_hand = []
        for logits, allowed in steps(vocab, case):
            if matcher is not None:
                matcher.allowed = allowed
            tokens.append(sampler.sample(logits, history))
            processed = logits
            for process in processors:
                processed = process(processed, np.asarray(history))
            by_hand.append(pick(processed))
            history.append(tokens[-1])
        assert tokens == EXPECTED[case], case
        assert by_hand == EXPECTED[case], case


def test_logit_bias_moves_bans_and_never_unmasks():
    from edge.engine.sampler import Sampler
    logits = np.linspace(0, 1, 50).astype(np.float32)          # 49 is the argmax
    greedy = dict(temperature=0)
    assert Sampler(SamplingParams(**greedy)).sample(logits) == 49
    assert Sampler(SamplingParams(**greedy, logit_bias={"7": 5})).sample(logits) == 7
    assert Sampler(SamplingParams(**greedy, logit_bias={49: -100})).sample(logits) == 48
    banned = {str(t): -100 for t in range(49)}
    draws = {Sampler(SamplingParams(temperature=1.0, seed=s, logit_bias=banned)).sample(logits) for s in range(20)}
    assert draws == {49}
    matcher = Mask()
    matcher.allowed = np.arange(50) >= 40
    assert Sampler(SamplingParams(**greedy, logit_bias={3: 100}), matcher).sample(logits) == 49
    assert Sampler(SamplingParams(**greedy, repetition_penalty=2.0, logit_bias={48: 0.01}), matcher
                   ).sample(logits, [49]) == 48       # penalties first, then the bias


@pytest.mark.parametrize("bias, word", [({"x": 1}, "keys"), ({"-1": 1}, "keys"), ({"3": 101}, "values"),
                                        ({"3": float("nan")}, "values"), ([1, 2], "object")])
def test_logit_bias_is_checked_naming_the_field(bias, word):
    with pytest.raises(ValueError, match=f"logit_bias.*{word}|logit_bias must be an {word}"):
        SamplingParams(logit_bias=bias)


def test_logit_bias_on_the_openai_api(tiny_bundle):
    """The OpenAI client's logit_bias steers the reply (+100 on one token: every token is it,
    as the engine alone gives it); a token outside the vocabulary is a 400 naming the field."""
    import openai

    from edge.engine.engine import GenerationParams
    from tests.http_server import endless_engine, ready_state, running
    engine = endless_engine(tiny_bundle, 64)
    ids = engine.encode_text("w1 w2")
    plain = [ev.token_id for ev in engine.generate(ids, GenerationParams(6, sampling=SamplingParams(temperature=0)))]
    forced = next(t for t in range(5, engine.config.vocab_size) if t not in plain)
    params = GenerationParams(6, sampling=SamplingParams(temperature=0, logit_bias={forced: 100}))
    events = list(engine.generate(ids, params))
    assert [ev.token_id for ev in events if ev.token_id is not None] == [forced] * 6
    with running(ready_state(engine)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        ask = dict(model="tiny", prompt="w1 w2", max_tokens=6, temperature=0)
        biased = client.completions.create(**ask, logit_bias={str(forced): 100})
        assert biased.choices[0].text == "".join(ev.text for ev in events)
        assert biased.choices[0].text != client.completions.create(**ask).choices[0].text
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**ask, logit_bias={str(engine.config.vocab_size): 1})
        assert "logit_bias" in e.value.message
