"""The lm_head's format (convert/llama_graph.head_scheme / parse_head): one matrix in any
scheme, or a split whose first rows stay int8, as two FCs whose logits are concatenated."""
from __future__ import annotations

import numpy as np
import pytest

from convert.llama_graph import build_llama_graph, head_scheme, parse_head
from convert.quantize import quantize
from tests.test_tflite_graph import _assert_hybrid_fc, _random_weights, _runner, _small_config


@pytest.mark.parametrize("spec", ["int4", "int4-b32", "int4/int8:40", "int4-b32/int8:32"])
def test_head_formats_compute_their_quantized_rows(tmp_path, spec):
    rng = np.random.default_rng(4)
    cfg = _small_config(True)
    w = _random_weights(cfg, rng)
    r = _runner(tmp_path, build_llama_graph(w, cfg, "int4", head=spec))
    assert r.delegated
    scheme, rows = parse_head(spec)
    head = w["embed"]
    parts = [quantize(head[:rows], "int8"), quantize(head[rows:], scheme)] if rows else [quantize(head, scheme)]
    h = rng.standard_normal((3, cfg.hidden_size)).astype(np.float32)
    logits = r.run("lm_head", h=h)["logits"]
    assert logits.shape == (3, cfg.vocab_size)
    lo = 0
    for qw in parts:                                   # each block of rows is its own hybrid FC
        _assert_hybrid_fc(logits[:, lo:lo + qw.shape[0]], h, qw)
        lo += qw.shape[0]


def test_head_spec_parsing():
    assert parse_head("int4/int8:8192") == ("int4", 8192) and parse_head("int8") == ("int8", 0)
    for bad in ("int3", "int4/int4:8", "int4/int8:", "int4/int8:0"):
        with pytest.raises(ValueError):
            parse_head(bad)
    for quant in ("int8", "int4", "int4-b32"):
        parse_head(head_scheme(quant))                # every default is a valid spec
