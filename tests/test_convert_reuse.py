"""The calibration tokens' embedding rows (convert/reuse.py): the table's rows, made once."""
from __future__ import annotations

import numpy as np

from convert.reuse import CalibrationRows


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
