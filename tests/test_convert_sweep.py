"""One pass over the layers (convert/sweep.py): every transformed tensor is made once per
conversion, the graph is byte for byte the one two separate calibration passes give, the pass
runs at most one layer ahead of the writer, and the head quantized in row blocks is the head
quantized whole."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import convert.calibration as calibration
import convert.gptq as gptq
import convert.llama_graph as llama_graph
from convert.convert import convert, read_checkpoint, untie
from convert.gptq import Hessians, gptq_quantize
from convert.llama_graph import build_llama_graph
from convert.quantize import quantize
from convert.reuse import CalibrationRows
from convert.rotation import Rotation
from convert.smoothing import Smoothing
from convert.sweep import LAYER_TENSORS, Sweep
from tests.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-src")
    write_tiny_llama(d)
    return d, read_checkpoint(d)


def _segments(vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, vocab, 40), rng.integers(0, vocab, 40), rng.integers(0, vocab, 24)]


def test_each_layer_tensor_is_rotated_and_smoothed_once_per_conversion(tiny, tmp_path, monkeypatch):
    """The default int4 conversion (rotation + smoothing + GPTQ) makes every layer tensor, the
    head and the embedding rows once: counted at the rotation and at the smoothing."""
    d, ckpt = tiny
    monkeypatch.setattr(calibration, "calibration_tokens", lambda *a: _segments(ckpt.config.vocab_size))
    made = {"rotated": {}, "smoothed": {}}

    def counting(kind, weights):
        def wrap(self, get):
            inner = weights(self, get)

            def counted(name):
                made[kind][name] = made[kind].get(name, 0) + 1
                return inner(name)
            return counted
        return wrap
    monkeypatch.setattr(Rotation, "weights", counting("rotated", Rotation.weights))
    monkeypatch.setattr(Smoothing, "weights", counting("smoothed", Smoothing.weights))
    convert(d, tmp_path / "b", quant="int4", quiet=True)
    L = ckpt.config.num_layers
    layer_names = {f"layers.{i}.{n}" for i in range(L) for n in LAYER_TENSORS}
    assert made["rotated"] == {n: 1 for n in layer_names | {"lm_head", "final_norm", "embed"}}
    assert made["smoothed"] == {n: 1 for n in layer_names | {"lm_head", "final_norm"}}


def _two_pass_graph(ckpt, segments, smooth_tokens) -> bytes:
    """The graph as separate passes make it: smoothing's pass over the rotated weights, then
    GPTQ's over the rotated and smoothed ones (each making its tensors anew)."""
    get, cfg = untie(ckpt.tensor, ckpt.config)
    rot = Rotation(cfg)
    rotated = rot.weights(get)
    rows = CalibrationRows(rotated, segments)
    sm = Smoothing.fit(rows, cfg, smooth_tokens, "int4", "int4", down_rotation=rot.down_rotation)
    smoothed = sm.weights(rotated)
    with Hessians.collect(rows.on(smoothed), cfg, segments, rot.down_rotation) as hs:
        return build_llama_graph(smoothed, cfg, "int4", sm.importance, rot.down_rotation, hs, head="int4")


def test_one_pass_graph_is_the_two_pass_graph_byte_for_byte(tiny):
    _, ckpt = tiny
    segments = _segments(ckpt.config.vocab_size)
    smooth_tokens = segments[:1]
    expected = _two_pass_graph(ckpt, segments, smooth_tokens)
    get, cfg = untie(ckpt.tensor, ckpt.config)
    rot = Rotation(cfg)
    rotated = rot.weights(get)
    with Sweep(rotated, CalibrationRows(rotated, segments), cfg, "int4", "int4", smooth_tokens, segments,
               rot.down_rotation) as sweep:
        got = build_llama_graph(sweep, cfg, "int4", sweep.importance, rot.down_rotation, sweep.hessians,
                                head="int4")
    assert got == expected


