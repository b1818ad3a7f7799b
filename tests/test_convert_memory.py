"""Conversion in bounded memory: the peak RSS of `convert` grows with the largest tensor, not
with the model. A Llama 3-vocabulary checkpoint (its tokenizer reads the calibration text, so
calibration and smoothing run) whose tied [128256, 512] embedding is most of its weights:
one float32 copy of it is 263 MB, and the code before this bound held five at once."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
V, D, F, L, H, KV, HD = 128256, 512, 1024, 2, 8, 2, 64


def _write_checkpoint(dest: Path, tokenizer_json: str) -> int:
    """A random LlamaForCausalLM directory (float32 safetensors); returns its largest tensor's
    float32 bytes."""
    from safetensors.numpy import save_file
    dest.mkdir()
    rng = np.random.default_rng(0)
    w = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.05)
    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": np.ones(D, np.float32),
              p + "post_attention_layernorm.weight": np.ones(D, np.float32),
              p + "self_attn.q_proj.weight": w(H * HD, D), p + "self_attn.k_proj.weight": w(KV * HD, D),
              p + "self_attn.v_proj.weight": w(KV * HD, D), p + "self_attn.o_proj.weight": w(D, H * HD),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
              p + "mlp.down_proj.weight": w(D, F)}
    save_file(t, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
        "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H,
        "num_key_value_heads": KV, "head_dim": HD, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": 128001}))
    (dest / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return max(a.nbytes for a in t.values())


def _peak_rss(code: str) -> int:
    """Peak RSS in bytes of a fresh Python process running `code`: measured by a parent of its
    own, with getrusage(RUSAGE_CHILDREN), so no earlier child of the test process counts."""
    parent = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", parent, code], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1]) * 1024          # Linux reports KiB


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory, llama3_tokenizer_json):
    src = tmp_path_factory.mktemp("mid") / "ckpt"
    return src, _write_checkpoint(src, llama3_tokenizer_json)


@pytest.mark.parametrize("quant", ["int8"])          # rotation + smoothing: the most transforms
def test_conversion_peak_rss_is_bounded_by_the_largest_tensor(mid_checkpoint, tmp_path, quant):
    src, largest = mid_checkpoint
    setup = ("import convert.llama_graph, convert.smoothing, convert.calibration, convert.rotation, "
             "edge.model.numpy_model; from convert.convert import convert, read_checkpoint; "
             "import ai_edge_litert.schema_py_generated; from tokenizers import Tokenizer; "
             f"c = read_checkpoint({str(src)!r}); c.tensor('layers.0.w_up'); Tokenizer.from_str(c.tokenizer_json)")
    base = _peak_rss(setup)                 # interpreter, libraries, tokenizer: no weights yet
    peak = _peak_rss(setup + f"; convert({str(src)!r}, {str(tmp_path / 'b')!r}, quant={quant!r}, quiet=True)")
    from edge.model.bundle import Bundle
    b = Bundle.open(tmp_path / "b")
    assert b.manifest["smoothing"]                           # calibration ran
    extra = peak - base
    print(f"{quant}: peak {peak / 2**20:.0f} MiB, {extra / 2**20:.0f} MiB above the libraries, "
          f"largest tensor {largest / 2**20:.0f} MiB")
    # one float32 copy of the largest tensor, its quantized form, chunk temporaries, the
    # tokenizer's calibration parse, and one smoothing candidate's temporaries per core
    # (measured 1.54x with the candidates tried one at a time, 1.61x with one per core on 2
    # cores; a second copy of the largest tensor would be 2x and more), plus one layer's GPTQ
    # calibration inputs made ahead of the rounding (convert/sweep.py)
    from convert.calibration import GPTQ_TOKENS
    layer_inputs = GPTQ_TOKENS * (D + H * HD + D + F) * 4          # qkv, wo, gate_up, down inputs
    assert layer_inputs < 0.2 * largest
    assert extra <= 1.7 * largest + layer_inputs
