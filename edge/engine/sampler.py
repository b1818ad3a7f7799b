"""Token sampling from one step's logits.

Order, as in Hugging Face's logits processors: repetition penalty (HF), frequency/presence
penalties (OpenAI), then temperature, top-k, top-p, min-p. Top-p is measured against the
top-k distribution and min-p against its most likely token; both keep a prefix of the tokens
ranked by probability, so applying both keeps the shorter prefix whatever their order.

Vocabularies reach 128256 entries, so everything is vectorised and the vocabulary is never
fully sorted when a cheaper cut exists: argpartition for top-k, and top-p sorts only a growing
head of the distribution until that head holds the requested mass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7         # 0 means greedy
    top_k: int = 0                   # 0 means off
    top_p: float = 1.0               # 1 means off
    min_p: float = 0.0               # 0 means off
    repetition_penalty: float = 1.0  # 1 means off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        for field, (ok, rule) in _FLOAT_RULES.items():
            value = getattr(self, field)
            if not _is_finite_number(value):
                raise ValueError(f"{field} must be a finite number, got {value!r}")
            if not ok(value):
                raise ValueError(f"{field} must be {rule}, got {value!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (self.seed is None or (_is_int(self.seed) and self.seed >= 0)):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")


_FLOAT_RULES = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),  # OpenAI's range
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, history=()) -> int:
        """Pick the next token id from float logits [V]; `history` is the ids seen so far
        (the caller chooses the window the penalties look at). `logits` is never modified."""
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            return self._sample(logits, history)

    def _sample(self, logits: np.ndarray, history) -> int:
        p = self.params
        greedy = p.temperature == 0 or p.top_k == 1
        if greedy and (token := self._greedy(logits, history)) is not None:
            return token
        as64 = np.asarray(logits, dtype=np.float64)
        own = as64 is not logits and not np.may_share_memory(as64, logits)    # a copy of the caller's logits
        penalized = self._penalized(as64, history, in_place=own)
        own = own or penalized is not as64
        logits = _finite(penalized)
        if greedy:
            return int(np.argmax(logits))
        # Shift before dividing, in float64 (any positive temperature the schema admits stays
        # positive there): a tiny temperature then sends logits to -inf (weight 0), never to
        # +inf or NaN, and the most likely token keeps weight exactly 1. In place when `logits`
        # is already a copy of the caller's array (it is for float32 logits or penalties).
        scaled = logits if own or logits is not penalized else logits.copy()
        np.subtract(scaled, scaled.max(), out=scaled)
        np.divide(scaled, p.temperature, out=scaled)
        ids, weights = self._candidates(scaled)
        cdf = np.cumsum(weights, dtype=np.float64)
        i = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])

    def _greedy(self, logits: np.ndarray, history) -> int | None:
        """The general path's argmax without converting, cleaning or copying the whole
        vocabulary: the largest raw logit outside the penalised ids against the penalised ids'
        own (float64, as `_penalized` computes them), ties to the lower id as np.argmax breaks
        them. None (take the general path) for anything but finite float logits."""
        logits = np.asarray(logits)
        if logits.dtype.kind != "f" or logits.ndim != 1:
            return None
        p = self.params
        history = np.asarray(history, dtype=np.int64).ravel()
        if history.size == 0 or (p.repetition_penalty == 1 and p.frequency_penalty == 0 and p.presence_penalty == 0):
            best = int(np.argmax(logits))
            return best if np.isfinite(logits[best]) else None
        ids, seen = self._penalties(logits, history)
        rest = logits.copy()
        rest[ids] = -np.inf
        best = int(np.argmax(rest))          # a NaN anywhere outside the history comes first
        j = int(np.argmax(seen))             # ids are sorted: the lowest id among equal maxima
        top, s = float(rest[best]), float(seen[j])
        # -inf (a grammar's mask) ranks as it does there; NaN and +inf, which `_finite` rewrites,
        # and a step with no finite logit, which it reports, are left to the general path
        if np.isnan(top) or np.isnan(seen).any() or max(top, s) in (np.inf, -np.inf):
            return None
        if s > top or (s == top and ids[j] < best):
            return int(ids[j])
        return best

    def _penalties(self, logits: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distinct ids of `history` (sorted) and their penalised logits, in float64."""
        p = self.params
        ids, counts = np.unique(history, return_counts=True)
        seen = logits[ids].astype(np.float64)  # fancy indexing copies; the caller's array stays untouched
        seen = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        seen -= counts * p.frequency_penalty + p.presence_penalty
        return ids, seen

    def _penalized(self, logits: np.ndarray, history, in_place: bool = False) -> np.ndarray:
        """The logits with the history's penalties (a copy unless `in_place`)."""
        p = self.params
        history = np.asarray(history, dtype=np.int64).ravel()
        if history.size == 0 or (p.repetition_penalty == 1 and p.frequency_penalty == 0 and p.presence_penalty == 0):
            return logits
        ids, seen = self._penalties(logits, history)
        if not in_place:
            logits = logits.copy()
        logits[ids] = seen
        return logits

    def _candidates(self, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Allowed token ids and their unnormalised probabilities (the largest is 1)."""
        p = self.params
        if 0 < p.top_k < scaled.size:
            ids = np.argpartition(scaled, -p.top_k)[-p.top_k:]
        else:
            ids = np.arange(scaled.size)
        weights = np.exp(scaled[ids] - scaled[ids].max())
        top_p_mass = p.top_p * float(weights.sum(dtype=np.float64))
        if p.min_p > 0:
            keep = weights >= p.min_p  # the top weight is 1, so this is prob >= min_p * max prob
            ids, weights = ids[keep], weights[keep]
        if p.top_p < 1:
            ids, weights = _nucleus(ids, weights, top_p_mass)
        return ids, weights


def _finite(logits: np.ndarray) -> np.ndarray:
    """Logits the sampler can always rank: NaN becomes -inf (never chosen), +inf (a tiny
    penalty divisor) the largest finite value. A step with no finite logit at all is a broken
    model, not something to sample from."""
    if np.isfinite(logits.max()):          # no NaN (max propagates it), no +inf: nothing to rewrite
        return logits                      # (-inf, a grammar's mask, ranks as it is); no copy
    logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
    if not np.isfinite(logits.max()):
        raise FloatingPointError("the model produced no finite logit (NaN or -inf everywhere)")
    return logits


def _nucleus(ids: np.ndarray, weights: np.ndarray, mass: float, head: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The fewest most-probable candidates whose weights reach `mass` (all of them if they cannot).

    Only the `head` largest weights are sorted; the head grows 8x until it holds the mass, so a
    peaked distribution costs one argpartition and a tiny sort instead of sorting the vocabulary.
    """
    while True:
        head = min(head, weights.size)
        top = np.argpartition(weights, -head)[-head:] if head < weights.size else np.arange(weights.size)
        top = top[np.argsort(weights[top])[::-1]]
        cdf = np.cumsum(weights[top], dtype=np.float64)
        if cdf[-1] >= mass or head == weights.size:
            n = min(int(np.searchsorted(cdf, mass)) + 1, head)
            return ids[top[:n]], weights[top[:n]]
        head *= 8
