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
from edge.model.attention import Attention
from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache
from edge.model.numpy_model import layer_weights, llama_layer, rms_norm
from edge.model.rope import RopeTables

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
    """Yield (group name, float32 input [T, K]) for every matmul group, layer by layer: the
    reference model's own `llama_layer`, observed."""
    T, eps = len(tokens), cfg.rms_norm_eps
    attention = Attention(cfg, RopeTables(cfg, T))
    cache = KVCache(cfg, T)
    x = get("embed")[tokens]
    for i in range(cfg.num_layers):
        seen: list[tuple[str, np.ndarray]] = []

        def observe(group: str, v: np.ndarray) -> np.ndarray:
            if group == "down" and down_rotation is not None:
                v = rotate_blocks(v, down_rotation)      # what the graph's block rotation feeds w_down
            seen.append((f"layers.{i}.{group}", v))
            return v

        x = llama_layer(x, layer_weights(get, i), lambda qkv: attention(i, qkv, cache, 0), eps, observe)
        yield from seen
    yield "head", rms_norm(x, get("final_norm"), eps)
