"""Token sampling from one step's logits, as a chain: logits processors, then a sampler.

Like mlx-lm's `make_logits_processors` + `make_sampler`, each sequence gets its own chain
(`Sampler`): the processors map (logits, history) to logits in order, the grammar's mask
(tokens outside it at -inf), the history's penalties (repetition as Hugging Face's,
frequency/presence as OpenAI's), then `logit_bias`; the sampler then takes temperature,
top-k, top-p, min-p and a seeded draw. Top-p is measured against the top-k distribution and
min-p against its most likely token; both keep a prefix of the tokens ranked by probability,
so applying both keeps the shorter prefix whatever their order.

Vocabularies reach 128256 entries, so everything is vectorised and the vocabulary is never
fully sorted when a cheaper cut exists: argpartition for top-k, and top-p sorts only a growing
head of the distribution until that head holds the requested mass. A greedy chain with
penalties alone finds its argmax without copying the vocabulary (`Sampler._greedy`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling. The field defaults mean "off" (plain sampling from the model's
    distribution); the product's defaults live in edge.launch.request."""
    temperature: float = 1.0         # 0 means greedy, 1 leaves the logits as they are
    top_k: int = 0                   # 0 means off
    top_p: float = 1.0               # 1 means off
    min_p: float = 0.0               # 0 means off
    repetition_penalty: float = 1.0  # 1 means off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit, in [-100, 100]

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
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _checked_bias(self.logit_bias))


def check_vocab(p: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError when `logit_bias` names a token outside the vocabulary."""
    if p.logit_bias and (worst := max(p.logit_bias)) >= vocab_size:
        raise ValueError(f"logit_bias names token {worst}, outside the vocabulary (0..{vocab_size - 1})")


def _checked_bias(bias) -> dict[int, float]:
    """{token id: bias}; ids may come as strings (JSON object keys, as OpenAI sends them)."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be an object mapping token ids to numbers, got {bias!r}")
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if not (_is_int(token) and token >= 0):
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        if not (_is_finite_number(value) and -100 <= value <= 100):
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key!r}")
        out[int(token)] = float(value)
    return out


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


# --- logits processors: (logits [V], history ids) -> logits --------------------------------

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0


def penalties(p: SamplingParams) -> LogitsProcessor:
    """The history's penalties, in float64; a copy, the caller's logits stay untouched."""
    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        out = np.array(logits, dtype=np.float64)
        if history.size:
            ids, seen = penalised(p, logits, history)
            out[ids] = seen
        return out
    return apply


