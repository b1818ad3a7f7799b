"""What every weight matmul sees: a float forward pass over our calibration text.

`matmul_inputs` runs the checkpoint's own float weights one layer at a time (a 1B model never
sits in memory whole) and yields, in order, the input of each group of matmuls that share
one input:

    layers.{i}.qkv      rmsnorm(x) * attn_norm       [T, D]      -> wq, wk, wv
    layers.{i}.wo       attention output             [T, H*hd]   -> wo
    layers.{i}.gate_up  rmsnorm(h) * ffn_norm        [T, D]      -> w_gate, w_up
    layers.{i}.down     silu(gate) * up              [T, F]      -> w_down
                        (block-rotated first when the graph does that: `down_rotation`)
    head                rmsnorm(x) * final_norm      [T, D]      -> lm_head

The text (convert/data/calibration.txt, about 8,500 words) is ours: everyday prose, Q&A and
chat turns, code, logs, JSON and tool calls, tables and numbers, a little of ten other
languages. It is deliberately not the perplexity text in edge/data/perplexity/, so quality
measured on that text is not measured on what the scales were fitted to. It is read as
independent sequences of SEGMENT tokens (as a model meets text: from position 0): smoothing
searches on the first one, GPTQ's Hessians take GPTQ_TOKENS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from convert import workers
from convert.rotation import rotate_blocks
from edge.model.attention import Attention
from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache
from edge.model.numpy_model import layer_weights, llama_layer, rms_norm
from edge.model.rope import RopeTables

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
SEGMENT = 512          # tokens per calibration sequence (each starts afresh, with BOS when the model uses it)
SMOOTHING_TOKENS = 512     # smoothing's search simulates every matmul on these: one segment is enough
GPTQ_TOKENS = 4096         # GPTQ's Hessians need many more tokens than input channels (README, GPTQ)
GROUPS = ("qkv", "wo", "gate_up", "down")     # a layer's matmul groups, in the order they are met
MIN_DISTINCT = 64      # fewer distinct ids means the tokenizer cannot read the text (e.g. all <unk>)


def calibration_tokens(tokenizer_json: str, bos: int | None, max_tokens: int = SMOOTHING_TOKENS
                       ) -> list[np.ndarray] | None:
    """The calibration text as sequences of at most SEGMENT ids (max_tokens in all), or None
    when the tokenizer cannot read it: scales fitted to a stream of <unk> would fit nothing
    the model will ever see."""
    from tokenizers import Tokenizer
    text = CALIBRATION_TEXT.read_text(encoding="utf-8")
    ids = Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids
    if len(set(ids[:max_tokens])) < MIN_DISTINCT:
        return None
    head = [bos] if bos is not None else []
    step = SEGMENT - len(head)
    segments, total = [], 0
    for start in range(0, len(ids), step):
        seg = (head + ids[start:start + step])[:max_tokens - total]
        if total >= max_tokens or (segments and len(seg) < SEGMENT // 4):   # a short tail adds little
            break
        segments.append(np.array(seg, dtype=np.int64))
        total += len(seg)
    return segments


def first_tokens(segments: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """The leading segments holding at most max_tokens ids (at least the first one)."""
    out, total = [], 0
    for seg in segments:
        if out and total + len(seg) > max_tokens:
            break
        out.append(seg[:max_tokens] if not out else seg)
        total += len(out[-1])
    return out


def matmul_inputs(get: Callable[[str], np.ndarray], cfg: ModelConfig,
                  segments: list[np.ndarray] | np.ndarray,
                  down_rotation: np.ndarray | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (group name, float32 input [T, K]) for every matmul group, layer by layer: the
    reference model's own `llama_layer`, observed, over each segment (a 1-D array is one),
    with the segments' rows concatenated. Each layer's weights are read once."""
    stream = HiddenStates(get("embed"), cfg, segments, down_rotation)
    for i in range(cfg.num_layers):
        L = layer_weights(get, i)
        seen = stream.layer(i, L)
        del L
        for group in list(seen):                 # handed over: the consumer's is the only reference
            v = seen.pop(group)
            yield f"layers.{i}.{group}", v
            del v
    yield "head", stream.head(get("final_norm"))


class HiddenStates:
    """The calibration segments' residual stream, advanced one layer at a time: `layer(i, L)`
    runs layer i with the weights L (`layer_weights`' layout) and returns the input of each of
    its matmul groups, [T, K] with the segments' rows concatenated; `head(final_norm)` the
    lm_head's input. embed: the table (or its rows of the segments' ids) the stream starts from."""

    def __init__(self, embed, cfg: ModelConfig, segments: list[np.ndarray] | np.ndarray,
                 down_rotation: np.ndarray | None = None):
        if isinstance(segments, np.ndarray) and segments.ndim == 1:
            segments = [segments]
        self.cfg, self.down_rotation = cfg, down_rotation
        self.attention = Attention(cfg, RopeTables(cfg, max(len(s) for s in segments)))
        self.xs = [embed[s] for s in segments]
        self.n_tokens = sum(len(s) for s in segments)

    def layer(self, i: int, L: dict) -> dict[str, np.ndarray]:
        """The segments are independent sequences: each runs as one piece on the conversion's
        workers (convert/workers.py), and their inputs are joined in the segments' order."""
        xs = self.xs

        def segment(j: int) -> dict[str, np.ndarray]:
            seen: dict[str, np.ndarray] = {}

            def observe(group: str, v: np.ndarray) -> np.ndarray:
                if group == "down" and self.down_rotation is not None:
                    v = rotate_blocks(v, self.down_rotation)      # what the graph's block rotation feeds w_down
                seen[group] = v
                return v
            cache = KVCache(self.cfg, len(xs[j]))
            xs[j] = llama_layer(xs[j], L, lambda qkv: self.attention(i, qkv, cache, 0), self.cfg.rms_norm_eps,
                                observe)
            return seen

        per_segment = workers.map_ordered(segment, range(len(xs)))
        out = {}
        for group in list(per_segment[0]):
            parts = [seen.pop(group) for seen in per_segment]
            out[group] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            del parts
        return out

    def head(self, final_norm: np.ndarray) -> np.ndarray:
        return np.concatenate([rms_norm(x, final_norm, self.cfg.rms_norm_eps) for x in self.xs])
