"""Each transformed tensor made once per pass (convert/reuse.py), the same arrays readers got."""
from __future__ import annotations

import numpy as np

from convert.reuse import CalibrationRows, Reuse


def counting(calls: list):
    def get(name: str) -> np.ndarray:
        calls.append(name)
        return np.full((2, 2), float(len(calls)), np.float32)
    return get


def test_a_tensor_is_made_once_for_two_readers_then_let_go():
    calls = []
    r = Reuse(counting(calls), reads=2)
    a = r("layers.0.wq")
    assert r("layers.0.wq") is a                  # the second reader gets the same array
    assert r("layers.0.wq") is not a              # a third read makes it again: nothing is held
    assert calls == ["layers.0.wq", "layers.0.wq"]


def test_only_the_layers_near_the_newest_are_kept():
    calls = []
    r = Reuse(counting(calls), reads=2, window=1)
    r("layers.0.w_down")                          # read once (e.g. no second reader)
    r("layers.1.wq")
    r("layers.2.wq")                              # layer 0 is two away: dropped
    r("layers.0.w_down")
    assert calls.count("layers.0.w_down") == 2
    r("layers.1.wq")                              # layer 1 is within the window: kept
    assert calls.count("layers.1.wq") == 1


def test_names_outside_layers_are_not_kept():
    calls = []
    r = Reuse(counting(calls))
    r("lm_head"), r("lm_head")
    assert calls == ["lm_head", "lm_head"]


def test_calibration_rows_are_the_table_rows():
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    made = []
    get = lambda n: made.append(n) or table.copy()      # noqa: E731
    segments = [np.array([3, 7, 7, 1]), np.array([49, 3])]
    rows = CalibrationRows(get, segments)
    for s in segments:
        assert np.array_equal(rows("embed")[s], table[s])
    assert np.array_equal(rows.on(lambda n: None)("embed")[segments[1]], table[segments[1]])
    assert made == ["embed"]                            # the table was made once
