"""A small random Llama 3.2-style checkpoint (GQA, tied embeddings, llama3 rope scaling),
written by transformers' own save_pretrained: the oracle for our readers and model."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

TINY_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    bos_token_id=1, eos_token_id=2,
)


def write_tiny_llama(dest: Path, seed: int = 0, tokenizer_json: str | None = None, **overrides):
    """Save a random LlamaForCausalLM with a byte-ish word-level tokenizer (or the given
    tokenizers JSON, e.g. Llama 3's, with vocab_size to match); return the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_CONFIG, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # larger-than-default weights make the logits differ visibly
        for p in model.parameters():
            p.normal_(1.0, 0.1) if p.ndim == 1 else p.normal_(0.0, 0.08)   # norms near 1
    model.save_pretrained(dest, safe_serialization=True)
    if tokenizer_json is not None:
        (Path(dest) / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        return model
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(Path(dest) / "tokenizer.json"))
    return model
