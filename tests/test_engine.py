"""The engine over a converted bundle: generation semantics, prefix reuse, limits, integrity."""
import threading

import numpy as np
import pytest

from edge.model.bundle import Bundle, BundleError
from edge.engine.engine import Engine, GenerationParams
from edge.model.kv_cache import ContextFull
from edge.engine.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, seed=3)   # the tiny random model repeats itself when greedy


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle):
    return tiny_bundle


@pytest.fixture
def engine(bundle_dir):
    return Engine(Bundle.open(bundle_dir), max_ctx=96)


def run(engine, ids, **kw):
    events = list(engine.generate(ids, GenerationParams(**{"sampling": GREEDY, **kw})))
    return events, [e.token_id for e in events if e.token_id is not None], events[-1]


def reference_greedy(engine, ids, n):
    """Greedy tokens from the model alone, with a fresh cache (no engine logic)."""
    cache = engine.model.new_cache()
    logits, out = engine.model.forward(ids, cache), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = engine.model.forward([out[-1]], cache)
    return out


PROMPT = [1, 17, 33, 5, 99, 200, 7]


def test_greedy_matches_model_and_length_finish(engine):
    engine.eos_ids = frozenset()
    _, toks, last = run(engine, PROMPT, max_tokens=12)
    assert toks == reference_greedy(engine, PROMPT, 12)
    assert last.finish_reason == "length" and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == len(PROMPT)


def test_eos_stops_with_stop_reason(engine):
    engine.eos_ids = frozenset()
    _, first, _ = run(engine, PROMPT, max_tokens=12, sampling=SAMPLED)
    k = next(i for i in range(1, 12) if first[i] not in first[:i])   # a token not seen before
    engine.eos_ids = frozenset({first[k]})
    _, toks, last = run(engine, PROMPT, max_tokens=20, sampling=SAMPLED)
    assert toks == first[:k] and last.finish_reason == "stop"


def test_stop_string_cuts_text(engine):
    engine.eos_ids = frozenset()
    full = "".join(e.text for e in run(engine, PROMPT, max_tokens=8, sampling=SAMPLED)[0])
    word = full.split()[3]
    assert word not in full.split()[:3]
    events, _, last = run(engine, PROMPT, max_tokens=8, stop=[word], sampling=SAMPLED)
    text = "".join(e.text for e in events)
    assert last.finish_reason == "stop" and word not in text and full.startswith(text)


def test_prefix_reuse_same_tokens(engine):
    engine.eos_ids = frozenset()
    _, first, _ = run(engine, PROMPT, max_tokens=6)
    follow = PROMPT + first + [42, 43]
    _, again, last = run(engine, follow, max_tokens=6)
    assert last.usage.cached_tokens >= len(PROMPT)
    assert again == reference_greedy(engine, follow, 6)


def test_prompt_longer_than_context_refused(engine):
    with pytest.raises(ContextFull, match="100 tokens"):
        list(engine.generate([5] * 100, GenerationParams()))


def test_generation_stops_at_full_context(engine):
    engine.eos_ids = frozenset()
    _, toks, last = run(engine, [5] * 90, max_tokens=50)
    assert last.finish_reason == "length" and len(toks) <= 6


def test_cancel(engine):
    engine.eos_ids = frozenset()
    cancel = threading.Event()
    got = 0
    for ev in engine.generate(PROMPT, GenerationParams(max_tokens=50, sampling=GREEDY), cancel):
        got += 1
        cancel.set()
    assert ev.finish_reason == "cancelled" and got <= 3


def test_seeded_sampling_reproducible(engine):
    engine.eos_ids = frozenset()
    p = dict(max_tokens=10, sampling=SamplingParams(temperature=1.0, seed=7))
    a = [e.token_id for e in engine.generate(PROMPT, GenerationParams(**p))]
    engine.reset()
    b = [e.token_id for e in engine.generate(PROMPT, GenerationParams(**p))]
    assert a == b


def test_bad_params_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationParams(max_tokens=-1)


def test_damaged_bundle_refused_by_hash(bundle_dir, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(bundle_dir, d)
    with open(d / "weights.bin", "r+b") as f:
        f.seek(20000)
        f.write(b"\x13\x37")
    with pytest.raises(BundleError, match="weights.bin.*sha256"):
        Bundle.open(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json.*missing"):
        Bundle.open(d)


def test_bundle_tensors_are_aligned_for_16k_pages(bundle_dir):
    b = Bundle.open(bundle_dir)
    assert all(t["offset"] % 16384 == 0 for t in b.manifest["tensors"].values())


def test_manifest_names_the_source_without_its_path(bundle_dir, tmp_path_factory):
    text = (bundle_dir / "manifest.json").read_text()
    source = Bundle.open(bundle_dir).manifest["source"]
    assert source.startswith("tiny-src") and "/" not in source          # conftest's checkpoint dir
    assert str(tmp_path_factory.getbasetemp()) not in text


def test_verified_stamp_skips_rehash_but_not_a_rewritten_file(tiny_bundle, tmp_path, monkeypatch):
    import shutil
    import edge.model.bundle as eb
    d = tmp_path / "copy"
    shutil.copytree(tiny_bundle, d)
    Bundle.open(d)                                  # hashes everything, writes the stamp
    hashed = []
    monkeypatch.setattr(eb, "sha256_of", lambda f: hashed.append(f.name) or "x")
    Bundle.open(d)
    assert hashed == []                             # nothing changed: nothing re-hashed
    data = (d / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").write_bytes(data[:-1] + b" ")   # same size, rewritten
    with pytest.raises(BundleError, match="tokenizer.json.*sha256"):
        Bundle.open(d)
    assert hashed == ["tokenizer.json"]
