"""The lm_head's format (convert/llama_graph.head_scheme): the default per --quant or a
`--head` override, and the graph computes exactly the quantized head's hybrid FC."""
from __future__ import annotations

import numpy as np
import pytest

from convert.llama_graph import build_llama_graph, head_scheme
from convert.quantize import quantize
from tests.test_tflite_graph import _assert_hybrid_fc, _random_weights, _runner, _small_config


@pytest.mark.parametrize("scheme", ["int4", "int4-b32", "int8"])
def test_head_formats_compute_their_quantized_rows(tmp_path, scheme):
    rng = np.random.default_rng(4)
    cfg = _small_config(True)
    w = _random_weights(cfg, rng)
    r = _runner(tmp_path, build_llama_graph(w, cfg, "int4", head=scheme))
    assert r.delegated
    h = rng.standard_normal((3, cfg.hidden_size)).astype(np.float32)
    logits = r.run("lm_head", h=h)["logits"]
    assert logits.shape == (3, cfg.vocab_size)
    _assert_hybrid_fc(logits, h, quantize(w["embed"], scheme))


def test_head_scheme_default_and_override():
    assert head_scheme("int8") == "int8" and head_scheme("int4") == "int4" and head_scheme("int4-b32") == "int8"
    assert head_scheme("int4", "int4") == "int4"
    assert head_scheme("int4", "int4-b32") == "int4-b32"
    for bad in ("int3", "int4/int8:8"):
        with pytest.raises(ValueError):
            head_scheme("int4", bad)
