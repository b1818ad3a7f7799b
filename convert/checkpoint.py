"""The one in-memory description every checkpoint reader produces.

Tensors use Hugging Face's Llama layout (weight matrices are [out_features, in_features],
q/k rows in HF's rotate-half order) under short canonical names, and are read lazily: a
reader returns a `Checkpoint` whose `tensor(name)` loads (and dequantizes) one tensor at a
time, so converting a 1B model never holds two copies of it.

Canonical names:
    embed [V, D], final_norm [D], lm_head [V, D] (absent when tied)
    layers.{i}.attn_norm [D], .wq [H*hd, D], .wk [KV*hd, D], .wv [KV*hd, D], .wo [D, H*hd]
    layers.{i}.ffn_norm [D], .w_gate [F, D], .w_up [F, D], .w_down [D, F]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edge.model.config import ModelConfig

class CheckpointError(ValueError):
    """A checkpoint we cannot use; the message names the file and the problem."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    shapes = {"embed": (V, D), "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (V, D)
    per_layer = {
        "attn_norm": (D,), "wq": (cfg.num_heads * hd, D), "wk": (cfg.num_kv_heads * hd, D),
        "wv": (cfg.num_kv_heads * hd, D), "wo": (D, cfg.num_heads * hd), "ffn_norm": (D,),
        "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F),
    }
    for i in range(cfg.num_layers):
        for k, s in per_layer.items():
            shapes[f"layers.{i}.{k}"] = s
    return shapes


FINITE_CHECK_CHUNK = 1 << 22     # values per np.isfinite pass: its mask stays small


def count_non_finite(arr: np.ndarray) -> int:
    """How many values of `arr` are NaN or infinite, checked a chunk at a time so a 1 GB
    tensor does not get a 250 MB mask beside it."""
    flat = arr.reshape(-1)
    return sum(int(flat[lo:lo + FINITE_CHECK_CHUNK].size - np.count_nonzero(np.isfinite(flat[lo:lo + FINITE_CHECK_CHUNK])))
               for lo in range(0, flat.size, FINITE_CHECK_CHUNK))


@dataclass
class Checkpoint:
    config: ModelConfig
    source: str                                   # path shown in messages
    loaders: dict[str, Callable[[], np.ndarray]]  # canonical name -> lazy loader
    tokenizer_json: str                           # Hugging Face `tokenizers` JSON
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token text
    add_bos: bool = True                          # raw (non-chat) prompts start with BOS
    stored_names: dict[str, str] = field(default_factory=dict)  # canonical -> where the file keeps it
    row_loaders: dict[str, Callable[[int, int], np.ndarray]] = field(default_factory=dict)  # rows lo:hi, lazily

    def names(self) -> list[str]:
        return list(self.loaders)

    def tensor(self, name: str) -> np.ndarray:
        """Load one tensor as float32, checking its shape against the config. The array is
        fresh and the caller's: transforms rewrite it in place (a [V, D] table of the 1B model
        is 1 GB, so a transform that copies it costs 1 GB)."""
        want = expected_shapes(self.config).get(name)
        if name not in self.loaders or want is None:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing")
        arr = np.asarray(self.loaders[name](), dtype=np.float32)
        if not arr.flags.writeable:
            arr = arr.copy()
        if arr.shape != want:
            raise CheckpointError(f"{self.source}: tensor {name!r} has shape {arr.shape}, config implies {want}")
        return self._finite(name, arr)

    def rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows lo:hi of a tensor as float32, checked as `tensor` checks it: what a reader with
        a row loader can give without the whole tensor (see `row_loaders`)."""
        want = expected_shapes(self.config).get(name)
        if name not in self.row_loaders or want is None:
            raise CheckpointError(f"{self.source}: tensor {name!r} cannot be read by rows")
        arr = np.asarray(self.row_loaders[name](lo, hi), dtype=np.float32)
        if not arr.flags.writeable:
            arr = arr.copy()
        n = max(0, min(hi, want[0]) - lo)
        if arr.shape != (n,) + want[1:]:
            raise CheckpointError(f"{self.source}: rows {lo}:{hi} of {name!r} have shape {arr.shape}, "
                                  f"config implies {(n,) + want[1:]}")
        return self._finite(name, arr)

    def _finite(self, name: str, arr: np.ndarray) -> np.ndarray:
        bad = count_non_finite(arr)
        if bad:
            stored = self.stored_names.get(name)
            where = f" ({stored})" if stored else ""
            raise CheckpointError(f"{self.source}: tensor {name!r}{where} has {bad} non-finite value(s) (NaN or "
                                  f"infinity) after dequantization; the checkpoint is damaged")
        return arr

    def validate(self) -> None:
        """Refuse up front if any tensor the config needs is missing."""
        missing = [n for n in expected_shapes(self.config) if n not in self.loaders]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(f"{self.source}: missing tensors {', '.join(missing[:3])}{more}")
