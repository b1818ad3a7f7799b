"""Read a GGUF file of architecture `llama` into a `Checkpoint`.

Tensors are dequantized by the `gguf` package one at a time. llama.cpp's converter permutes
the rows of attn_q / attn_k (interleaved RoPE pairs); we undo that so every checkpoint reaches
the model in Hugging Face's rotate-half layout. The tokenizer and chat template come from the
GGUF metadata.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gguf import TokenType

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


# Token texts llama.cpp treats as end of generation whatever the eos id says (llama-vocab.cpp,
# the Llama-family subset): a Llama 3 GGUF names one eos, but the model may end with any of these.
END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>")


def eos_token_ids(meta: dict) -> tuple[int, ...]:
    """eos/eot/eom ids from the metadata, then every control token spelled as an end of generation."""
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    tokens, types = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.token_type") or []
    ids += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == TokenType.CONTROL and t in END_OF_GENERATION_TEXTS]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _rope_scaling(path: Path, meta: dict) -> RopeScaling | None:
    """llama.rope.scaling.* as llama.cpp's convert_hf_to_gguf.py writes it for linear and yarn."""
    kind = meta.get("llama.rope.scaling.type")
    if kind is None and meta.get("llama.rope.scale_linear") is not None:     # older files
        return RopeScaling(factor=float(meta["llama.rope.scale_linear"]), rope_type="linear")
    if kind in (None, "none"):
        return None
    factor = meta.get("llama.rope.scaling.factor")
    if factor is None:
        raise CheckpointError(f"{path}: llama.rope.scaling.type {kind!r} without llama.rope.scaling.factor")
    if kind == "linear":
        return RopeScaling(factor=float(factor), rope_type="linear")
    if kind == "yarn":
        # llama.cpp scales attention by attn_factor on top of 0.1*ln(factor)+1, transformers uses
        # attention_factor instead of it: only the default (neither written) means the same in both.
        for key in ("yarn_attn_factor", "yarn_ext_factor", "yarn_log_multiplier"):
            if meta.get(f"llama.rope.scaling.{key}") is not None:
                raise CheckpointError(f"{path}: llama.rope.scaling.{key} is not supported")
        orig = meta.get("llama.rope.scaling.original_context_length")
        if orig is None:
            raise CheckpointError(f"{path}: yarn rope scaling without llama.rope.scaling.original_context_length")
        return RopeScaling(factor=float(factor), original_max_position_embeddings=int(orig), rope_type="yarn",
                           beta_fast=float(meta.get("llama.rope.scaling.yarn_beta_fast", 32.0)),
                           beta_slow=float(meta.get("llama.rope.scaling.yarn_beta_slow", 1.0)),
                           attention_factor=1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0)
    raise CheckpointError(f"{path}: llama.rope.scaling.type {kind!r} is not supported (only linear, yarn)")


