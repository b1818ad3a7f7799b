"""GPTQ (convert/gptq.py): error-compensating rounding on the graph's own grid.

On a small random layer whose calibration inputs are correlated (as real activations are),
GPTQ's output error on those inputs must be below round-to-nearest's with the same scales,
and the weights it writes must be levels on the grid the graph decodes: integer levels in
range, the clip search's scales untouched, and a LiteRT FC over them computing exactly what
`QuantizedWeight.dequantize()` says. Its effect on a real model is measured in
test_quant_quality.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from convert.calibration import matmul_inputs
from convert.convert import convert, read_checkpoint, untie
from convert import gptq
from convert.gptq import Hessians, gptq_quantize, levels_range, prepare
from convert.quantize import quantize, runtime_scales
from edge.model.bundle import Bundle
from edge.model.backends import load_backend
from tests.test_tflite_graph import _assert_hybrid_fc, _fc_graph, _runner
from tests.tiny_llama import write_tiny_llama

SCHEMES = ["int8", "int4", "int4-b32"]


def _layer(seed: int, t=256, k=128, n=48):
    """Inputs [t, k] with a low-rank correlated part and two outlier channels, weights [n, k]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, 12)) @ rng.standard_normal((12, k)) + 0.3 * rng.standard_normal((t, k))
    x[:, [5, 77]] *= 8
    w = rng.standard_normal((n, k)) * 0.05
    return x.astype(np.float32), w.astype(np.float32)


