"""Stop strings over a text stream: emit text as soon as it cannot be the start of a stop string."""

from __future__ import annotations


class StopMatcher:
    """Holds back the shortest tail that could still grow into a stop string; cuts before a match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""  # never longer than the longest stop string minus one
        self.matched = False

    def feed(self, delta: str) -> str:
        """Add text; return what may be emitted now. After a match ``matched`` is set; the rest is dropped."""
        if self.matched:
            return ""
        if not self._stops:
            return delta
        buf = self._pending + delta
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.matched = True
            self._pending = ""
            return buf[: min(hits)]
        hold = 0
        for s in self._stops:
            # Longest suffix of buf that is a proper prefix of s.
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """Release the held tail at the end of generation (it never became a stop string)."""
        out, self._pending = ("" if self.matched else self._pending), ""
        return out
