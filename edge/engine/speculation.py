"""Prompt-lookup speculative decoding: drafts that cost nothing, checked in one pass.

Much of what a small assistant writes repeats its input (names and ids in tool calls,
quotes, summaries, corrections). `PromptLookup` drafts the next k tokens by finding the
sequence's last n tokens earlier in its prompt + output and copying what followed them.
The engine feeds [last token] + draft as one segment of k+1 rows at consecutive positions
(causal within the draft) in the step's `forward_batch`, so the weights are read once for
all of them, and row i's logits are what a plain decode step would have after the first
i draft tokens.

Acceptance (`Sequence.take` per row, see engine.step): row i's token x_i is sampled exactly
as a plain step would sample it (penalties, temperature, top-k/p, min-p, grammar mask,
the same random draw); the draft token d_i is accepted when x_i == d_i, and the first
x_i != d_i is emitted in its place and ends the step; after a fully accepted draft the
last row gives the bonus token. For a deterministic draft this is the standard
speculative-sampling rule: d_i is accepted with probability p(d_i), and on rejection x_i
is distributed as p with d_i removed and renormalised (p conditioned on x != d), so the
output distribution is unchanged; greedy output is the plain greedy output, and a seeded
request draws the same numbers in the same order as without drafting. The rows after the
first rejection are rolled back (`KVCache.rollback`).

`Speculator` keeps one sequence's adaptive state: k follows the recent acceptance (grow
after a fully accepted draft, shrink to what was accepted plus one after a rejection), and
within that the draft length that maximises the expected tokens per second: with p the
recent per-token acceptance, a draft of k yields 1 + p + ... + p^k tokens for a step that
costs `VerifyCost.ratio(k + 1)` one-row steps (measured by the engine on this machine, as
it runs). When no length pays, drafting pauses (with a growing back-off) and is tried again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

K_MAX = 8           # draft tokens per step at most (1B int8: a 5-row step costs 1.2 one-row steps, 9 rows 1.9)
K_START = 4
NGRAM_MAX = 4       # the longest suffix matched first
NGRAM_MIN = 2       # a single-token match guesses too often to pay for its rows
PAUSE_BELOW = 0.3   # recent acceptance rate under which drafting pauses
PAUSE_STEPS = 4     # first pause; doubles each time the retry fails, up to PAUSE_MAX
PAUSE_MAX = 64
EMA = 0.3           # weight of the newest verify step in the acceptance rate
COST_EMA = 0.1      # weight of the newest step in the measured step times
COST_PRIOR = 0.1    # a row count not measured yet: assume each extra row costs this much of a step


class PromptLookup:
    """Draft by n-gram lookup in the sequence itself (prompt + output so far). One instance
    per sequence: it indexes each n-gram's latest position as the history grows, so a draft
    costs a few dict look-ups whatever the context length."""

    def __init__(self, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self._seen: dict[tuple[int, ...], int] = {}   # n-gram -> index just after its latest occurrence
        self._upto = 0                                # n-grams ending before this index are in _seen

    def __call__(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        `history` (ngram_max down to ngram_min tokens); [] when none occurs."""
        end = len(history)
        seen = self._seen
        for j in range(max(self._upto, 1), end):      # n-grams with a token after them
            for n in self.sizes:
                if j >= n:
                    seen[tuple(history[j - n:j])] = j
        self._upto = max(self._upto, end)
        for n in self.sizes:
            if end >= n and (j := seen.get(tuple(history[end - n:]))) is not None:
                return history[j:j + k]
        return []