def _out_err(x, w, qw) -> float:
    return float(np.square(x @ (qw.dequantize() - w).T).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptq_output_error_below_round_to_nearest(scheme, act_order):
    for seed in range(3):
        x, w = _layer(seed, t=512)
        calib, held_out = x[:256], x[256:]
        imp = np.mean(calib * calib, axis=0)
        rtn = quantize(w, scheme, imp)
        g = gptq_quantize(w, scheme, calib.T @ calib, imp, act_order=act_order)
        assert _out_err(calib, w, g) < 0.7 * _out_err(calib, w, rtn)
        assert _out_err(held_out, w, g) < _out_err(held_out, w, rtn)   # not just fitted to calib


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptq_levels_are_on_the_graph_grid(scheme):
    x, w = _layer(7)
    imp = np.mean(x * x, axis=0)
    rtn = quantize(w, scheme, imp)
    g = gptq_quantize(w, scheme, x.T @ x, imp)
    assert (g.scheme, g.shape, g.block_size, g.data.dtype, g.data.shape) == \
        (rtn.scheme, rtn.shape, rtn.block_size, rtn.data.dtype, rtn.data.shape)
    np.testing.assert_array_equal(g.scales, rtn.scales)      # GPTQ picks levels, not scales
    q = g.int_values()
    lo, hi = levels_range(scheme)
    assert q.min() >= lo and q.max() <= hi
    assert not np.array_equal(q, rtn.int_values())             # it did move levels
    s = runtime_scales(g)
    groups = np.arange(w.shape[1]) // (w.shape[1] // s.shape[1])
    np.testing.assert_array_equal(g.dequantize(), q.astype(np.float32) * s[:, groups])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_litert_fc_computes_the_gptq_weights(tmp_path, scheme):
    x, w = _layer(11)
    g = gptq_quantize(w, scheme, x.T @ x, np.mean(x * x, axis=0))
    runner = _runner(tmp_path, _fc_graph(g))
    assert runner.delegated
    xs = x[:5].copy()
    _assert_hybrid_fc(runner.run("fc", x=xs)["y"], xs, g)


def _textbook_gptq(w, s_cols, u, lo, hi):
    """GPTQ as the paper writes it, in float64: column by column, each one's rounding error
    spread over the columns not yet rounded through the upper factor u of H^-1."""
    w = w.astype(np.float64).copy()
    q = np.zeros(w.shape, np.int8)
    for j in range(w.shape[1]):
        q[:, j] = np.clip(np.rint(w[:, j] / s_cols[:, j]), lo, hi)
        e = (w[:, j] - q[:, j] * s_cols[:, j]) / u[j, j]
        w[:, j:] -= np.outer(e, u[j, j:])
    return q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_chunked_transposed_loop_matches_the_textbook_algorithm(monkeypatch, scheme, act_order):
    """The lazy-batch loop over transposed chunks of rows (ragged chunks of 7 rows here, and
    blocks of 16 columns) picks the levels of the plain column-by-column algorithm."""
    x, w = _layer(5, k=96, n=45)
    imp = np.mean(x * x, axis=0)
    u, perm, dead = prepare(x.T @ x, act_order=act_order)
    s = runtime_scales(quantize(w, scheme, imp))
    s_cols = s[:, np.arange(w.shape[1]) // (w.shape[1] // s.shape[1])]
    order = perm if perm is not None else np.arange(w.shape[1])
    expected = np.empty(w.shape, np.int8)
    expected[:, order] = _textbook_gptq(np.where(dead, 0, w)[:, order], s_cols[:, order], np.triu(u),
                                        *levels_range(scheme))
    monkeypatch.setattr(gptq, "_CHUNK_ELEMS", 7 * w.shape[1])
    monkeypatch.setattr(gptq, "BLOCK", 16)
    got = gptq_quantize(w, scheme, (u, perm, dead), imp).int_values()
    assert np.mean(got == expected) > 0.995, np.mean(got == expected)


def test_damping_by_scheme_reaches_the_factor():
    """int8 is damped most, per-channel int4 more than int4-b32 (docs/QUANTIZATION.md); gptq_quantize
    without a damp applies the scheme's, as the graph writer does through Hessians.prepared."""
    assert gptq.damping("int8") > gptq.damping("int4") > gptq.damping("int4-b32") == gptq.DAMP
    x, w = _layer(4)
    h = x.T @ x
    for scheme in SCHEMES:
        own = gptq_quantize(w, scheme, h, act_order=False)
        explicit = gptq_quantize(w, scheme, prepare(h, gptq.damping(scheme), act_order=False))
        np.testing.assert_array_equal(own.data, explicit.data)
    other = gptq_quantize(w, "int8", prepare(h, gptq.DAMP, act_order=False))
    assert not np.array_equal(other.data, gptq_quantize(w, "int8", h, act_order=False).data)


def test_dead_columns_and_prepared_factor():
    x, w = _layer(3)
    x[:, 9] = 0                                                # a channel no input reaches
    _, perm, dead = prepare(x.T @ x, act_order=True)
    assert dead[9] and dead.sum() == 1 and perm[-1] == 9          # natural order; the dead column last
    u, perm, dead = prepare(x.T @ x, act_order=False)
    assert dead[9] and dead.sum() == 1 and perm is None
    assert (np.diag(u) > 0).all()
    h = x.T @ x
    h[9, 9] = 1
    h[np.diag_indices_from(h)] += gptq.DAMP * np.mean(np.diag(h))
    upper = np.triu(u)                                         # only the upper triangle is read
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(h), rtol=0, atol=1e-4 * np.abs(np.linalg.inv(h)).max())
    g = gptq_quantize(w, "int4", (u, perm, dead))
    assert (g.int_values()[:, 9] == 0).all()                  # no error to spread from it


def test_hessians_run_the_calibration_pass_as_the_writer_asks(tmp_path):
    """H = X^T X of the calibration pass's inputs: asking for a group of a layer makes the
    factors of the rest of that layer (on the workers), never the next layer's; asking in the
    pass's order leaves nothing pending (one layer's inputs at most in memory); asking out of
    order still gives the right H; a group's factor is reused for the weights that share it."""
    d = tmp_path / "src"
    write_tiny_llama(d)
    ckpt = read_checkpoint(d)
    get, cfg = untie(ckpt.tensor, ckpt.config)
    rng = np.random.default_rng(0)
    segments = [rng.integers(0, cfg.vocab_size, 40), rng.integers(0, cfg.vocab_size, 24)]
    expected = dict(matmul_inputs(get, cfg, segments))
    seen = []
    with Hessians.collect(get, cfg, segments, on_group=seen.append) as hs:
        assert hs.n_tokens == 64 and not seen                  # nothing runs until asked
        assert "head" in hs and "layers.0.down" in hs and "layers.0.nothing" not in hs
        first = hs.prepared("layers.0.qkv")
        assert seen == [f"layers.0.{g}" for g in ("qkv", "wo", "gate_up", "down")]   # the layer, not the next
        assert hs.prepared("layers.0.qkv") is first             # wq, wk, wv share one factor
        with pytest.raises(ValueError, match="asked with"):
            hs.prepared("layers.0.qkv", damp=0.5)                # its inputs are gone: no second factor
        assert hs.prepared("layers.0.down")[0].shape == (cfg.intermediate_size,) * 2
        assert hs.prepared("layers.0.wo")[0].shape == (cfg.num_heads * cfg.head_dim,) * 2
        with pytest.raises(ValueError, match="asked with"):
            hs.prepared("layers.0.gate_up", damp=0.5)            # made ahead with the layer's settings
        h = hs.hessian("layers.1.gate_up")                      # out of order: qkv and wo wait
        x = expected["layers.1.gate_up"]
        assert x.shape == (64, cfg.hidden_size)
        np.testing.assert_allclose(h, x.T @ x, rtol=1e-5, atol=1e-5)
        assert seen[4:] == [f"layers.1.{g}" for g in ("qkv", "wo", "gate_up")]
        hs.prepared("layers.1.qkv")                             # qkv, wo and down: gate_up's are taken
        assert not hs._pending                                  # layer 1's inputs are gone
        assert seen[4:] == [f"layers.1.{g}" for g in ("qkv", "wo", "gate_up", "down")]
        with pytest.raises(KeyError):
            hs.hessian("layers.0.qkv")                          # taken once
    with Hessians.collect(get, cfg, segments) as hs:          # act-order permutes X, then builds H
        x = expected["layers.0.qkv"].astype(np.float64)
        u, perm, dead = hs.prepared("layers.0.qkv", act_order=True)
        u_ref, perm_ref, dead_ref = prepare(x.T @ x, act_order=True)
        np.testing.assert_array_equal(perm, perm_ref)
        np.testing.assert_array_equal(dead, dead_ref)
        np.testing.assert_allclose(np.triu(u), np.triu(u_ref), rtol=1e-4, atol=1e-4 * np.abs(u_ref).max())
    with Hessians.collect(get, cfg, segments) as hs:          # a wider w_down asks with its own damping
        hs.prepared("layers.0.qkv", damp=0.03, damp_of=lambda g: 0.1 if g.endswith(".down") else 0.03)
        hs.prepared("layers.0.wo", damp=0.03)
        u, _, _ = hs.prepared("layers.0.down", damp=0.1)
        x = expected["layers.0.down"].astype(np.float64)
        u_ref, _, _ = prepare(x.T @ x, damp=0.1)
        np.testing.assert_allclose(np.triu(u), np.triu(u_ref), rtol=1e-4, atol=1e-4 * np.abs(u_ref).max())


def test_gptq_bundle_runs_and_says_so(tmp_path, monkeypatch):
    d = tmp_path / "src"
    write_tiny_llama(d)
    import convert.calibration as calibration   # the tiny tokenizer cannot read the calibration text
    monkeypatch.setattr(calibration, "calibration_tokens",
                        lambda *a: [np.random.default_rng(5).integers(0, 256, 64)])
    outs = {}
    for gptq in (True, False):
        b = Bundle.open(convert(d, tmp_path / f"b{gptq}", quant="int4", quiet=True, gptq=gptq))
        manifest = json.loads((b.path / "manifest.json").read_text())
        assert (manifest["gptq"], manifest["rotation"]) == (gptq, gptq)   # 4-bit rotates only with GPTQ
        model = load_backend(b, "litert", 32, 2)
        ids = np.arange(1, 17)
        outs[gptq] = model.prefill(ids, model.new_cache(), all_logits=True)
        assert np.isfinite(outs[gptq]).all()
    assert not np.array_equal(outs[True], outs[False])


@pytest.mark.parametrize("n,panel", [(300, 64), (257, 32), (1100, 512)])
def test_in_place_factorisation_matches_numpy(monkeypatch, n, panel):
    """prepare's blocked, in-place Cholesky and triangular inverse (many panels, a ragged last
    one, odd sizes) give np.linalg's factors, in float64 and in float32 (the 1B w_down's)."""
    monkeypatch.setattr(gptq, "_PANEL", panel)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n + 50, n))
    h = x.T @ x
    for dtype, tol in ((np.float64, 1e-9), (np.float32, 2e-4)):
        a = h.astype(dtype)
        gptq._reverse(a)
        np.testing.assert_array_equal(a, h.astype(dtype)[::-1, ::-1])
        a = h.astype(dtype)
        gptq._cholesky_in_place(a)
        lower = np.linalg.cholesky(h)
        np.testing.assert_allclose(a, lower, rtol=0, atol=tol * np.abs(lower).max())
        gptq._invert_lower_in_place(a)
        inv = np.linalg.inv(lower)
        np.testing.assert_allclose(a, inv, rtol=0, atol=tol * np.abs(inv).max())
    u, _, _ = prepare(h, damp=0.0, act_order=False)
    np.testing.assert_allclose(np.triu(u).T @ np.triu(u), np.linalg.inv(h), rtol=0,
                               atol=1e-5 * np.abs(np.linalg.inv(h)).max())
