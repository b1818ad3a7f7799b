"""Several sequences in one forward pass (stacked rows, attention per sequence) give each
sequence the logits it gets alone."""
from __future__ import annotations

import numpy as np
import pytest

from edge.model.backends import load_backend
from edge.model.bundle import Bundle

PROMPTS = [[5, 17, 33, 2, 9, 40, 41], [7, 7, 100], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def decode_alone(model, prompt, steps):
    cache = model.new_cache()
    logits = [model.prefill(prompt, cache)]
    for _ in range(steps):
        logits.append(model.forward([int(np.argmax(logits[-1]))], cache))
    return np.stack(logits), cache


def decode_batched(model, prompts, steps):
    caches = [model.new_cache() for _ in prompts]
    out = [[model.prefill(p, c)] for p, c in zip(prompts, caches)]
    for _ in range(steps):
        step = model.forward_batch([([int(np.argmax(o[-1]))], c) for o, c in zip(out, caches)])
        for o, lg in zip(out, step):
            o.append(lg)
    return [np.stack(o) for o in out], caches


@pytest.mark.parametrize("backend", ["numpy", "litert"])
def test_batched_decode_equals_decoding_alone(tiny_bundle, backend):
    model = load_backend(Bundle.open(tiny_bundle), backend, 64, 2)
    batched, caches = decode_batched(model, PROMPTS, 6)
    for prompt, got, cache in zip(PROMPTS, batched, caches):
        want, alone = decode_alone(model, prompt, 6)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        assert cache.tokens == alone.tokens
        n = cache.length
        np.testing.assert_allclose(cache.k[:, :, :n], alone.k[:, :, :n], atol=1e-5)


def test_mixed_rows_prefill_chunk_and_decode_in_one_pass(tiny_bundle):
    """A prompt chunk of one sequence and a decode row of another share a pass."""
    model = load_backend(Bundle.open(tiny_bundle), "numpy", 64, 2)
    a, b = model.new_cache(), model.new_cache()
    model.prefill(PROMPTS[0], a)
    la, lb = model.forward_batch([([3], a), (PROMPTS[2], b)], all_logits=True)
    assert la.shape[0] == 1 and lb.shape[0] == len(PROMPTS[2])
    a2, b2 = model.new_cache(), model.new_cache()
    model.prefill(PROMPTS[0], a2)
    np.testing.assert_allclose(la[0], model.forward([3], a2), atol=1e-5)
    np.testing.assert_allclose(lb, model.forward(PROMPTS[2], b2, all_logits=True), atol=1e-5)


def test_forward_batch_refuses_a_shared_cache_or_an_overflow(tiny_bundle):
    model = load_backend(Bundle.open(tiny_bundle), "numpy", 16, 1)
    c = model.new_cache()
    with pytest.raises(ValueError, match="own cache"):
        model.forward_batch([([1], c), ([2], c)])
    d = model.new_cache()
    with pytest.raises(ValueError, match="exceed the context"):
        model.forward_batch([([1], c), (list(range(17)), d)])
    assert c.length == 0 and d.length == 0          # nothing ran, nothing recorded


def test_int8_rows_are_batch_invariant_bit_for_bit(tiny_int8):
    """XNNPACK quantizes each activation row on its own and accumulates in integers, so a
    row's logits do not depend on the rows beside it (measured also on SmolLM2 int8: 0.0)."""
    model = load_backend(Bundle.open(tiny_int8), "litert", 64, 2)
    batched, _ = decode_batched(model, PROMPTS, 5)
    for prompt, got in zip(PROMPTS, batched):
        want, _ = decode_alone(model, prompt, 5)
        assert np.array_equal(got, want)
