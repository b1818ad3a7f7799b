"""Quantized SmolLM2 bundles against the float NumPy reference on the shipped text (its first
1024 tokens, ctx 256), converted as users get them: rotation + smoothing + GPTQ, and for
int4 an int4-b32 lm_head and int8 w_down in the first and last layers.

Targets (met on the whole text: docs/QUANTIZATION.md): perplexity within +1 % of
f32 for int8, and no worse than llama.cpp Q4_0's increase over F16 on the same text (+21.2 %,
measured with llama-perplexity) for both 4-bit schemes. The top-1 bounds are the figures
measured here less a margin, so a regression fails: llama.cpp's own top-1 (Q8_0 95.9 %, Q4_0
68.8 %) is on the whole text, which this test does not score.
"""
from pathlib import Path

import numpy as np
import pytest

from convert.convert import convert
from convert.gguf_reader import read_gguf
from edge.model.bundle import Bundle
from edge.engine.engine import load_backend
from edge.model.numpy_model import NumpyModel
from edge.cli.perplexity import perplexity

TEXT = Path(__file__).parents[1] / "edge" / "data" / "perplexity" / "shakespeare-coriolanus.txt"
CTX, STRIDE, N_TOKENS = 256, 128, 1024


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    ckpt = read_gguf(smollm2_gguf)
    from tokenizers import Tokenizer
    ids = Tokenizer.from_str(ckpt.tokenizer_json).encode(TEXT.read_text()).ids[:N_TOKENS]
    model = NumpyModel(ckpt.config, ckpt.tensor, CTX)
    ppl, n, top1 = perplexity(model, ids, CTX, STRIDE)
    return ids, ppl, np.array(top1)


# measured (1023 positions): int8 0.962 / -0.3 %, int4 0.707 / +14.1 % (0.685 / +15.2 % with an int4 head, every matrix int4), int4-b32 0.783 / +10.3 %
# (int4-b32 round-to-nearest: 0.759 / +8.4 % here, worse on the whole text: docs/QUANTIZATION.md)
# (round-to-nearest with an int8 head: int8 0.950 / +0.08 %, int4 0.626 / +31.5 %; plain round-to-nearest: int8 0.879 / +2.5 %, int4 0.389 / +173 %, int4-b32 0.654 / +25 %)
@pytest.mark.parametrize("quant,min_agree,max_ppl_increase", [
    ("int8", 0.94, 0.01), ("int4", 0.66, 0.212), ("int4-b32", 0.72, 0.212)])
def test_top1_agreement(smollm2_gguf, reference, tmp_path, quant, min_agree, max_ppl_increase):
    ids, ref_ppl, ref_top1 = reference
    bundle = Bundle.open(convert(smollm2_gguf, tmp_path / quant, quant=quant, quiet=True))
    ppl, n, top1 = perplexity(load_backend(bundle, "litert", CTX, 2), ids, CTX, STRIDE)
    agree = float(np.mean(np.array(top1) == ref_top1))
    print(f"{quant}: top-1 agreement {agree:.3f} over {n} positions, ppl {ppl:.3f} vs f32 {ref_ppl:.3f}")
    assert n == len(ref_top1) > 900
    assert agree >= min_agree
    assert ppl <= ref_ppl * (1 + max_ppl_increase)
