"""Llama variants a new user may bring: each one runs exactly as transformers runs it, or is
refused with a message naming the config field, metadata key or tensor. GGUFs are written by
llama.cpp's own convert_hf_to_gguf.py, as users get them."""
import json

import numpy as np
import pytest
import torch

from convert.checkpoint import CheckpointError
from convert.gguf_reader import read_gguf
from convert.hf_reader import read_hf
from edge.model.numpy_model import NumpyModel
from tests.tiny_llama import write_tiny_llama

TOL = 1e-4
LLAMA3_EOS = (128001, 128008, 128009)   # Llama 3.1/3.2 Instruct's generation_config.json


def max_dlogit(ckpt, ref, n: int = 300, vocab: int = 256) -> float:
    """Largest |Δlogit| against transformers over n positions (past the yarn/linear bounds)."""
    ids = np.random.default_rng(1).integers(0, vocab, size=n)
    with torch.no_grad():
        want = ref(torch.tensor(ids)[None]).logits[0].numpy()
    model = NumpyModel(ckpt.config, ckpt.tensor, max_ctx=n)
    got = model.forward(ids, model.new_cache(), all_logits=True)
    assert np.abs(want).max() > 0.5     # not a comparison between near-zero numbers
    return float(np.abs(got - want).max())


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        cfg.pop(k)
    (d / "config.json").write_text(json.dumps(cfg))


def refused(read, path, *words):
    with pytest.raises(CheckpointError) as e:
        read(path)
    for w in words:
        assert w in str(e.value), str(e.value)


# ---------------------------------------------------------------- variants we do not implement

@pytest.mark.parametrize("override, named", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_variant_that_changes_the_math_is_refused(tmp_path, override, named):
    ref = write_tiny_llama(tmp_path, **override)
    plain = write_tiny_llama(tmp_path / "plain")
    ids = torch.arange(20)[None]
    with torch.no_grad():   # the variant really changes transformers' output: ignoring it is wrong
        assert (ref(ids).logits - plain(ids).logits).abs().max() > 0.1
    refused(read_hf, tmp_path, "config.json", named)


def test_bias_tensors_are_refused_even_if_the_config_hides_them(tmp_path):
    write_tiny_llama(tmp_path, attention_bias=True)
    edit_config(tmp_path, attention_bias=False)
    refused(read_hf, tmp_path, "model.safetensors", "'model.layers.0.self_attn.k_proj.bias' (and 11 more)", "not used")


def test_gguf_bias_tensors_are_refused(tmp_path, llama3_tokenizer_json, llamacpp_convert):
    write_tiny_llama(tmp_path, tokenizer_json=llama3_tokenizer_json, vocab_size=128256, attention_bias=True,
                     rope_scaling=None)
    gguf = llamacpp_convert(tmp_path, tmp_path / "model.gguf")
    refused(read_gguf, gguf, "'blk.0.attn_k.bias'", "not used")


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_dynamic_rope_is_refused_in_both_spellings(tmp_path, spelling):
    write_tiny_llama(tmp_path)
    changes = {"rope_parameters": None, "rope_scaling": None, "rope_theta": 500000.0}
    changes[spelling] = {"rope_type": "dynamic", "factor": 2.0}
    edit_config(tmp_path, **changes)
    refused(read_hf, tmp_path, spelling, "'dynamic'", "not supported")


# ---------------------------------------------------------------- RoPE scaling run exactly

LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# head_dim 16 and theta 10000 put yarn's ramp across several frequency pairs
YARN_SHAPE = dict(num_attention_heads=4, head_dim=16, rope_theta=10000.0)


def test_linear_rope_via_rope_parameters(tmp_path):
    ref = write_tiny_llama(tmp_path, rope_scaling=LINEAR)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    ckpt = read_hf(tmp_path)
    assert ckpt.config.rope_scaling.rope_type == "linear"
    assert max_dlogit(ckpt, ref) <= TOL


def test_linear_rope_via_old_rope_scaling_spelling(tmp_path):
    write_tiny_llama(tmp_path, rope_scaling=LINEAR)
    edit_config(tmp_path, rope_parameters=None, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    from transformers import LlamaForCausalLM
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()   # transformers reads it too
    assert ref.config.rope_parameters["rope_type"] == "linear"
    assert max_dlogit(read_hf(tmp_path), ref) <= TOL


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 16.0, "beta_slow": 2.0}, {"attention_factor": 1.3},
                                   {"mscale": 0.9, "mscale_all_dim": 0.5}, {"truncate": False}])