def penalised(p: SamplingParams, logits: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids of `history` (sorted) and their penalised logits, in float64."""
    ids, counts = np.unique(history, return_counts=True)
    seen = logits[ids].astype(np.float64)  # fancy indexing copies; the caller's array stays untouched
    seen = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    seen -= counts * p.frequency_penalty + p.presence_penalty
    return ids, seen


def bias(logit_bias: dict[int, float]) -> LogitsProcessor:
    """OpenAI's `logit_bias`: added to the listed tokens' logits (a masked token stays masked)."""
    ids = np.fromiter(logit_bias, dtype=np.int64, count=len(logit_bias))
    values = np.fromiter(logit_bias.values(), dtype=np.float64, count=len(logit_bias))

    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        if ids.size and ids.max() >= logits.size:
            raise ValueError(f"logit_bias names token {int(ids.max())}, outside the vocabulary "
                             f"(0..{logits.size - 1})")
        out = np.array(logits, dtype=np.float64)
        out[ids] += values
        return out
    return apply


def grammar_mask(matcher) -> LogitsProcessor:
    """A grammar's matcher (`constraint.Matcher`): tokens it does not allow go to -inf."""
    return lambda logits, history: matcher.apply(logits)


def make_logits_processors(p: SamplingParams, matcher=None) -> list[LogitsProcessor]:
    """One sequence's processors, in order: grammar mask, penalties, logit_bias."""
    out = [grammar_mask(matcher)] if matcher is not None else []
    if has_penalties(p):
        out.append(penalties(p))
    if p.logit_bias:
        out.append(bias(p.logit_bias))
    return out


# --- the sampler: processed logits -> a token ------------------------------------------------

def make_sampler(p: SamplingParams) -> Callable[..., int]:
    """`sample(logits, owned=False) -> token`: temperature, top-k, top-p, min-p and a draw from
    the seeded generator (greedy for temperature 0 or top_k 1). `owned` lets it work in place
    on `logits` (a processor's copy); otherwise the caller's array is left untouched."""
    rng = np.random.default_rng(p.seed)
    greedy = p.temperature == 0 or p.top_k == 1

    def sample(logits: np.ndarray, owned: bool = False) -> int:
        as64 = np.asarray(logits, dtype=np.float64)
        owned = owned or (as64 is not logits and not np.may_share_memory(as64, logits))
        logits = _finite(as64)
        if greedy:
            return int(np.argmax(logits))
        # Shift before dividing, in float64 (any positive temperature the schema admits stays
        # positive there): a tiny temperature then sends logits to -inf (weight 0), never to
        # +inf or NaN, and the most likely token keeps weight exactly 1. In place when `logits`
        # is already a copy of the caller's array.
        scaled = logits if owned or logits is not as64 else logits.copy()
        np.subtract(scaled, scaled.max(), out=scaled)
        np.divide(scaled, p.temperature, out=scaled)
        ids, weights = _candidates(p, scaled)
        cdf = np.cumsum(weights, dtype=np.float64)
        i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])
    return sample


class Sampler:
    """One sequence's chain: its logits processors (`matcher`: the grammar's, if any), then its
    sampler with its own seeded generator."""

    def __init__(self, params: SamplingParams, matcher=None):
        self.params = params
        self.mask = grammar_mask(matcher) if matcher is not None else None
        self.processors = make_logits_processors(params)       # after the mask
        self.pick = make_sampler(params)
        self.greedy = (params.temperature == 0 or params.top_k == 1) and not params.logit_bias

    def sample(self, logits: np.ndarray, history=()) -> int:
        """Pick the next token id from float logits [V]; `history` is the ids seen so far
        (the caller chooses the window the penalties look at). `logits` is never modified."""
        history = np.asarray(history, dtype=np.int64).ravel()
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            if self.mask is not None:
                logits = self.mask(logits, history)
            if self.greedy and (token := self._greedy(logits, history)) is not None:
                return token
            processed = logits
            for process in self.processors:
                processed = process(processed, history)
            return self.pick(processed, owned=processed is not logits)

    def _greedy(self, logits: np.ndarray, history: np.ndarray) -> int | None:
        """The chain's argmax without converting, cleaning or copying the whole vocabulary:
        the largest raw logit outside the penalised ids against the penalised ids' own
        (float64, as `penalised` computes them), ties to the lower id as np.argmax breaks
        them. None (take the whole chain) for anything but finite float logits."""
        logits = np.asarray(logits)
        if logits.dtype.kind != "f" or logits.ndim != 1:
            return None
        if history.size == 0 or not has_penalties(self.params):
            best = int(np.argmax(logits))
            return best if np.isfinite(logits[best]) else None
        ids, seen = penalised(self.params, logits, history)
        rest = logits.copy()
        rest[ids] = -np.inf
        best = int(np.argmax(rest))          # a NaN anywhere outside the history comes first
        j = int(np.argmax(seen))             # ids are sorted: the lowest id among equal maxima
        top, s = float(rest[best]), float(seen[j])
        # -inf (a grammar's mask) ranks as it does there; NaN and +inf, which `_finite` rewrites,
        # and a step with no finite logit, which it reports, are left to the whole chain
        if np.isnan(top) or np.isnan(seen).any() or max(top, s) in (np.inf, -np.inf):
            return None
        if s > top or (s == top and ids[j] < best):
            return int(ids[j])
        return best


def _candidates(p: SamplingParams, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Allowed token ids and their unnormalised probabilities (the largest is 1)."""
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
