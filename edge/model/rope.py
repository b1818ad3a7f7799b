"""Rotary position embeddings (HF "rotate half" layout), with llama3 / linear / yarn frequency
scaling computed as transformers' modeling_rope_utils computes it."""
from __future__ import annotations

import math

import numpy as np

from edge.model.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Per-pair rotation speeds; scaling slows (some of) them down for long context."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn(inv, head_dim, theta, scaling)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(inv: np.ndarray, head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN: frequencies below the beta_slow bound are interpolated (divided by factor), those
    above beta_fast kept, a linear ramp in between (transformers' _compute_yarn_parameters)."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (inv / s.factor) * (1 - extrapolation) + inv * extrapolation


def attention_scaling(scaling: RopeScaling | None) -> float:
    """The factor transformers multiplies cos and sin by (YaRN's attention temperature)."""
    return scaling.attention_factor if scaling is not None and scaling.rope_type == "yarn" else 1.0


class RopeTables:
    """cos/sin for every position up to max_ctx, computed once (float64 -> float32), laid out
    for one fused rotation: cos2 = [cos | cos], sin2 = [-sin | sin] along the two halves."""

    def __init__(self, cfg: ModelConfig, max_ctx: int):
        inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        angles = np.outer(np.arange(max_ctx, dtype=np.float64), inv)      # [ctx, hd/2]
        scale = attention_scaling(cfg.rope_scaling)
        self.cos = (np.cos(angles) * scale).astype(np.float32)
        self.sin = (np.sin(angles) * scale).astype(np.float32)
        self.half = cfg.head_dim // 2
        self.cos2 = np.stack([self.cos, self.cos], axis=1)[:, None]        # [ctx, 1, 2, hd/2]
        self.sin2 = np.stack([-self.sin, self.sin], axis=1)[:, None]

    def rotated(self, x: np.ndarray, start: int) -> np.ndarray:
        """x [T, heads, hd] at positions start..start+T-1, rotated (a new array): for the halves
        a, b of each head, [a*cos - b*sin, b*cos + a*sin], rounded exactly as those float32 ops
        round (a*cos + b*(-sin) is the same number), in three NumPy calls for all heads."""
        T, n, hd = x.shape
        halves = x.reshape(T, n, 2, self.half)
        out = halves * self.cos2[start:start + T]
        out += halves[:, :, ::-1] * self.sin2[start:start + T]     # [b, a] * [-sin, sin]
        return out.reshape(T, n, hd)
