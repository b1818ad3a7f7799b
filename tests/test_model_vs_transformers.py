"""Our HF reader + NumPy model against transformers' LlamaForCausalLM, logit for logit."""
import numpy as np
import pytest
import torch

from convert.hf_reader import read_hf
from edge.model.numpy_model import NumpyModel
from tests.tiny_llama import write_tiny_llama

TOL = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    ref = write_tiny_llama(d)
    return d, ref


def test_config_read_from_hf(tiny):
    cfg = read_hf(tiny[0]).config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (8, 2, 8)
    assert cfg.tie_word_embeddings and cfg.rope_scaling.factor == 32.0
    assert cfg.eos_token_ids == (2,)


@pytest.mark.parametrize("chunk", [40, 7])
def test_prefill_logits_match_every_position(tiny, chunk):
    d, ref = tiny
    ids = np.random.default_rng(1).integers(0, 256, size=40)
    with torch.no_grad():
        want = ref(torch.tensor(ids)[None]).logits[0].numpy()
    ckpt = read_hf(d)
    model = NumpyModel(ckpt.config, ckpt.tensor, max_ctx=128)
    cache = model.new_cache()
    got = np.concatenate([model.forward(ids[i:i + chunk], cache, all_logits=True)
                          for i in range(0, len(ids), chunk)])
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want).max() > 0.5   # the comparison is not between near-zero numbers


def test_decode_logits_match_greedy_steps(tiny):
    d, ref = tiny
    prompt = list(np.random.default_rng(2).integers(0, 256, size=12))
    ckpt = read_hf(d)
    model = NumpyModel(ckpt.config, ckpt.tensor, max_ctx=128)
    cache = model.new_cache()
    logits = model.forward(prompt, cache)
    seq = list(prompt)
    for _ in range(20):
        with torch.no_grad():
            want = ref(torch.tensor(seq)[None]).logits[0, -1].numpy()
        assert np.abs(logits - want).max() <= TOL
        seq.append(int(np.argmax(logits)))
        logits = model.forward([seq[-1]], cache)


def test_untied_lm_head(tmp_path):
    ref = write_tiny_llama(tmp_path, seed=3, tie_word_embeddings=False)
    ckpt = read_hf(tmp_path)
    assert "lm_head" in ckpt.names()
    ids = np.arange(10)
    with torch.no_grad():
        want = ref(torch.tensor(ids)[None]).logits[0].numpy()
    model = NumpyModel(ckpt.config, ckpt.tensor, max_ctx=32)
    got = model.forward(ids, model.new_cache(), all_logits=True)
    assert np.abs(got - want).max() <= TOL