def test_yarn_rope(tmp_path, extra):
    ref = write_tiny_llama(tmp_path, rope_scaling={**YARN, **extra}, **YARN_SHAPE)
    ckpt = read_hf(tmp_path)
    assert ckpt.config.rope_scaling.rope_type == "yarn"
    assert max_dlogit(ckpt, ref) <= TOL


def write_llama3_instruct_like(d, tokenizer_json, **overrides):
    """A tiny model with Llama 3's vocabulary and Llama 3.2 Instruct's special-token files."""
    ref = write_tiny_llama(d, tokenizer_json=tokenizer_json, vocab_size=128256, bos_token_id=128000,
                           eos_token_id=list(LLAMA3_EOS), **overrides)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": list(LLAMA3_EOS)}))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return ref


@pytest.fixture(scope="module", params=["linear", "yarn"])
def llamacpp_gguf(request, tmp_path_factory, llama3_tokenizer_json, llamacpp_convert):
    """(HF dir, transformers model, our reading of the GGUF llama.cpp's converter writes from it)."""
    d = tmp_path_factory.mktemp(f"llama3-{request.param}")
    ref = write_llama3_instruct_like(d, llama3_tokenizer_json, rope_scaling={"linear": LINEAR, "yarn": YARN}[request.param],
                                     **YARN_SHAPE)
    return d, ref, read_gguf(llamacpp_convert(d, d / "model.gguf"))


def test_rope_scaling_via_llamacpp_gguf(llamacpp_gguf):
    d, ref, ckpt = llamacpp_gguf
    assert ckpt.config.rope_scaling == read_hf(d).config.rope_scaling
    assert max_dlogit(ckpt, ref, vocab=128000) <= TOL


def test_gguf_yarn_attention_factor_is_refused(tmp_path, llama3_tokenizer_json, llamacpp_convert):
    # llama.cpp multiplies its attn_factor into 0.1*ln(factor)+1, transformers replaces it: not the same model
    write_tiny_llama(tmp_path, tokenizer_json=llama3_tokenizer_json, vocab_size=128256,
                     rope_scaling={**YARN, "attention_factor": 1.3}, **YARN_SHAPE)
    gguf = llamacpp_convert(tmp_path, tmp_path / "model.gguf")
    refused(read_gguf, gguf, "llama.rope.scaling.yarn_attn_factor", "not supported")


# ---------------------------------------------------------------- stop tokens

def test_llamacpp_llama3_gguf_has_the_hf_eos_set(llamacpp_gguf):
    d, _, ckpt = llamacpp_gguf
    assert ckpt.special_tokens["eos_token"] == "<|eot_id|>"     # the file names one eos only
    hf = read_hf(d).config.eos_token_ids
    assert sorted(hf) == list(LLAMA3_EOS)
    assert sorted(ckpt.config.eos_token_ids) == sorted(hf)


def test_saved_inv_freq_buffers_are_accepted(tmp_path):
    # older exporters save rotary_emb.inv_freq; it is recomputed from the config, not a weight
    from safetensors.torch import load_file, save_file
    ref = write_tiny_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert max_dlogit(read_hf(tmp_path), ref) <= TOL


@pytest.mark.parametrize("key, value, named", [
    ("rope.dimension_count", 4, "llama.rope.dimension_count = 4"),
    ("attention.value_length", 16, "llama.attention.value_length = 16"),
    ("expert_count", 8, "llama.expert_count = 8"),
    ("rope.scaling.type", "longrope", "llama.rope.scaling.type 'longrope'"),
])
def test_gguf_metadata_that_changes_the_math_is_refused(tmp_path, key, value, named):
    import gguf
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    for k, v in {"embedding_length": 64, "attention.head_count": 8, "block_count": 1,
                 "feed_forward_length": 160, key: value}.items():
        (w.add_string if isinstance(v, str) else w.add_uint32)(f"llama.{k}", v)
    w.add_float32("llama.rope.scaling.factor", 4.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(read_gguf, tmp_path / "m.gguf", named, "not supported")
