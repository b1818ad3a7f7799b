"""Read a GGUF file of architecture `llama` into a `Checkpoint`.

Tensors are dequantized by the `gguf` package one at a time. llama.cpp's converter permutes
the rows of attn_q / attn_k (interleaved RoPE pairs); we undo that so every checkpoint reaches
the model in Hugging Face's rotate-half layout. The tokenizer and chat template come from the
GGUF metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint, CheckpointError
from convert.gguf_metadata import read_metadata
from convert.gguf_tokenizer import add_bos_token, tokenizer_json_from_gguf
from edge.model.config import ModelConfig, RopeScaling
from edge.model.rope import inverse_frequencies

_GGUF_NAMES = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (pair, 2) -> (2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:   # the gguf package raises assorted errors on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _llama3_scaling_from_rope_freqs(path, factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling:
    """llama.cpp stores llama3 scaling as per-frequency divisors; recover the parameters."""
    base = inverse_frequencies(head_dim, theta, None)
    for factor in (32.0, 16.0, 8.0, 4.0):
        for orig in (8192, 16384, 4096):
            s = RopeScaling(factor, 1.0, 4.0, orig)
            if np.allclose(base / inverse_frequencies(head_dim, theta, s), factors, rtol=1e-3):
                return s
    raise CheckpointError(f"{path}: rope_freqs.weight does not match any llama3 rope scaling we know")


def read_gguf(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    reader = _open(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    try:
        tokenizer_json = tokenizer_json_from_gguf(meta)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e

    def m(key, default=None):
        v = meta.get(f"llama.{key}", default)
        if v is None:
            raise CheckpointError(f"{path}: metadata llama.{key} is missing")
        return v

    D, heads = int(m("embedding_length")), int(m("attention.head_count"))
    kv_heads = int(m("attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", D // heads))
    theta = float(m("rope.freq_base", 10000.0))
    scaling = None
    if "rope_freqs.weight" in tensors:
        scaling = _llama3_scaling_from_rope_freqs(path, _dequantize(path, tensors["rope_freqs.weight"]), head_dim, theta)
    eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"),
           meta.get("tokenizer.ggml.eom_token_id")]
    cfg = ModelConfig(
        vocab_size=int(meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
        hidden_size=D, intermediate_size=int(m("feed_forward_length")), num_layers=int(m("block_count")),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(m("context_length", 2048)), rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )

    def loader(gguf_name: str, unpermute_heads: int = 0):
        def load():
            if gguf_name not in tensors:
                raise CheckpointError(f"{path}: tensor {gguf_name!r} is missing")
            w = _dequantize(path, tensors[gguf_name])
            return unpermute_rope_rows(w, unpermute_heads) if unpermute_heads else w
        return load

    loaders = {"embed": loader("token_embd.weight"), "final_norm": loader("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        loaders["lm_head"] = loader("output.weight")
    for i in range(cfg.num_layers):
        for short, g in _GGUF_NAMES.items():
            if f"blk.{i}.{g}.weight" in tensors:
                perm = heads if short == "wq" else kv_heads if short == "wk" else 0
                loaders[f"layers.{i}.{short}"] = loader(f"blk.{i}.{g}.weight", perm)
    tokens = meta.get("tokenizer.ggml.tokens", [])
    special = {}
    for key, meta_key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        if meta.get(meta_key) is not None and meta[meta_key] < len(tokens):
            special[key] = tokens[meta[meta_key]]
    ckpt = Checkpoint(config=cfg, source=str(path), loaders=loaders, tokenizer_json=tokenizer_json,
                      chat_template=meta.get("tokenizer.chat_template"), special_tokens=special,
                      add_bos=add_bos_token(meta))
    ckpt.validate()
    return ckpt


def _dequantize(path: Path, t) -> np.ndarray:
    import gguf
    try:
        w = gguf.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be read: {e}") from e
    return np.asarray(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
