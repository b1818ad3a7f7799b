"""A Llama-3.2-1B- or 3B-shaped model with random weights, for the speed comparison with
llama.cpp (bench/compare_llamacpp.py): Llama 3's tokenizer.json rebuilt from Meta's pinned
tokenizer.model, a Hugging Face checkpoint (f16 safetensors, one shard per layer so RAM
stays modest) and the same tensors as an F16 GGUF with the metadata llama.cpp's
convert_hf_to_gguf.py writes for Llama 3.2 (rope_freqs.weight, llama-bpe vocabulary, Q/K rows
permuted the llama.cpp way). Each writer is skipped when its output exists.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), with random weights.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "initializer_range": 0.02,
    "torch_dtype": "float16",
}
# Llama-3.2-3B's shape (meta-llama/Llama-3.2-3B config.json): the 1B's rope, vocab and tying.
LLAMA_3_2_3B = {**LLAMA_3_2_1B, "hidden_size": 3072, "num_hidden_layers": 28,
                "num_attention_heads": 24, "head_dim": 128}
SHAPES = {   # --shape -> (config, model name in the workdir, GGUF general.name, GGUF size label)
    "1b": (LLAMA_3_2_1B, "llama-3.2-1b-random", "Llama 3.2 1B (random weights)", "1.2B"),
    "3b": (LLAMA_3_2_3B, "llama-3.2-3b-random", "Llama 3.2 3B (random weights)", "3.2B"),
}
LAYER_TENSORS = {   # HF name -> (GGUF name, shape as (rows, cols) of the HF weight)
    "input_layernorm": ("attn_norm", lambda c: (c["hidden_size"],)),
    "self_attn.q_proj": ("attn_q", lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"])),
    "self_attn.k_proj": ("attn_k", lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"])),
    "self_attn.v_proj": ("attn_v", lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"])),
    "self_attn.o_proj": ("attn_output", lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"])),
    "post_attention_layernorm": ("ffn_norm", lambda c: (c["hidden_size"],)),
    "mlp.gate_proj": ("ffn_gate", lambda c: (c["intermediate_size"], c["hidden_size"])),
    "mlp.up_proj": ("ffn_up", lambda c: (c["intermediate_size"], c["hidden_size"])),
    "mlp.down_proj": ("ffn_down", lambda c: (c["hidden_size"], c["intermediate_size"])),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of `final`; rename it to `final` when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))


def _mb(path: Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


# ---------------------------------------------------------------- 1. tokenizer

def fetch_tokenizer_json(workdir: Path) -> str:
    """Llama 3's tokenizer.json, rebuilt from Meta's tokenizer.model (pinned wheel on PyPI)."""
    out = workdir / "tokenizer" / "tokenizer.json"
    if out.exists():
        return out.read_text(encoding="utf-8")
    from convert.llama3_tokenizer import tokenizer_json_from_tiktoken
    from edge.launch.wheel_fetch import LLAMA3_TIKTOKEN_MODEL, fetch
    model = fetch(LLAMA3_TIKTOKEN_MODEL, out.parent, log=log)
    log("building tokenizer.json from tokenizer.model ...")
    text = tokenizer_json_from_tiktoken(model)
    tmp = out.with_suffix(".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return text


# ---------------------------------------------------------------- 2. HF checkpoint

def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_hf_checkpoint(hf_dir: Path, tokenizer_json: str, seed: int = 0, std: float = 0.02,
                        config: dict = LLAMA_3_2_1B) -> Path:
    """A Llama-3.2-shaped HF directory (`config`: the 1B's or the 3B's shape): random
    normal(0, std) f16 weights, norms = 1.

    Shard 1 holds the embedding and the final norm, the other shards one decoder layer each
    (model.safetensors.index.json maps them), so only one layer is in memory at a time."""
    if (hf_dir / "model.safetensors.index.json").exists():
        return hf_dir
    from safetensors.numpy import save_file
    c = config
    log(f"writing a random Llama-3.2-shaped checkpoint ({c['hidden_size']} hidden, "
        f"{c['num_hidden_layers']} layers) to {hf_dir} ...")
    t0 = time.perf_counter()
    tmp = _atomic_dir(hf_dir)
    rng = np.random.default_rng(seed)

    def normal(shape) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float16)

    def ones(shape) -> np.ndarray:
        return np.ones(shape, dtype=np.float16)

    n_shards = 1 + c["num_hidden_layers"]
    weight_map, total = {}, 0
    shards = [{"model.embed_tokens.weight": normal((c["vocab_size"], c["hidden_size"])),
               "model.norm.weight": ones((c["hidden_size"],))}]
    for i in range(n_shards):
        tensors = shards.pop() if i == 0 else {
            f"model.layers.{i - 1}.{name}.weight": (ones if len(shape(c)) == 1 else normal)(shape(c))
            for name, (_, shape) in LAYER_TENSORS.items()}
        save_file(tensors, str(tmp / _shard_name(i, n_shards)), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = _shard_name(i, n_shards)
            total += v.nbytes
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(c, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": 128001, "do_sample": True, "temperature": 0.6, "top_p": 0.9},
        indent=2))
    (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "model_max_length": 131072,
         "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}, indent=2))
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    tmp.rename(hf_dir)
    log(f"  {total / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    return hf_dir


# ---------------------------------------------------------------- 3. F16 GGUF

def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`: per head, rows (2, pair) -> (pair, 2).
    `convert.gguf_reader.unpermute_rope_rows` is its inverse."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(c: dict) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors makes it."""
    rs, dim = c["rope_scaling"], c["head_dim"]
    freqs = 1.0 / (np.float32(c["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    low_wavelen = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wavelen = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rs["factor"])
        else:
            smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def _gguf_tensor_plan(c: dict) -> list[tuple[str, str | None, int]]:
    """(GGUF name, HF name or None for rope_freqs, heads to permute by or 0) in file order."""
    plan = [("rope_freqs.weight", None, 0), ("token_embd.weight", "model.embed_tokens.weight", 0)]
    for i in range(c["num_hidden_layers"]):
        for hf, (g, _) in LAYER_TENSORS.items():
            heads = {"attn_q": c["num_attention_heads"], "attn_k": c["num_key_value_heads"]}.get(g, 0)
            plan.append((f"blk.{i}.{g}.weight", f"model.layers.{i}.{hf}.weight", heads))
    plan.append(("output_norm.weight", "model.norm.weight", 0))
    return plan


def write_f16_gguf(hf_dir: Path, gguf_path: Path, tokenizer_json: str,
                   name: str = SHAPES["1b"][2], size_label: str = SHAPES["1b"][3]) -> Path:
    """The HF checkpoint's tensors as an F16 GGUF (1-D tensors F32, as convert_hf_to_gguf.py
    writes them), streamed one tensor at a time."""
    if gguf_path.exists():
        return gguf_path
    import gguf
    from safetensors import safe_open
    from convert.llama3_tokenizer import write_llama3_vocab_to_gguf
    c = json.loads((hf_dir / "config.json").read_text())
    weight_map = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    log(f"writing {gguf_path} ...")
    t0 = time.perf_counter()
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    part = gguf_path.with_name(gguf_path.name + ".part")
    w = gguf.GGUFWriter(part, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_size_label(size_label)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(c["vocab_size"])
    w.add_rope_dimension_count(c["head_dim"])
    write_llama3_vocab_to_gguf(w, tokenizer_json)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    plan = _gguf_tensor_plan(c)
    shapes = {}
    for name, hf, _ in plan:
        if hf is None:
            shape, dtype = (c["head_dim"] // 2,), np.float32
        else:
            with safe_open(hf_dir / weight_map[hf], framework="numpy") as f:
                shape = tuple(f.get_slice(hf).get_shape())
            dtype = np.float32 if len(shape) == 1 else np.float16
        shapes[name] = shape
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, hf, heads in plan:
        if hf is None:
            t = llama3_rope_factors(c)
        else:
            with safe_open(hf_dir / weight_map[hf], framework="numpy") as f:
                t = f.get_tensor(hf)
            t = t.astype(np.float32) if t.ndim == 1 else t.astype(np.float16, copy=False)
            if heads:
                t = permute_rope_rows(t, heads)
        assert t.shape == shapes[name], (name, t.shape, shapes[name])
        w.write_tensor_data(np.ascontiguousarray(t))
    w.close()
    os.replace(part, gguf_path)
    log(f"  {_mb(gguf_path):.0f} MB in {time.perf_counter() - t0:.0f} s")
    return gguf_path