def _refuse_unimplemented(path: Path, meta: dict, head_dim: int) -> None:
    """Metadata that changes the math of a llama-architecture GGUF and that we do not implement."""
    for key, want in (("rope.dimension_count", head_dim), ("attention.value_length", head_dim),
                      ("expert_count", 0)):
        got = meta.get(f"llama.{key}")
        if got is not None and int(got) != want:
            raise CheckpointError(f"{path}: llama.{key} = {got} is not supported (we run {want})")


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
    consumed = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"} | {
        f"blk.{i}.{g}.weight" for i in range(int(meta.get("llama.block_count", 0))) for g in _GGUF_NAMES.values()}
    unused = sorted(name for name in tensors if name not in consumed)
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        listed = f"tensor {unused[0]!r} is" if len(unused) == 1 else f"tensors {', '.join(map(repr, unused[:3]))}{more} are"
        raise CheckpointError(f"{path}: {listed} not used by the Llama model we run (refusing rather than ignoring)")

    def m(key, default=None):
        v = meta.get(f"llama.{key}", default)
        if v is None:
            raise CheckpointError(f"{path}: metadata llama.{key} is missing")
        return v

    D, heads = int(m("embedding_length")), int(m("attention.head_count"))
    kv_heads = int(m("attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", D // heads))
    theta = float(m("rope.freq_base", 10000.0))
    _refuse_unimplemented(path, meta, head_dim)
    scaling = _rope_scaling(path, meta)
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise CheckpointError(f"{path}: rope_freqs.weight together with llama.rope.scaling.type {scaling.rope_type!r}")
        scaling = _llama3_scaling_from_rope_freqs(path, _dequantize(path, tensors["rope_freqs.weight"]), head_dim, theta)
    try:
        tokenizer_json = tokenizer_json_from_gguf(meta)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    cfg = ModelConfig(
        vocab_size=int(meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
        hidden_size=D, intermediate_size=int(m("feed_forward_length")), num_layers=int(m("block_count")),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(m("context_length", 2048)), rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_token_ids(meta),
    )

    def loader(gguf_name: str, unpermute_heads: int = 0):
        def load():
            if gguf_name not in tensors:
                raise CheckpointError(f"{path}: tensor {gguf_name!r} is missing")
            w = _dequantize(path, tensors[gguf_name])
            return unpermute_rope_rows(w, unpermute_heads) if unpermute_heads else w
        return load

    stored = {"embed": "token_embd.weight", "final_norm": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        stored["lm_head"] = "output.weight"
    for i in range(cfg.num_layers):
        for short, g in _GGUF_NAMES.items():
            if f"blk.{i}.{g}.weight" in tensors:
                stored[f"layers.{i}.{short}"] = f"blk.{i}.{g}.weight"
    loaders = {name: loader(g, heads if name.endswith(".wq") else kv_heads if name.endswith(".wk") else 0)
               for name, g in stored.items()}
    tokens = meta.get("tokenizer.ggml.tokens", [])
    special = {}
    for key, meta_key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        if meta.get(meta_key) is not None and meta[meta_key] < len(tokens):
            special[key] = tokens[meta[meta_key]]
    ckpt = Checkpoint(config=cfg, source=str(path), loaders=loaders, tokenizer_json=tokenizer_json,
                      chat_template=meta.get("tokenizer.chat_template"), special_tokens=special,
                      add_bos=add_bos_token(meta),
                      stored_names={name: f"{g} of type {tensors[g].tensor_type.name}" for name, g in stored.items()
                                    if g in tensors})
    ckpt.validate()
    return ckpt


READ_CHUNK = 1 << 24      # bytes of the file per read while dequantizing


def _dequantize(path: Path, t) -> np.ndarray:
    """One tensor as a fresh float32 array, read and dequantized a chunk of rows at a time with
    plain file reads: the reader's memory map is not touched, so the pages of tensors already
    converted do not pile up in the resident set, and the `gguf` package's dequantizers (which
    make several temporaries of their input's size) only ever see one chunk."""
    import gguf
    shape = tuple(int(n) for n in reversed(t.shape))
    stored = t.data.shape                          # [rows, values or bytes per row]
    try:
        if len(stored) < 2:                        # norms, rope_freqs: small
            return np.asarray(gguf.dequantize(np.array(t.data), t.tensor_type), np.float32).reshape(shape)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be read: {e}") from e
    row_items = int(np.prod(stored[1:], dtype=np.int64))
    row_bytes = row_items * t.data.dtype.itemsize
    out = np.empty((stored[0], int(np.prod(shape[1:], dtype=np.int64))), np.float32)
    step = max(1, READ_CHUNK // max(row_bytes, 1))
    try:
        # damaged scales make NaN/inf here: Checkpoint.tensor refuses them by name, without numpy's warnings first
        with open(path, "rb") as f, np.errstate(invalid="ignore", over="ignore"):
            f.seek(t.data_offset)
            for lo in range(0, stored[0], step):
                n = min(step, stored[0] - lo)
                raw = np.fromfile(f, dtype=t.data.dtype, count=n * row_items)
                if raw.size != n * row_items:
                    raise CheckpointError(f"{path}: tensor {t.name!r} is truncated")
                out[lo:lo + n] = gguf.dequantize(raw.reshape((n,) + stored[1:]), t.tensor_type).reshape(n, -1)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be read: {e}") from e
    return out.reshape(shape)
