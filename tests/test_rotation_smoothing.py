"""Rotation (convert/rotation.py), calibrated smoothing (convert/smoothing.py) and
activation-weighted quantization.

Rotation and smoothing must be exact rewrites in float (only quantization may notice it), the search
must never pick scales worse than none on its own inputs, and the importance-weighted clip
search must never be worse in the metric it minimises. Its effect on a real model is
measured in test_quant_quality.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from convert.calibration import GPTQ_TOKENS, MIN_DISTINCT, SEGMENT, calibration_tokens, matmul_inputs
from convert.convert import ROTATE_BY_DEFAULT, convert, read_checkpoint, untie
from convert.quantize import quantize
from convert.llama_graph import build_llama_graph
from convert.rotation import Rotation, random_orthogonal, rotate_blocks
from convert.smoothing import Smoothing, fake_quant_rows, search_scale
from edge.model.bundle import Bundle
from edge.model.litert_runner import GraphRunner
from edge.model.numpy_model import NumpyModel
from tests.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-src")
    write_tiny_llama(d)
    return d, read_checkpoint(d)


def _outlier_tokens(ckpt, n=48):
    return np.random.default_rng(3).integers(0, ckpt.config.vocab_size, n)


def assert_same_logits(cfg, get, ckpt) -> None:
    """The float model on weights `get` gives the checkpoint's own logits (to rounding)."""
    model, ref = NumpyModel(cfg, get, 64), NumpyModel(ckpt.config, ckpt.tensor, 64)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, 40)
    a = ref.forward(ids, ref.new_cache(), all_logits=True)
    b = model.forward(ids, model.new_cache(), all_logits=True)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_smoothed_weights_are_an_exact_rewrite_in_float(tiny, scheme):
    _, ckpt = tiny
    get, cfg = untie(ckpt.tensor, ckpt.config)
    sm = Smoothing.fit(get, cfg, _outlier_tokens(ckpt), scheme, "int8")
    assert any(np.ptp(s) > 0.1 for s in sm.scales.values())     # not the identity
    assert_same_logits(cfg, sm.weights(get), ckpt)


def test_gqa_heads_sharing_a_kv_head_share_scales(tiny):
    _, ckpt = tiny
    cfg = ckpt.config
    sm = Smoothing.fit(*untie(ckpt.tensor, cfg), _outlier_tokens(ckpt), "int8", "int8")
    s = sm.scales["layers.0.wo"].reshape(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
    assert np.array_equal(s, np.broadcast_to(s[:, :1], s.shape))


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-b32"])
def test_search_never_worse_than_no_smoothing(scheme):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 128)).astype(np.float32)
    x[:, [3, 70]] *= 40                                     # outlier channels, as in real LLMs
    w = (rng.standard_normal((96, 128)) * 0.05).astype(np.float32)
    y = x @ w.T

    def err(s):
        return np.square(fake_quant_rows(x / s) @ quantize(w * s, scheme, np.mean((x / s) ** 2, 0)).dequantize().T - y).sum()

    s = search_scale(x, w, scheme)
    assert err(s) <= err(np.ones(128, np.float32))
    if scheme == "int8":                                    # activations dominate: smoothing pays
        assert err(s) < 0.5 * err(np.ones(128, np.float32))


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-b32"])
def test_importance_weighted_clip_search_never_worse_in_its_metric(monkeypatch, scheme):
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(32, 128)).astype(np.float32)
    imp = rng.uniform(0.01, 1, 128).astype(np.float32) ** 4
    weighted, plain = quantize(w, scheme, imp), quantize(w, scheme)

    def err(qw):
        return (np.square(qw.dequantize() - w) * imp).sum()

    assert err(weighted) < err(plain)
    with pytest.raises(ValueError, match="importance"):
        quantize(w, scheme, imp[:-1])


def test_fake_quant_rows_keeps_zero_and_the_row_range():
    x = np.array([[0.0, 1.0, -3.0, 2.5], [0.0, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0]], np.float32)
    q = fake_quant_rows(x)
    assert q[:, 0].tolist()[:2] == [0.0, 0.0] and np.array_equal(q[1], x[1])
    assert np.abs(q - x).max() <= (8.0 / 255) / 2 + 1e-6


def test_matmul_inputs_match_the_reference_forward(tiny):
    """The calibration pass sees what the model computes: its last capture, the head input,
    times the head gives the reference model's logits."""
    _, ckpt = tiny
    tokens = _outlier_tokens(ckpt, 20)
    groups = list(matmul_inputs(ckpt.tensor, ckpt.config, tokens))
    assert [g for g, _ in groups[:4]] == ["layers.0.qkv", "layers.0.wo", "layers.0.gate_up", "layers.0.down"]
    assert len(groups) == 4 * ckpt.config.num_layers + 1
    ref = NumpyModel(ckpt.config, ckpt.tensor, 32)
    np.testing.assert_allclose(groups[-1][1] @ ckpt.tensor("embed").T,
                               ref.forward(tokens, ref.new_cache(), all_logits=True), atol=1e-4)


