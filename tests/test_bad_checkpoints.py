"""Every checkpoint we cannot use is refused with a message naming the file and the problem,
and a failed conversion leaves nothing behind."""
import json
import shutil

import numpy as np
import pytest

from convert.checkpoint import CheckpointError
from convert.convert import convert, read_checkpoint
from tests.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    write_tiny_llama(d)
    return d


@pytest.fixture
def ckpt(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    return d


def refused(src, *words):
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(src).validate()
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_other_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    refused(ckpt, "config.json", "GPT2LMHeadModel", "not supported")


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file(ckpt, missing):
    (ckpt / missing).unlink()
    refused(ckpt, str(ckpt / missing) if missing != "model.safetensors" else str(ckpt), "missing" if missing != "model.safetensors" else "model.safetensors")


def test_truncated_tensor_data(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    refused(ckpt, "model.safetensors", "truncated")


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    refused(ckpt, "model.safetensors")


def test_shape_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 128          # the stored MLP matrices are 160 wide
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="w_gate.*shape"):
        read_checkpoint(ckpt).tensor("layers.0.w_gate")


def test_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    refused(f, "notes.txt", "neither a GGUF")
    refused(tmp_path / "nope", "no such file")


def test_failed_conversion_leaves_nothing(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError):
        convert(ckpt, out, quiet=True)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _tiny_gguf(path, arch="llama", truncate=0):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        path.write_bytes(path.read_bytes()[:-truncate])


def test_gguf_other_architecture(tmp_path):
    f = tmp_path / "m.gguf"
    _tiny_gguf(f, arch="gpt2")
    refused(f, "m.gguf", "'gpt2'", "not supported")


def test_gguf_truncated(tmp_path):
    f = tmp_path / "m.gguf"
    _tiny_gguf(f, truncate=64)
    refused(f, "m.gguf")


def test_gguf_garbage(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    refused(f, "m.gguf", "not a readable GGUF")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_safetensors_tensor_is_refused_by_name(ckpt, tmp_path, bad):
    from safetensors.numpy import load_file, save_file
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    w = tensors["model.layers.1.mlp.down_proj.weight"].copy()
    w[3, 5] = bad
    tensors["model.layers.1.mlp.down_proj.weight"] = w
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt).tensor("layers.1.w_down")
    msg = str(e.value)
    assert "'layers.1.w_down'" in msg and "model.layers.1.mlp.down_proj.weight in model.safetensors" in msg, msg
    assert "1 non-finite" in msg, msg
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="layers.1.w_down"):
        convert(ckpt, out, quant="int8", quiet=True)
    assert not out.exists()


def test_gguf_with_random_tensor_bytes_is_refused_by_name(smollm2_gguf, tmp_path):
    """A real GGUF whose attn_k data of layer 3 is replaced with random bytes: its Q4_1 blocks'
    f16 scales hit NaN/infinity bit patterns, which dequantize to non-finite weights."""
    import gguf
    t = next(t for t in gguf.GGUFReader(smollm2_gguf).tensors if t.name == "blk.3.attn_k.weight")
    data = bytearray(smollm2_gguf.read_bytes())
    data[t.data_offset:t.data_offset + t.n_bytes] = np.random.default_rng(0).bytes(t.n_bytes)
    f = tmp_path / "random.gguf"
    f.write_bytes(bytes(data))
    from convert.gguf_reader import read_gguf
    ckpt = read_gguf(f)
    assert np.isfinite(ckpt.tensor("layers.3.wq")).all()       # the untouched tensors still read
    with pytest.raises(CheckpointError) as e:
        ckpt.tensor("layers.3.wk")
    msg = str(e.value)
    assert "random.gguf" in msg and "'layers.3.wk' (blk.3.attn_k.weight of type Q4_1)" in msg and "non-finite" in msg, msg
