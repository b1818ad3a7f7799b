"""Quantizers, the .tflite writer, the fused Llama graphs and the LiteRT runner, end to end.

Error bounds for hybrid (float in/out, quantized weight) FCs: XNNPACK quantizes each
activation row to int8 on the fly, asymmetrically over [min(0, min x), max(0, max x)], so
every element moves by at most s_x / 2 with s_x = range / 255. Output j then moves by at most
s_x / 2 * sum_i |W_ji| (W dequantized): that is the bound asserted against float math. The
runtime's arithmetic is also reproduced exactly by `fake_quant_rows`, the simulation the
converter's smoothing search relies on; that pins the scheme down.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb

from convert.checkpoint import expected_shapes
from convert.llama_graph import build_llama_graph, group_scheme, head_scheme
import convert.quantize as quantize_mod
from convert.quantize import CLIP_RATIOS, SCHEMES, pack_int4, quantize, unpack_int4
from convert.smoothing import fake_quant_rows
from convert.tflite_writer import ALIGN_LARGE, ALIGN_SMALL, LARGE_BUFFER, ModelBuilder
from edge.model.config import ModelConfig
from edge.model.litert_runner import GraphNotDelegated, GraphRunner

FLOAT_RTOL = 1e-5        # f32/f16 weights: only the summation order differs
QUANT_SCHEMES = [s for s in SCHEMES if s not in ("f32", "f16")]


# -- helpers ----------------------------------------------------------------------------
def _qd8_step(x: np.ndarray) -> np.ndarray:
    """The int8 step of each row under XNNPACK's dynamic activation quantization."""
    return (np.maximum(x.max(axis=1, keepdims=True), 0) - np.minimum(x.min(axis=1, keepdims=True), 0)) / 255


def _fc_ref(x: np.ndarray, qw) -> np.ndarray:
    """The runtime's FC: dequantized weights; activations through qd8 for int schemes."""
    if qw.scheme in ("f32", "f16"):
        return x @ qw.dequantize().T
    return fake_quant_rows(x) @ qw.dequantize().T


# XNNPACK's x86 kernels reproduce `fake_quant_rows` exactly. Its arm64 kernels (seen under
# the emulated Bookworm, LiteRT 2.3.0) round some rows' zero point differently: one row of
# five comes out 0.0035 off, inside the derived bound. So the exact check is x86's only.
EXACT_QD8 = platform.machine() in ("x86_64", "AMD64")


def _assert_hybrid_fc(y: np.ndarray, x: np.ndarray, qw) -> None:
    """A quantized FC's output: within the derived bound of float math everywhere, and equal
    to the simulated runtime arithmetic where that is known to be exact."""
    wd = qw.dequantize()
    ref = x @ wd.T
    scale = np.abs(ref).max()
    bound = _qd8_step(x) / 2 * np.abs(wd).sum(axis=1)[None, :]
    assert (np.abs(y - ref) <= bound + FLOAT_RTOL * scale).all()
    if EXACT_QD8:
        np.testing.assert_allclose(y, _fc_ref(x, qw), rtol=0, atol=FLOAT_RTOL * scale)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def _runner(tmp_path, data: bytes, name="g.tflite", **kw) -> GraphRunner:
    path = tmp_path / name
    path.write_bytes(data)
    return GraphRunner(path, threads=2, **kw)


def _fc_graph(qw) -> bytes:
    mb = ModelBuilder()
    g = mb.subgraph("fc")
    g.output("y", g.fully_connected(g.input("x", qw.shape[1]), qw))
    return mb.finish()


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


# -- quantizers -------------------------------------------------------------------------
def test_int4_packing_order():
    q = np.array([[-8, 7, 1, -1], [0, 3, -4, 5]], np.int8)
    packed = pack_int4(q)
    # element 2i in the low nibble, 2i+1 in the high nibble, two's complement
    assert packed.tolist() == [0x78, 0xF1, 0x30, 0x5C]
    assert np.array_equal(unpack_int4(packed, q.shape), q)


