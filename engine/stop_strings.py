"""Stop strings matched on streamed text (the engine itself stops only on token ids).

The matcher holds back the tail of the text that could still grow into a stop string,
so a streamed response never shows part of one; the output is cut before the match.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._held = ""  # text not yet emitted: a suffix that is a prefix of some stop string

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string found first in the text, if any)."""
        text = self._held + delta
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self._held = ""
            at, stop = min(hits)
            return text[:at], stop
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """The held-back tail, when the stream ends without a match."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
