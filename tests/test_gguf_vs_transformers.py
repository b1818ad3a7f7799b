"""SmolLM2-135M-Instruct from its GGUF: our reader + NumPy model against transformers' own
GGUF loader (same dequantized weights), logits and a greedy continuation."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from convert.gguf_reader import read_gguf  # noqa: E402
from edge.model.numpy_model import NumpyModel  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(gguf_file=smollm2_gguf.name)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), torch_dtype=torch.float32, **kw).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    ckpt = read_gguf(smollm2_gguf)
    return NumpyModel(ckpt.config, ckpt.tensor, max_ctx=256)


def test_config(smollm2_gguf):
    cfg = read_gguf(smollm2_gguf).config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,)


def test_logits_match_transformers(reference, ours):
    tok, ref = reference
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = ours.forward(ids, ours.new_cache(), all_logits=True)
    diff = np.abs(got - want).max()
    print(f"max |logit diff| vs transformers over {len(ids)} positions: {diff:.2e}")
    assert diff <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_greedy_continuation_identical(reference, ours):
    tok, ref = reference
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):]
    cache = ours.new_cache()
    logits = ours.forward(ids, cache)
    got = []
    for _ in range(32):
        logits[2] = -np.inf            # as min_new_tokens does on transformers' side: no EOS yet
        got.append(int(np.argmax(logits)))
        logits = ours.forward([got[-1]], cache)
    assert got == want.tolist(), (tok.decode(got), tok.decode(want))
