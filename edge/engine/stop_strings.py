"""Stop strings over streamed text.

Text is released as soon as it cannot be part of a stop string: any tail that is a prefix of
some stop is held back until later text confirms or rules out the match. The first stop string
to complete wins, as it would if text arrived one character at a time (so the result never
depends on how the text was chunked); of those completing at the same character the longest
wins. Output ends right before it and nothing more is emitted. Only the held tail (shorter
than the longest stop) is ever searched again.
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops = tuple(dict.fromkeys(stops))
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string has completed)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        # (end, start) of each stop's first occurrence; the earliest end completed first
        hits = [(i + len(s), i) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buffer[: min(hits)[1]], True
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of generation: the held-back tail, which never became a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that some stop string starts with."""
        for n in range(min(len(buffer), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
