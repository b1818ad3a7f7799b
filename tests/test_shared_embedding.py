"""The tied embedding is stored once: an integer bundle's lookup reads the lm_head's rows inside
model.tflite (edge/model/embedding.py), and undoes what smoothing and rotation did to them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from convert.convert import convert, read_checkpoint
from convert.quantize import quantize
from convert.rotation import orthogonal_factors, random_orthogonal
from edge.model.bundle import FORMAT_VERSION, MANIFEST, Bundle, BundleError, manifest_digest
from edge.model.embedding import Embedding
from tests.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    src = tmp_path_factory.mktemp("tiny") / "ckpt"
    write_tiny_llama(src, seed=5)
    return src


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-b32"])
def test_lookup_reads_the_head_rows_in_the_graph_file(tiny_ckpt, tmp_path, scheme):
    """No rewrites: the stored head is quantize(embed) itself, so the lookup must equal its
    rows decoded, bit for bit, and for int8 today's lookup (int8 rows times per-row scale) of
    the same levels and scales; and the rows are the graph file's bytes, not a copy."""
    from convert.llama_graph import head_scheme
    b = Bundle.open(convert(tiny_ckpt, tmp_path / "b", quant=scheme, rotate=False, smooth=False, quiet=True))
    ckpt = read_checkpoint(tiny_ckpt)
    head = quantize(ckpt.tensor("embed"), head_scheme(scheme))
    spec = b.manifest["tensors"]["embed"]
    assert spec["file"] == "model.tflite"
    assert b.manifest["embedding"]["scheme"] == head.scheme
    raw = np.fromfile(b.file("model.tflite"), np.uint8, count=head.data.nbytes, offset=spec["offset"])
    assert np.array_equal(raw, head.data.view(np.uint8).reshape(-1))
    tokens = np.array([0, 5, 255, 17, 5, 3])
    x = b.embedding()(tokens)
    assert x.dtype == np.float32
    assert np.array_equal(x, head.dequantize()[tokens])
    if head.scheme == "int8":
        rows, scale = head.data, head.scales              # an int8_rows table of the head's weights
        today = rows[tokens].astype(np.float32)
        today *= scale[tokens, None]
        assert np.array_equal(x, today)
    # one copy: weights.bin holds only the per-row scales, not a table
    assert _bytes_in_weights_bin(b) < head.data.nbytes // 4


@pytest.mark.parametrize("scheme", ["int4", "int4-b32"])
def test_an_int4_head_is_the_embedding_too(tiny_ckpt, tmp_path, scheme):
    """Whatever format the head takes (today int8 for every integer scheme), the lookup decodes
    it: an int4 / int4-b32 head gives packed rows read from the graph file."""
    b = Bundle.open(convert(tiny_ckpt, tmp_path / "b", quant=scheme, rotate=False, smooth=False, quiet=True,
                            head=scheme))
    head = quantize(read_checkpoint(tiny_ckpt).tensor("embed"), scheme)
    assert b.manifest["embedding"]["scheme"] == scheme
    assert b.manifest["tensors"]["embed"]["file"] == "model.tflite"
    assert (b.manifest["tensors"]["embed_scale"]["file"] == "model.tflite") == (scheme == "int4-b32")
    tokens = np.array([9, 0, 255, 9])
    assert np.array_equal(b.embedding()(tokens), head.dequantize()[tokens])


def _bytes_in_weights_bin(b: Bundle) -> int:
    return sum(np.dtype(t["dtype"]).itemsize * int(np.prod(t["shape"]))
               for t in b.manifest["tensors"].values() if t["file"] == "weights.bin")


def test_lookup_undoes_smoothing_and_rotation_of_the_head():
    """head = ((E * n) Q) * s (rotation folds the final norm n, smoothing scales columns by s):
    the lookup gives back E Q, the rotated embedding the graph expects."""
    rng = np.random.default_rng(0)
    V, D = 50, 96                                     # 96 = 3 * 32: a random block and a Hadamard one
    e = rng.standard_normal((V, D)).astype(np.float32)
    n = rng.uniform(0.5, 2, D).astype(np.float32)
    s = rng.uniform(0.3, 3, D).astype(np.float32)
    q = random_orthogonal(D).astype(np.float32)
    head = ((e * n) @ q) * s
    emb = Embedding(head, "float", D, divisor=s, norm=n, rotation=orthogonal_factors(D))
    tokens = np.array([3, 0, 49, 3])
    np.testing.assert_allclose(emb(tokens), (e @ q)[tokens], rtol=0, atol=2e-5)


def test_default_int8_bundle_of_a_tied_model_has_one_copy(tiny_ckpt, tmp_path):
    """Rotated (the int8 default) and tied: the lookup is the rotated embedding, within the
    head's int8 error, and nothing but small vectors sits in weights.bin."""
    b = Bundle.open(convert(tiny_ckpt, tmp_path / "b", quant="int8", quiet=True))
    assert b.manifest["rotation"] and b.manifest["tensors"]["embed"]["file"] == "model.tflite"
    ckpt = read_checkpoint(tiny_ckpt)
    e = ckpt.tensor("embed") @ random_orthogonal(ckpt.config.hidden_size).astype(np.float32)
    tokens = np.arange(ckpt.config.vocab_size)
    err = np.abs(b.embedding()(tokens) - e).max(axis=1)
    assert np.all(err <= 0.02 * np.abs(e).max(axis=1))
    assert _bytes_in_weights_bin(b) < e.size // 4          # a quarter of the int8 table


def test_untied_model_keeps_its_own_table(tmp_path):
    src = tmp_path / "ckpt"
    write_tiny_llama(src, seed=2, tie_word_embeddings=False)
    # unrotated, so the stored rows are the checkpoint's own (a rotated bundle stores e Q)
    b = Bundle.open(convert(src, tmp_path / "b", quant="int4", quiet=True, rotate=False))
    assert b.manifest["tensors"]["embed"]["file"] == "weights.bin"
    ckpt = read_checkpoint(src)
    e = ckpt.tensor("embed")
    err = np.abs(b.embedding()(np.arange(len(e))) - e).max(axis=1)
    assert np.all(err <= np.abs(e).max(axis=1) / 254 + 1e-7)        # int8 rows, half a level


def test_older_bundle_format_is_refused_with_a_clear_error(tiny_ckpt, tmp_path):
    path = convert(tiny_ckpt, tmp_path / "b", quant="int8", quiet=True)
    m = json.loads((path / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION - 1
    m["manifest_sha256"] = manifest_digest(m)
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="convert the checkpoint again"):
        Bundle.open(path)