def test_the_pass_makes_a_layer_only_once_the_writer_took_the_one_before(tiny):
    """Memory holds two layers at most: layer j's weights are made only after the writer has
    taken layer j-1 (the writer here takes each layer slowly, tensor by tensor)."""
    _, ckpt = tiny
    get, cfg = untie(ckpt.tensor, ckpt.config)
    segments = _segments(cfg.vocab_size)
    at_make, made = {}, []

    def recording(name):
        if name.startswith("layers.") and name.endswith(".wq"):       # the pass may start before
            at_make[int(name.split(".")[1])] = made[0]._next if made else 0    # the constructor returns
        return get(name)
    sweep = Sweep(recording, CalibrationRows(get, segments), cfg, "int4", "int4", segments[:1], segments)
    made.append(sweep)
    with sweep:
        for i in range(cfg.num_layers):
            for n in LAYER_TENSORS:
                sweep(f"layers.{i}.{n}")
            for g in calibration.GROUPS:
                sweep.hessians.prepared(f"layers.{i}.{g}")
        sweep("final_norm"), sweep("lm_head")
        sweep.hessians.prepared("head")
        with pytest.raises(KeyError):
            sweep("layers.0.wq")                          # handed over once
    assert sorted(at_make) == list(range(cfg.num_layers))
    assert all(at_make[j] >= j for j in at_make), at_make


@pytest.mark.parametrize("scheme", ["int4", "int8", "int4-b32"])
@pytest.mark.parametrize("with_gptq", [True, False])
def test_head_in_row_blocks_is_the_head_in_one_call(monkeypatch, scheme, with_gptq):
    monkeypatch.setattr(gptq, "_CHUNK_ELEMS", 64 * 37)           # GPTQ's chunk: 37 rows of 64
    monkeypatch.setattr(llama_graph, "HEAD_BLOCK_ELEMS", 64 * 37 * 3)   # blocks of 111 rows
    rng = np.random.default_rng(1)
    w = rng.standard_normal((500, 64)).astype(np.float32)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    h = gptq.prepare(x.T.astype(np.float64) @ x, gptq.damping(scheme))
    imp = np.mean(x * x, axis=0)
    one = (lambda m: gptq_quantize(m, scheme, h, imp)) if with_gptq else (lambda m: quantize(m, scheme, imp))
    whole, blocks = one(w), llama_graph.by_row_blocks(w, one)
    assert (blocks.scheme, blocks.shape, blocks.block_size) == (whole.scheme, whole.shape, whole.block_size)
    assert blocks.data.dtype == whole.data.dtype and blocks.data.shape == whole.data.shape
    np.testing.assert_array_equal(blocks.data, whole.data)
    np.testing.assert_array_equal(blocks.scales, whole.scales)


