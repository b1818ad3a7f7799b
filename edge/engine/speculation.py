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
drafting pauses (with a growing back-off) while the acceptance rate stays too low to pay
for the extra rows.
"""
from __future__ import annotations

from dataclasses import dataclass

K_MAX = 8           # draft tokens per step at most (the 1B verify curve is flat to ~4, see README)
K_START = 4
NGRAM_MAX = 4       # the longest suffix matched first
NGRAM_MIN = 2       # a single-token match guesses too often to pay for its rows
PAUSE_BELOW = 0.3   # recent acceptance rate under which drafting pauses
PAUSE_STEPS = 4     # first pause; doubles each time the retry fails, up to PAUSE_MAX
PAUSE_MAX = 64
EMA = 0.3           # weight of the newest verify step in the acceptance rate


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
        self.pause = 0               # steps left without drafting
        self.backoff = PAUSE_STEPS
        self.stats = SpecStats()

    def draft(self, history: list[int], room: int) -> list[int]:
        """The draft for this step: at most min(k, room) tokens; [] while paused."""
        if self.pause > 0:
            self.pause -= 1
            return []
        k = min(self.k, room)
        return self.drafter(history, k) if k > 0 else []

    def update(self, drafted: int, accepted: int) -> None:
        """After a verify step: `accepted` of `drafted` draft tokens were taken."""
        if drafted == 0:
            return
        s = self.stats
        s.steps, s.drafted, s.accepted = s.steps + 1, s.drafted + drafted, s.accepted + accepted
        self.rate = (1 - EMA) * self.rate + EMA * (accepted / drafted)
        if accepted == drafted:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(1, min(self.k, accepted + 1))
        if self.rate < PAUSE_BELOW:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, PAUSE_MAX)
            self.rate = PAUSE_BELOW          # one good draft after the pause resumes drafting
        elif accepted:
            self.backoff = PAUSE_STEPS
