"""What every weight matmul sees: a float forward pass over a short calibration text.

`matmul_inputs` runs the checkpoint's own float weights one layer at a time (a 1B model never
sits in memory whole) and yields, in order, the input of each group of matmuls that share
one input:

    layers.{i}.qkv      rmsnorm(x) * attn_norm       [T, D]      -> wq, wk, wv
    layers.{i}.wo       attention output             [T, H*hd]   -> wo
    layers.{i}.gate_up  rmsnorm(h) * ffn_norm        [T, D]      -> w_gate, w_up
    layers.{i}.down     silu(gate) * up              [T, F]      -> w_down
                        (block-rotated first when the graph does that: `down_rotation`)
    head                rmsnorm(x) * final_norm      [T, D]      -> lm_head

The text (convert/data/calibration.txt) is ours: everyday prose, Q&A, chat, code, numbers.
It is deliberately not the perplexity text in edge/data/perplexity/, so quality measured on
that text is not measured on what the scales were fitted to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from convert.rotation import rotate_blocks
from edge.attention import Attention
from edge.config import ModelConfig
from edge.kv_cache import KVCache
from edge.model_numpy import rms_norm, silu
from edge.rope import RopeTables

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
MAX_TOKENS = 512
MIN_DISTINCT = 64      # fewer distinct ids means the tokenizer cannot read the text (e.g. all <unk>)


def calibration_tokens(tokenizer_json: str, bos: int | None) -> np.ndarray | None:
    """The calibration text's first MAX_TOKENS ids, or None when the tokenizer cannot read
    it: scales fitted to a stream of <unk> would fit nothing the model will ever see."""
    from tokenizers import Tokenizer
    text = CALIBRATION_TEXT.read_text(encoding="utf-8")
    ids = Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids
    ids = (([bos] if bos is not None else []) + ids)[:MAX_TOKENS]
    return np.array(ids, dtype=np.int64) if len(set(ids)) >= MIN_DISTINCT else None


def matmul_inputs(get: Callable[[str], np.ndarray], cfg: ModelConfig, tokens: np.ndarray,
                  down_rotation: np.ndarray | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (group name, float32 input [T, K]) for every matmul group, layer by layer."""
    T, eps = len(tokens), cfg.rms_norm_eps
    attention = Attention(cfg, RopeTables(cfg, T))
    cache = KVCache(cfg, T)
    x = get("embed")[tokens]
    for i in range(cfg.num_layers):
        w = lambda name: get(f"layers.{i}.{name}")
        n = rms_norm(x, w("attn_norm"), eps)
        yield f"layers.{i}.qkv", n
        qkv = n @ np.concatenate([w("wq"), w("wk"), w("wv")]).T
        attn = attention(i, qkv, cache, 0)
        yield f"layers.{i}.wo", attn
        x = x + attn @ w("wo").T
        n = rms_norm(x, w("ffn_norm"), eps)
        yield f"layers.{i}.gate_up", n
        a = silu(n @ w("w_gate").T) * (n @ w("w_up").T)
        if down_rotation is not None:
            a = rotate_blocks(a, down_rotation)
        yield f"layers.{i}.down", a
        x = x + a @ w("w_down").T
    yield "head", rms_norm(x, get("final_norm"), eps)
