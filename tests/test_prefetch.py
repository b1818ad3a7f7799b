"""convert/prefetch.py: GPTQ's calibration pass runs on a thread of its own, ahead of the
rounding, and hands over exactly what the sequential pass yields."""
import threading

import numpy as np
import pytest

from convert.prefetch import Prefetch


def test_items_arrive_in_order_and_end():
    assert list(Prefetch(iter(range(50)), ahead=2)) == list(range(50))


def test_an_error_in_the_source_is_raised_to_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise RuntimeError("bad tensor")

    it = Prefetch(source(), ahead=1)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="bad tensor"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_the_source_runs_at_most_ahead_items_in_front_of_the_consumer():
    made, fourth = [], threading.Event()

    def source():
        for i in range(10):
            made.append(i)
            if i == 3:
                fourth.set()
            yield i

    it = Prefetch(source(), ahead=2)
    assert next(it) == 0
    # 0 taken, 1 and 2 queued, 3 made: the thread now waits for room and makes nothing more.
    assert fourth.wait(30)
    assert made == [0, 1, 2, 3]
    assert list(it) == list(range(1, 10))


def test_close_stops_the_thread_and_runs_the_sources_finally():
    closed = threading.Event()

    def source():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = Prefetch(source(), ahead=1)
    assert next(it) == 0
    it.close()
    assert closed.is_set() and not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_gptq_hessians_from_the_prefetched_pass_equal_the_sequential_ones():
    """The pass's inputs, taken through Hessians (prefetched), are the arrays the plain
    generator yields, bit for bit."""
    from convert.calibration import GROUPS, matmul_inputs
    from convert.gptq import Hessians
    from edge.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=10000.0,
                      rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    shapes = {"embed": (64, 32), "final_norm": (32,)}
    for i in range(3):
        shapes.update({f"layers.{i}.wq": (32, 32), f"layers.{i}.wk": (16, 32), f"layers.{i}.wv": (16, 32),
                       f"layers.{i}.wo": (32, 32), f"layers.{i}.w_gate": (48, 32), f"layers.{i}.w_up": (48, 32),
                       f"layers.{i}.w_down": (32, 48), f"layers.{i}.attn_norm": (32,), f"layers.{i}.ffn_norm": (32,)})
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    segments = [rng.integers(0, 64, 20), rng.integers(0, 64, 13)]
    expected = dict(matmul_inputs(weights.__getitem__, cfg, segments))
    with Hessians.collect(weights.__getitem__, cfg, segments) as h:
        for i in range(3):
            for g in GROUPS:
                assert np.array_equal(h.inputs(f"layers.{i}.{g}"), expected[f"layers.{i}.{g}"])
        assert np.array_equal(h.inputs("head"), expected["head"])
