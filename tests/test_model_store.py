"""Models by name: `edge-llm models`, `--model NAME`, `edge-llm rm`, XNNPACK caches that
belong to no bundle, re-conversion when a file inside a checkpoint changes, and bundle
permissions that follow the umask."""
from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from convert.convert import read_checkpoint
from convert.quantize import default_quant
from edge.launch import model_store
from edge.model.bundle import Bundle
from tests.tiny_llama import write_tiny_llama

EDGE = [sys.executable, "-m", "edge.cli"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_LLM_HOME", str(home))
    return home


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    src = tmp_path / "Tiny-Chat"
    write_tiny_llama(src, seed=3)             # not the weights of the tiny_bundle fixture
    return src


def cli(*args, home: Path, check=True, **kw):
    env = {**os.environ, "EDGE_LLM_HOME": str(home)}
    return subprocess.run([*EDGE, *args], capture_output=True, text=True, env=env, timeout=300, check=check, **kw)


def test_a_changed_file_inside_a_checkpoint_is_converted_again(store, checkpoint):
    logs = []
    first = model_store.resolve(str(checkpoint), quant="f32", log=logs.append)
    assert len(logs) == 1 and "once" in logs[0]
    old_graph = Bundle.open(first).manifest["files"]["model.tflite"]["sha256"]
    old_cache = model_store.weight_cache_dir(Bundle.open(first))

    assert model_store.resolve(str(checkpoint), quant="f32", log=logs.append) == first and len(logs) == 1
    weights = checkpoint / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))   # touched only
    assert model_store.resolve(str(checkpoint), quant="f32", log=logs.append) == first and len(logs) == 1

    # overwrite the weights inside the directory; the directory's own mtime is put back
    dir_times = checkpoint.stat()
    write_tiny_llama(checkpoint, seed=4)
    os.utime(checkpoint, ns=(dir_times.st_atime_ns, dir_times.st_mtime_ns))
    assert checkpoint.stat().st_mtime_ns == dir_times.st_mtime_ns
    again = model_store.resolve(str(checkpoint), quant="f32", log=logs.append)
    assert again == first and len(logs) == 2 and "checkpoint changed" in logs[1]
    assert Bundle.open(again).manifest["files"]["model.tflite"]["sha256"] != old_graph
    assert not old_cache.exists()             # the old graph's XNNPACK cache went with it


def test_models_list_model_by_name_and_rm(store, checkpoint, tiny_bundle):
    path = model_store.resolve(str(checkpoint), quant="f32", log=lambda m: None)
    name = path.name
    assert name.startswith("tiny-chat-f32-")

    out = cli("models", home=store).stdout
    assert name in out and "Tiny-Chat" in out and "f32" in out and str(checkpoint.resolve()) in out
    assert "not converted yet" in out                       # the default model, in this empty home

    # --model NAME: the whole name, the model's own name, a unique beginning, any case
    for spec in (name, "Tiny-Chat", "tiny-ch", "TINY-CHAT"):
        assert model_store.resolve(spec, log=lambda m: None) == path, spec
    answer = cli("run", "w1 w2", "-m", "tiny-chat", "-n", "3", "--temperature", "0", home=store)
    assert answer.returncode == 0 and answer.stdout.strip()
    missing = cli("run", "w1", "-m", "no-such-model", home=store, check=False)
    assert missing.returncode == 1 and "edge-llm models" in missing.stderr

    # caches: the bundle's own, one of a bundle outside the store (kept), one of nothing (removed)
    own = model_store.weight_cache_dir(Bundle.open(path))
    outside = model_store.weight_cache_dir(Bundle.open(tiny_bundle))
    orphan = model_store.caches_dir() / "0123456789abcdef"
    orphan.mkdir(parents=True)
    (orphan / "model-1-2-3.xnnpack").write_bytes(b"x" * 1000)
    assert model_store.orphan_caches() == [orphan]
    assert "1 belong to no bundle" in cli("models", home=store).stdout

    refused = cli("rm", "tiny-ch", home=store, check=False)        # rm wants the whole name
    assert refused.returncode == 1 and path.exists()
    done = cli("rm", name, home=store)
    assert f"removed {name}" in done.stdout
    assert not path.exists() and not own.exists() and not orphan.exists() and outside.exists()
    assert name not in cli("models", home=store).stdout


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_bundles_follow_the_umask(store, checkpoint, tmp_path, umask, dir_mode, file_mode):
    out = tmp_path / "bundle"
    subprocess.run([*EDGE, "convert", str(checkpoint), "-o", str(out), "--quant", "f32"], check=True,
                   capture_output=True, preexec_fn=lambda: os.umask(umask), timeout=300)
    # and a checkpoint converted into the cache on first use, with its XNNPACK cache
    subprocess.run([*EDGE, "run", "w1", "-m", str(checkpoint), "-n", "1"], check=True, capture_output=True,
                   preexec_fn=lambda: os.umask(umask), timeout=300, env={**os.environ, "EDGE_LLM_HOME": str(store)})
    (cached,) = model_store.stored_models()
    for bundle in (out, cached.path):
        assert stat.S_IMODE(bundle.stat().st_mode) == dir_mode, bundle
        for f in bundle.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == file_mode, f
    for d in (model_store.bundles_dir(), model_store.caches_dir(), *model_store.caches_dir().iterdir()):
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode, d
    packed = list(model_store.caches_dir().glob("*/*.xnnpack"))
    assert packed and all(stat.S_IMODE(f.stat().st_mode) == file_mode for f in packed)


def test_a_bundle_in_an_older_format_is_converted_again(store, checkpoint):
    """By path and by name: the cache's bundle of an older format is reconverted from its
    checkpoint, not refused."""
    import json
    from edge.model.bundle import FORMAT_VERSION, MANIFEST, manifest_digest
    logs = []
    first = model_store.resolve(str(checkpoint), quant="int8", log=logs.append)

    def age():
        m = json.loads((first / MANIFEST).read_text())
        m["format_version"] = FORMAT_VERSION - 1
        m["manifest_sha256"] = manifest_digest(m)
        (first / MANIFEST).write_text(json.dumps(m))

    age()
    assert model_store.resolve(str(checkpoint), quant="int8", log=logs.append) == first
    assert len(logs) == 2 and "bundle format changed" in logs[1]
    assert Bundle.open(first).manifest["format_version"] == FORMAT_VERSION
    age()
    assert model_store.resolve(first.name, quant="int8", log=logs.append) == first
    assert len(logs) == 3 and "bundle format changed" in logs[2]
    Bundle.open(first)


def test_the_default_quant_follows_the_checkpoints_size(store, checkpoint):
    """No --quant: int8 below half a billion parameters (the default SmolLM2-135M), int4 from
    there (Llama 3.2 1B): convert.quantize.default_quant, the one place this is decided."""
    path = model_store.resolve(str(checkpoint), log=lambda m: None)
    assert Bundle.open(path).manifest["quant"] == "int8" and "-int8-" in path.name
    tiny = read_checkpoint(checkpoint).config
    shape = dict(num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True)
    llama_1b = dataclasses.replace(tiny, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                   vocab_size=128256, **shape)
    smollm2 = dataclasses.replace(tiny, hidden_size=576, intermediate_size=1536, num_layers=30,
                                  vocab_size=49152, **{**shape, "num_heads": 9, "num_kv_heads": 3})
    assert 1.2e9 < llama_1b.parameter_count < 1.3e9 and 1.3e8 < smollm2.parameter_count < 1.4e8
    assert (default_quant(llama_1b.parameter_count), default_quant(smollm2.parameter_count)) == ("int4", "int8")
