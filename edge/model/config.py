"""The model's shape and numerics: everything the decode loop needs to know besides weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


ROPE_TYPES = ("llama3", "linear", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers computes it (modeling_rope_utils):
    "llama3" (Llama 3.1+: factor, low/high_freq_factor, original_max_position_embeddings),
    "linear" (every frequency divided by factor) or "yarn" (factor, beta_fast/beta_slow ramp
    between original_max_position_embeddings-based bounds, cos/sin times attention_factor).
    Bundles written before rope_type existed hold llama3 parameters, hence the default."""
    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not implemented (only {', '.join(ROPE_TYPES)})")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def parameter_count(self) -> int:
        """Weights of the model, from its shape (the embedding counted once when tied)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        rs = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling(**rs) if rs else None
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)