def test_unreadable_calibration_text_falls_back_to_plain_quantization(tiny, tmp_path, capsys):
    """The tiny model's 256-token vocabulary reads the text as <unk>: no scales are fitted
    to that, the converter says so, and the manifest records it."""
    src, ckpt = tiny
    assert calibration_tokens(ckpt.tokenizer_json, 1) is None
    b = Bundle.open(convert(src, tmp_path / "q", quant="int8"))
    assert b.manifest["smoothing"] is False
    assert "cannot read the calibration text" in capsys.readouterr().err


def test_smollm2_reads_the_calibration_text(smollm2_gguf):
    ckpt = read_checkpoint(smollm2_gguf)
    segments = calibration_tokens(ckpt.tokenizer_json, None)
    assert segments is not None and len(set(segments[0].tolist())) > 4 * MIN_DISTINCT
    many = calibration_tokens(ckpt.tokenizer_json, 1, GPTQ_TOKENS)
    assert sum(map(len, many)) == GPTQ_TOKENS                  # the text is long enough for GPTQ
    assert all(len(s) <= SEGMENT and s[0] == 1 for s in many)  # each sequence starts with BOS


# -- rotation (convert/rotation.py) ----------------------------------------------------
@pytest.mark.parametrize("n", [64, 96, 576])
def test_rotation_is_orthogonal_and_spreads_every_channel(n):
    q = random_orthogonal(n)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-10)
    assert (np.abs(q) > 1e-6).all()                      # one channel lands on all of them
    x = np.zeros(n)
    x[5] = 100.0                                         # a massive activation
    assert np.abs(x @ q).max() < 100.0 * 4 / np.sqrt(n)


@pytest.mark.parametrize("smooth", [False, True])
def test_rotated_weights_are_an_exact_rewrite_in_float(tiny, smooth):
    _, ckpt = tiny
    get, cfg = untie(ckpt.tensor, ckpt.config)
    rotation = Rotation(cfg)
    rotation.down_rotation = None        # the NumPy model has no online rotation; see below
    get = rotation.weights(get)
    if smooth:
        get = Smoothing.fit(get, cfg, _outlier_tokens(ckpt), "int8", "int8").weights(get)
    assert np.abs(get("embed") - ckpt.tensor("embed")).max() > 0.01     # really rotated
    assert_same_logits(cfg, get, ckpt)


def test_rotation_defaults_follow_the_measured_table_and_are_recorded(tiny, tmp_path):
    src, _ = tiny
    assert ROTATE_BY_DEFAULT == ("int8", "int4", "int4-b32")
    # the tiny tokenizer cannot read the calibration text: no GPTQ, so no rotation for 4-bit
    for quant, rotated in (("int8", True), ("int4", False), ("int4-b32", False), ("f32", False)):
        b = Bundle.open(convert(src, tmp_path / quant, quant=quant, quiet=True))
        assert (b.manifest["rotation"], b.manifest["gptq"]) == (rotated, False), quant
    b = Bundle.open(convert(src, tmp_path / "r4", quant="int4-b32", rotate=True, quiet=True))
    assert b.manifest["rotation"] is True


def test_rotated_graph_computes_the_same_layers(tiny, tmp_path):
    """f32 graphs of the plain and the rotated weights, layer by layer: the rotated one sees
    x Q and per-head-rotated attention, and returns x_out Q, the same q/k, v per head
    rotated, and the same logits; the w_down input is rotated inside the graph."""
    _, ckpt = tiny
    get, cfg = untie(ckpt.tensor, ckpt.config)
    rot = Rotation(cfg)
    assert rot.down_rotation is not None and rot.down_rotation.shape == (32, 32)   # F = 160
    paths = {"plain": build_llama_graph(get, cfg, "f32"),
             "rotated": build_llama_graph(rot.weights(get), cfg, "f32", down_rotation=rot.down_rotation)}
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    plain, rotated = (GraphRunner(tmp_path / n, threads=2) for n in paths)
    assert rotated.delegated
    rng = np.random.default_rng(2)
    D, A, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    x = rng.standard_normal((5, D)).astype(np.float32)
    attn = rng.standard_normal((5, A)).astype(np.float32)
    want = plain.run("layer_0", x=x, attn=attn)
    got = rotated.run("layer_0", x=x @ rot.q, attn=rotate_blocks(attn, rot.h))
    tol = lambda a: 1e-4 * np.abs(a).max()
    np.testing.assert_allclose(got["x_out"], want["x_out"] @ rot.q, atol=tol(want["x_out"]))
    np.testing.assert_allclose(got["qkv"][:, :-kv], want["qkv"][:, :-kv], atol=tol(want["qkv"]))
    np.testing.assert_allclose(got["qkv"][:, -kv:], rotate_blocks(want["qkv"][:, -kv:], rot.h), atol=tol(want["qkv"]))
    last = f"layer_{cfg.num_layers - 1}"
    h_plain = plain.run(last, x=x, attn=attn)["h_final"]
    h_rot = rotated.run(last, x=x @ rot.q, attn=rotate_blocks(attn, rot.h))["h_final"]
    logits = plain.run("lm_head", h=h_plain)["logits"]
    np.testing.assert_allclose(rotated.run("lm_head", h=h_rot)["logits"], logits, atol=tol(logits))
