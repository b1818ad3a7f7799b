"""Rotary position embeddings (HF "rotate half" layout), with Llama 3's frequency scaling."""
from __future__ import annotations

import math

import numpy as np

from edge.model.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Per-pair rotation speeds; llama3 scaling slows the low frequencies for long context."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


class RopeTables:
    """cos/sin for every position up to max_ctx, computed once (float64 -> float32)."""

    def __init__(self, cfg: ModelConfig, max_ctx: int):
        inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        angles = np.outer(np.arange(max_ctx, dtype=np.float64), inv)      # [ctx, hd/2]
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)
        self.half = cfg.head_dim // 2

    def apply(self, x: np.ndarray, start: int) -> np.ndarray:
        """Rotate x [heads, T, hd] in place for positions start..start+T-1."""
        T = x.shape[1]
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]   # [T, hd/2]
        a, b = x[..., :self.half], x[..., self.half:]
        a_new = a * cos - b * sin
        b *= cos
        b += a * sin
        a[...] = a_new
        return x