@dataclass
class SpecStats:
    steps: int = 0          # verify steps (a draft was checked)
    drafted: int = 0        # draft tokens checked
    accepted: int = 0       # draft tokens accepted
    plain_steps: int = 0    # decode steps without a draft
    per_step: list[tuple[int, int]] = field(default_factory=list)   # (drafted, accepted) of each verify step

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Speculator:
    """One sequence's drafting: which drafter, how many tokens, and whether to draft now."""

    def __init__(self, drafter=None, k_start: int = K_START, k_max: int = K_MAX):
        self.drafter = drafter or PromptLookup()
        self.k = min(k_start, k_max)
        self.k_max = k_max
        self.rate = 1.0              # recent acceptance rate (EMA)
        self.hits, self.misses = 2.0, 0.0   # decayed counts: draft tokens accepted, drafts cut short
        self.pause = 0               # steps left without drafting
        self.backoff = PAUSE_STEPS
        self.explore = False         # the next draft is checked even if the cost says no
        self.stats = SpecStats()

    def draft(self, history: list[int], room: int, cost: VerifyCost | None = None) -> list[int]:
        """The draft for this step: at most min(k, room) tokens, the length that pays best under
        `cost`; [] while paused."""
        if self.pause > 0:
            self.pause -= 1
            self.explore = self.pause == 0
            return []
        k = min(self.k, room)
        if cost is not None and k > 0 and not self.explore:
            k = self.best_k(k, cost)
            if k == 0:
                self._pause()
        draft = self.drafter(history, k) if k > 0 else []
        if draft:
            self.explore = False     # after a pause, one draft is checked whatever it costs: news of p
        return draft

    @property
    def p(self) -> float:
        """The chance that the next draft token is accepted, given the ones before it were."""
        return self.hits / (self.hits + self.misses + 1e-9)

    def best_k(self, k_cap: int, cost: VerifyCost) -> int:
        """The draft length up to k_cap with the most expected tokens per unit of step time;
        0 when none beats a plain step."""
        p, best, best_gain = min(self.p, 0.999), 0, 1.0
        for k in range(1, k_cap + 1):
            gain = (1 - p ** (k + 1)) / (1 - p) / cost.ratio(k + 1)
            if gain > best_gain:
                best, best_gain = k, gain
        return best

    def _pause(self) -> None:
        self.pause, self.backoff = self.backoff, min(2 * self.backoff, PAUSE_MAX)

    def update(self, drafted: int, accepted: int) -> None:
        """After a verify step: `accepted` of `drafted` draft tokens were taken."""
        s = self.stats
        if drafted == 0:
            s.plain_steps += 1
            return
        s.steps, s.drafted, s.accepted = s.steps + 1, s.drafted + drafted, s.accepted + accepted
        s.per_step.append((drafted, accepted))
        self.rate = (1 - EMA) * self.rate + EMA * (accepted / drafted)
        self.hits = (1 - EMA) * self.hits + accepted
        self.misses = (1 - EMA) * self.misses + (accepted < drafted)
        if accepted == drafted:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(1, min(self.k, accepted + 1))
        if self.rate < PAUSE_BELOW:
            self._pause()
            self.rate = PAUSE_BELOW          # one good draft after the pause resumes drafting
            self.hits, self.misses = max(self.hits, 1.0), min(self.misses, 1.0)
        elif accepted:
            self.backoff = PAUSE_STEPS


class VerifyCost:
    """Measured time of a one-sequence step by its row count (1 = a plain decode step), as
    exponential averages: what a draft of k costs on this machine and model, in plain steps."""

    def __init__(self, k_max: int = K_MAX):
        self.seconds: dict[int, float] = {}
        self.k_max = k_max

    def observe(self, rows: int, seconds: float) -> None:
        if 1 <= rows <= self.k_max + 1:
            old = self.seconds.get(rows)
            self.seconds[rows] = seconds if old is None else (1 - COST_EMA) * old + COST_EMA * seconds

    def ratio(self, rows: int) -> float:
        """Step time of `rows` rows over a one-row step's (a prior guess until both are measured)."""
        one, t = self.seconds.get(1), self.seconds.get(rows)
        if one is None or t is None:
            return 1 + COST_PRIOR * (rows - 1)
        return max(t / one, 1.0)