def test_int4_quantized_bytes_follow_packing(rng):
    w = rng.standard_normal((6, 64)).astype(np.float32)
    qw = quantize(w, "int4")
    assert qw.data.dtype == np.uint8 and qw.data.shape == (6 * 64 // 2,)
    # the levels of w at the chosen scales, computed here rather than read back from qw.data
    levels = np.clip(np.rint(w / qw.scales[:, None]), -8, 7).astype(np.int8)
    assert (np.abs(levels).max(axis=1) >= 7).all()          # each row reaches the last level
    assert np.array_equal(qw.data, pack_int4(levels))        # pack_int4's order: test above
    assert np.array_equal(qw.int_values(), levels)


def test_int8_round_trip_within_half_step(rng):
    w = rng.standard_normal((16, 48)).astype(np.float32)
    qw = quantize(w, "int8")
    err = np.abs(qw.dequantize() - w)
    inside = np.abs(w) <= 127 * qw.scales[:, None]           # not clipped by the search
    assert (err[inside] <= (qw.scales[:, None] / 2 * (1 + 1e-6)).repeat(48, 1)[inside]).all()
    assert (np.abs(qw.data).max(axis=1) == 127).all()     # max |w| maps to (or past) the last level


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-b32"])
def test_clipping_search_never_worse_than_max_abs(rng, monkeypatch, scheme):
    w = rng.standard_t(3, size=(32, 128)).astype(np.float32)    # heavy tails: clipping pays
    searched = quantize(w, scheme)
    monkeypatch.setattr(quantize_mod, "CLIP_RATIOS", np.array([1.0]))
    monkeypatch.setattr(quantize_mod, "INT8_CLIP_RATIOS", np.array([1.0]))
    plain = quantize(w, scheme)                                 # max-abs scale, same rounding
    block = searched.block_size or w.shape[1]

    def err(qw):
        return np.square(qw.dequantize() - w).reshape(-1, block).sum(axis=1)

    assert (err(searched) <= err(plain)).all()
    if scheme != "int8":       # 255 levels: unweighted, int8 clipping only pays with importance
        assert err(searched).sum() < 0.95 * err(plain).sum()
    assert CLIP_RATIOS.min() == pytest.approx(0.70) and CLIP_RATIOS.max() == 1.0


def test_block_scales_are_exact_bf16_values_in_fp16(rng):
    qw = quantize(rng.standard_normal((8, 96)).astype(np.float32), "int4-b32")
    s = qw.scales.astype(np.float32)
    assert qw.scales.dtype == np.float16 and qw.scales.shape == (8, 3)
    assert np.array_equal(s.view(np.uint32) & 0xFFFF, np.zeros_like(s.view(np.uint32)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_rows_quantize_to_zero(scheme):
    w = np.zeros((4, 64), np.float32)
    assert np.array_equal(quantize(w, scheme).dequantize(), w)


# -- writer + runner, one FC per scheme ------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fc_matches_numpy_within_derived_bound(tmp_path, rng, scheme):
    n, k = 80, 128
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    qw = quantize(w, scheme)
    runner = _runner(tmp_path, _fc_graph(qw))
    assert runner.delegated
    wd = qw.dequantize()
    for t in (1, 5, 1):
        x = rng.standard_normal((t, k)).astype(np.float32)
        x[:, 0] += 4.0                                         # asymmetric rows
        y = runner.run("fc", x=x)["y"]
        ref = x @ wd.T
        scale = np.abs(ref).max()
        if scheme in ("f32", "f16"):
            np.testing.assert_allclose(y, ref, rtol=0, atol=FLOAT_RTOL * scale)
            continue
        _assert_hybrid_fc(y, x, qw)


def test_weight_shared_between_subgraphs_is_stored_once(rng):
    qw = quantize(rng.standard_normal((256, 256)).astype(np.float32), "int8")
    one = len(_fc_graph(qw))
    mb = ModelBuilder()
    for name in ("a", "b"):
        g = mb.subgraph(name)
        g.output("y", g.fully_connected(g.input("x", 256), qw))
    assert len(mb.finish()) - one < qw.data.nbytes


def test_buffers_live_after_the_flatbuffer_and_are_aligned(rng):
    qw = quantize(rng.standard_normal((512, 256)).astype(np.float32), "int4-b32")
    mb = ModelBuilder()
    g = mb.subgraph("s")
    x = g.input("x", 256)
    g.output("y", g.fully_connected(g.rms_norm(x, np.ones(256, np.float32), 1e-5), qw))
    data = mb.finish()
    model = fb.Model.GetRootAs(data, 0)
    assert model.Version() == 3 and model.SignatureDefsLength() == 1
    buffers = [model.Buffers(i) for i in range(1, model.BuffersLength())]
    assert buffers and all(b.DataLength() == 0 and b.Offset() > 1 for b in buffers)
    for b in buffers:
        align = ALIGN_LARGE if b.Size() >= LARGE_BUFFER else ALIGN_SMALL
        assert b.Offset() % align == 0 and b.Offset() + b.Size() <= len(data)
    packed = next(b for b in buffers if b.Size() == qw.data.nbytes)
    assert data[packed.Offset():packed.Offset() + packed.Size()] == qw.data.tobytes()


def test_split_halves_the_last_axis(tmp_path, rng):
    qw = quantize(rng.standard_normal((48, 32)).astype(np.float32), "f32")
    mb = ModelBuilder()
    g = mb.subgraph("s")
    a, b = g.split(g.fully_connected(g.input("x", 32), qw), 2)
    g.output("a", a)
    g.output("b", b)
    r = _runner(tmp_path, mb.finish())
    x = rng.standard_normal((3, 32)).astype(np.float32)
    out, ref = r.run("s", x=x), x @ qw.dequantize().T
    np.testing.assert_allclose(out["a"], ref[:, :24], rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(out["b"], ref[:, 24:], rtol=0, atol=1e-5 * np.abs(ref).max())
    assert r.delegated


@pytest.mark.parametrize("scheme", ["f32", "int8"])
def test_rotate_blocks_feeds_the_next_fc_as_whole_rows(tmp_path, rng, scheme):
    """[T, W] through an FC with a [B, B] weight comes out as [T*W/B, B] rows; the next FC
    (K = W) must read them back as [T, W], delegated, for any T (decode and prefill)."""
    h = np.linalg.qr(rng.standard_normal((16, 16)))[0].astype(np.float32)
    qw = quantize(rng.standard_normal((24, 64)).astype(np.float32), scheme)
    mb = ModelBuilder()
    g = mb.subgraph("r")
    g.output("y", g.fully_connected(g.rotate_blocks(g.input("x", 64), h), qw))
    r = _runner(tmp_path, mb.finish())
    for t in (1, 7, 2):
        x = rng.standard_normal((t, 64)).astype(np.float32)
        xr = (x.reshape(t, 4, 16) @ h).reshape(t, 64)
        y = r.run("r", x=x)["y"]
        assert y.shape == (t, 24)
        if scheme == "f32":
            np.testing.assert_allclose(y, xr @ qw.dequantize().T, rtol=0, atol=1e-5 * np.abs(y).max())
        else:
            _assert_hybrid_fc(y, xr, qw)
        assert r.delegated


def test_non_delegated_graph_is_refused(tmp_path, rng):
    qw = quantize(rng.standard_normal((32, 64)).astype(np.float32), "int8")
    mb = ModelBuilder()
    g = mb.subgraph("s")
    y = g.fully_connected(g.input("x", 64), qw)
    z = g._act(32)
    g._op(fb.BuiltinOperator.ZEROS_LIKE, [y.index], [z.index])   # an op XNNPACK lacks
    g.output("y", g.add(z, y))
    data = mb.finish()
    with pytest.raises(GraphNotDelegated):
        _runner(tmp_path, data)
    with pytest.warns(RuntimeWarning, match="not every op is delegated"):
        assert not _runner(tmp_path, data, "g2.tflite", require_delegation=False).delegated


# -- runner behaviour -------------------------------------------------------------------
def test_runner_shapes_copies_and_errors(tmp_path, rng):
    qw = quantize(rng.standard_normal((24, 32)).astype(np.float32), "f32")
    r = _runner(tmp_path, _fc_graph(qw))
    assert r.signatures == ["fc"] and r.input_names("fc") == ["x"] and r.output_names("fc") == ["y"]
    x5 = rng.standard_normal((5, 32)).astype(np.float32)
    y5 = r.run("fc", x=x5)["y"]
    assert y5.shape == (5, 24)
    y1 = r.run("fc", x=x5[2:3])["y"]
    # rows are independent; only the f32 summation order may differ (arm64's GEMM vs GEMV: 2e-6)
    np.testing.assert_allclose(y1, y5[2:3], rtol=0, atol=1e-6 * np.abs(y5).max())
    fast = r.runner("fc")
    out = fast(x5[:1])[0]
    assert fast(x5[1:2])[0] is out                                  # reused buffer
    with pytest.raises(ValueError, match="expected float32"):
        fast(np.zeros((1, 31), np.float32))
    with pytest.raises(ValueError, match="expected float32"):
        fast(np.zeros((1, 32), np.float64))


def test_weight_cache_reused_and_never_stale(tmp_path, rng):
    qw = quantize(rng.standard_normal((64, 64)).astype(np.float32), "int4")
    path = tmp_path / "m.tflite"
    path.write_bytes(_fc_graph(qw))
    cache = tmp_path / "cache"
    x = rng.standard_normal((3, 64)).astype(np.float32)
    want = GraphRunner(path, threads=2).run("fc", x=x)["y"]
    for _ in range(2):                                      # write the cache, then read it
        np.testing.assert_array_equal(GraphRunner(path, 2, cache).run("fc", x=x)["y"], want)
    def caches():                                           # each cache file has its check file (.sum) beside it
        return sorted(p for p in cache.iterdir() if p.suffix != ".sum")
    first = caches()
    assert len(first) == 1 and first[0].stat().st_size > 0
    assert first[0].with_name(first[0].name + ".sum").exists()
    other = quantize(rng.standard_normal((64, 64)).astype(np.float32), "int4")
    path.write_bytes(_fc_graph(other))                      # same shapes, new weights
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    got = GraphRunner(path, 2, cache).run("fc", x=x)["y"]
    np.testing.assert_allclose(got, _fc_ref(x, other), rtol=0, atol=1e-5 * np.abs(got).max())
    assert len(caches()) == 1 and caches() != first


def test_litert_setup_noise_is_filtered(tmp_path, rng, capfd):
    qw = quantize(rng.standard_normal((16, 32)).astype(np.float32), "int8")
    r = _runner(tmp_path, _fc_graph(qw))
    r.run("fc", x=np.ones((2, 32), np.float32))
    err = capfd.readouterr().err
    assert "INFO:" not in err and "NPU" not in err and "openvino" not in err.lower()


# -- fused Llama graphs -----------------------------------------------------------------
def _small_config(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=tied)


def _random_weights(cfg: ModelConfig, rng) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return out


def _reference(w, cfg, quant):
    """Straightforward NumPy of the four signature formulas (weights through the quantizer)."""
    eps, L = cfg.rms_norm_eps, cfg.num_layers

    def fc(x, m, scheme=quant):
        return _fc_ref(x, quantize(m, scheme))

    def qkv(x, i):
        p = f"layers.{i}."
        wqkv = np.concatenate([w[p + "wq"], w[p + "wk"], w[p + "wv"]])
        return fc(_rms(x, w[p + "attn_norm"], eps), wqkv)

    def layer(x, attn, i):
        p = f"layers.{i}."
        h = x + fc(attn, w[p + "wo"])
        n = _rms(h, w[p + "ffn_norm"], eps)
        x_out = h + fc(_silu(fc(n, w[p + "w_gate"])) * fc(n, w[p + "w_up"]), w[p + "w_down"],
                       group_scheme(quant, p + "down", L))
        if i < L - 1:
            return {"x_out": x_out, "qkv": qkv(x_out, i + 1)}
        return {"h_final": _rms(x_out, w["final_norm"], eps)}

    head = w["embed"] if cfg.tie_word_embeddings else w["lm_head"]
    return {"entry": lambda x: {"qkv": qkv(x, 0)},
            **{f"layer_{i}": (lambda x, attn, i=i: layer(x, attn, i)) for i in range(L)},
            "lm_head": lambda h: {"logits": fc(h, head, head_scheme(quant))}}


@pytest.mark.parametrize("quant,tied,rtol", [("f32", True, FLOAT_RTOL), ("f32", False, FLOAT_RTOL),
                                             ("int8", True, 1e-4), ("int4-b32", False, 1e-4)])
def test_fused_llama_graph_matches_numpy(tmp_path, rng, quant, tied, rtol):
    cfg = _small_config(tied)
    w = _random_weights(cfg, rng)
    asked = []
    data = build_llama_graph(lambda n: asked.append(n) or w[n], cfg, quant)   # callable source
    assert set(asked) == set(w) - ({"lm_head"} if tied else {"embed"})
    r = _runner(tmp_path, data)
    assert r.delegated
    assert r.signatures == ["entry", "layer_0", "layer_1", "lm_head"]
    assert r.output_names("layer_0") == ["x_out", "qkv"] and r.output_names("layer_1") == ["h_final"]
    ref = _reference(w, cfg, quant)
    D, A = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    for t in (1, 5):
        inputs = {"entry": {"x": rng.standard_normal((t, D))},
                  "layer_0": {"x": rng.standard_normal((t, D)), "attn": rng.standard_normal((t, A))},
                  "layer_1": {"x": rng.standard_normal((t, D)), "attn": rng.standard_normal((t, A))},
                  "lm_head": {"h": rng.standard_normal((t, D))}}
        for sig, ins in inputs.items():
            ins = {k: v.astype(np.float32) for k, v in ins.items()}
            got, want = r.run(sig, **ins), ref[sig](**ins)
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].shape == want[k].shape == (t, want[k].shape[1])
                np.testing.assert_allclose(got[k], want[k], rtol=0,
                                           atol=rtol * np.abs(want[k]).max(), err_msg=f"{sig}.{k}")
        assert r.delegated                                      # still, after the resize
    qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert r.run("entry", x=np.ones((1, D), np.float32))["qkv"].shape == (1, qkv_width)


def test_int4_keeps_the_first_and_last_w_down_at_int8(tmp_path, rng):
    """Per-channel int4's graph: w_down of the first and the last layer at int8 (WIDER_GROUPS),
    every other matmul int4, the head int4-b32; the graph computes exactly those hybrid FCs."""
    cfg = dataclasses.replace(_small_config(True), num_layers=3)
    assert [group_scheme("int4", f"layers.{i}.{g}", 3) for i in range(3) for g in ("qkv", "down")] == \
        ["int4", "int8", "int4", "int4", "int4", "int8"]
    assert group_scheme("int8", "layers.0.down", 3) == "int8" and group_scheme("int4-b32", "layers.2.down", 3) == "int4-b32"
    w = _random_weights(cfg, rng)
    r = _runner(tmp_path, build_llama_graph(w, cfg, "int4"))
    assert r.delegated
    ref = _reference(w, cfg, "int4")
    D, A = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    for sig in ("layer_0", "layer_1", "layer_2"):
        ins = {"x": rng.standard_normal((3, D)).astype(np.float32), "attn": rng.standard_normal((3, A)).astype(np.float32)}
        got, want = r.run(sig, **ins), ref[sig](**ins)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-4 * np.abs(want[k]).max(), err_msg=f"{sig}.{k}")
    h = rng.standard_normal((2, D)).astype(np.float32)
    np.testing.assert_allclose(r.run("lm_head", h=h)["logits"], ref["lm_head"](h=h)["logits"], rtol=0,
                               atol=1e-4 * np.abs(ref["lm_head"](h=h)["logits"]).max())


def test_unknown_quantization_is_refused(rng):
    cfg = _small_config(True)
    with pytest.raises(ValueError, match="unknown quantization"):
        build_llama_graph(_random_weights(cfg, rng), cfg, "int3")


def test_runner_switching_row_counts_keeps_buffers_and_results(tmp_path, rng):
    """Decode (1 row) alternating with multi-row steps: each size's buffers are kept (no LiteRT
    setup per switch), results stay those of a steady run of that size, and besides the
    current size only KEEP_ROWS rows' worth of buffers are kept (a prefill chunk's go)."""
    from edge.model.litert_runner import _Signature
    qw = quantize(rng.standard_normal((24, 32)).astype(np.float32), "int8")
    r = _runner(tmp_path, _fc_graph(qw))
    fast = r.runner("fc")
    xs = {t: rng.standard_normal((t, 32)).astype(np.float32) for t in (*range(1, 10), 64)}
    steady = {t: fast(x)[0].copy() for t, x in xs.items()}
    fresh = r.runner("fc", fresh=True)
    for t in [1, 3, 1, 5, 2, 1, 3, 8, 1, 64, 7, 1, 3, 9, 4, 6, 1]:
        got = fast(xs[t])[0]
        assert got.shape == (t, 24) and np.array_equal(got, steady[t])
        kept = fresh(xs[t])[0]
        assert kept is not fresh(xs[t])[0] and np.array_equal(kept, steady[t])
        others = sum(fast._sets) - t
        assert others <= _Signature.KEEP_ROWS and list(fast._sets)[-1] == t
    assert 64 not in fast._sets                  # the big chunk's buffers were let go
    assert list(fast._sets) == [3, 9, 4, 6, 1]   # the small ones kept (22 rows + the current), least recently used first
    fast(xs[64])
    fast(xs[2])
    assert list(fast._sets) == [3, 9, 4, 6, 1, 2]   # a chunk in between evicts none of them
    out1 = fast(xs[1])[0]
    fast(xs[3])
    assert fast(xs[1])[0] is out1                # the 1-row buffers were kept, not rebuilt