def test_a_large_table_is_read_by_rows_never_whole(tiny, tmp_path, monkeypatch):
    """Above STREAM_ELEMS the embedding and the lm_head are read from the checkpoint a block of
    rows at a time (never through `tensor`), rotated and smoothed per block; the rows equal the
    whole table's to float rounding, and the bundle's head to a level or so of int4."""
    import convert.table as table
    from convert.checkpoint import Checkpoint
    from edge.model.bundle import Bundle
    d, ckpt = tiny
    cfg = ckpt.config
    monkeypatch.setattr(calibration, "calibration_tokens", lambda *a: _segments(cfg.vocab_size))
    whole = convert(d, tmp_path / "whole", quant="int4", quiet=True)

    get, ucfg = untie(ckpt.tensor, cfg)
    rot = Rotation(ucfg)
    t = rot.table("lm_head", table.Table((cfg.vocab_size, cfg.hidden_size), lambda lo, hi: ckpt.rows("embed", lo, hi)),
                  ckpt.tensor("final_norm"))
    ref = rot.weights(get)("lm_head")
    np.testing.assert_allclose(t[10:50], ref[10:50], rtol=0, atol=1e-5)
    np.testing.assert_allclose(t.take(np.array([0, 7, 255])), ref[[0, 7, 255]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(t.gather(np.array([3, 100, 200])), ref[[3, 100, 200]], rtol=0, atol=1e-5)

    monkeypatch.setattr(table, "STREAM_ELEMS", 0)
    monkeypatch.setattr(table, "BLOCK_ELEMS", 64 * 50)           # rows gathered 50 at a time
    monkeypatch.setattr(gptq, "_CHUNK_ELEMS", 64 * 37)
    monkeypatch.setattr(llama_graph, "HEAD_BLOCK_ELEMS", 64 * 37 * 2)   # the head in blocks of 74 rows
    whole_reads = []
    tensor = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, n: whole_reads.append(n) or tensor(self, n))
    streamed = convert(d, tmp_path / "streamed", quant="int4", quiet=True)
    assert "embed" not in whole_reads and "lm_head" not in whole_reads
    a, b = Bundle.open(whole), Bundle.open(streamed)
    assert a.manifest["gptq"] and b.manifest["gptq"] and b.manifest["smoothing"]
    ea, eb = a.embedding()(np.arange(cfg.vocab_size)), b.embedding()(np.arange(cfg.vocab_size))
    np.testing.assert_allclose(eb, ea, rtol=0, atol=0.05 * np.abs(ea).max())


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_the_bundle_is_the_same_on_any_number_of_workers(tiny, tmp_path, monkeypatch, quant):
    """GPTQ's chunks of rows, the clip search's chunks, the next group's Hessian factor and
    smoothing's candidates run on the conversion's workers (convert/workers.py): the bytes do
    not depend on how many. Small chunks, so every weight is several pieces."""
    import convert.quantize as quantize_module
    from convert import workers
    d, ckpt = tiny
    monkeypatch.setattr(calibration, "calibration_tokens", lambda *a: _segments(ckpt.config.vocab_size))
    monkeypatch.setattr(gptq, "_CHUNK_ELEMS", 7 * ckpt.config.hidden_size)        # 7 rows a chunk
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMS", 5 * ckpt.config.hidden_size)
    seen = set()
    submit = workers.submit

    def counting(fn, *args):
        seen.add(threading.current_thread().name)
        return submit(lambda: (seen.add(threading.current_thread().name), fn(*args))[1])
    monkeypatch.setattr(workers, "submit", counting)
    files = {}
    for n in (1, 2, 3):
        seen.clear()
        out = convert(d, tmp_path / f"w{n}", quant=quant, quiet=True, threads=n)
        files[n] = {f: (out / f).read_bytes() for f in ("model.tflite", "weights.bin")}
        assert any(s.startswith("edge-llm-convert") for s in seen) == (n > 1)    # pieces did go to workers
    assert files[2] == files[1] and files[3] == files[1]


def test_workers_keep_the_order_finish_every_piece_and_run_nested_pieces_inline():
    """map_ordered gives results in the items' order whatever finishes first; a failing piece
    raises only once every piece is done; a piece's own pieces run in its thread (a bounded
    pool waiting on itself could stall); one worker runs everything in the caller."""
    from convert import workers
    finished = []
    release, done = threading.Event(), threading.Semaphore(0)

    def piece(i):
        if i == 0:
            assert release.wait(30)                  # the first finishes last
        finished.append(i)
        done.release()
        return i * i, threading.current_thread().name, workers.map_ordered(lambda j: threading.current_thread().name, [0, 1])

    with workers.limited(2):
        result = []
        caller = threading.Thread(target=lambda: result.append(workers.map_ordered(piece, range(4))))
        caller.start()
        for _ in range(3):                           # pieces 1-3 finish while piece 0 waits
            assert done.acquire(timeout=30)
        release.set()
        caller.join(30)
        out = result[0]
        assert [r[0] for r in out] == [0, 1, 4, 9] and finished[-1] == 0
        assert all(inner == [name, name] for _, name, inner in out)     # nested: inline, same thread

        def failing(i):
            if i == 1:
                raise ValueError("piece 1")
            finished.append(("done", i))
        finished.clear()
        with pytest.raises(ValueError, match="piece 1"):
            workers.map_ordered(failing, range(4))
        assert sorted(finished) == [("done", 0), ("done", 2), ("done", 3)]
    with workers.limited(1):
        assert workers.map_ordered(lambda i: threading.current_thread().name, range(3)) == \
            [threading.current_thread().name] * 3
    with pytest.raises(ValueError):
        with workers.limited(0):
            pass
