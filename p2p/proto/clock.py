"""Hybrid logical clock: timestamps that sort like wall time and never run backwards.

A timestamp is the string ``"<13-digit ms>.<6-digit counter>"``: plain string order is
time order, and pycrdt (which turns numbers into floats) stores it losslessly. The clock
never reads the time itself; callers pass ``wall_ms`` (sans-I/O, testable with a fake
clock).
"""

from __future__ import annotations

import re
from typing import Final

MAX_LOGICAL: Final = 999_999
MAX_SKEW_MS: Final = 24 * 3600 * 1000
"""A remote timestamp further ahead than this does not drag our clock along."""
_FORMAT: Final = re.compile(r"[0-9]{13}\.[0-9]{6}")
"""Matched whole (``fullmatch``): ASCII digits only, nothing after (``\\d`` would take any
Unicode digit, and ``$`` a trailing newline)."""


def format_ts(ms: int, logical: int) -> str:
    return f"{ms:013d}.{logical:06d}"


def parse_ts(ts: str) -> tuple[int, int]:
    """(ms, counter) of a well-formed timestamp; ValueError otherwise."""
    if not _FORMAT.fullmatch(ts):
        raise ValueError(f"not a timestamp: {ts[:32]!r}")
    ms, logical = ts.split(".")
    return int(ms), int(logical)


def is_ts(value: object) -> bool:
    return isinstance(value, str) and _FORMAT.fullmatch(value) is not None


class HybridClock:
    """Kulkarni et al.'s HLC: max(wall, last seen) plus a counter for ties."""

    def __init__(self, last: str | None = None) -> None:
        self._ms, self._logical = parse_ts(last) if last else (0, 0)

    def now(self, wall_ms: int) -> str:
        """A timestamp greater than every one issued or observed before."""
        if wall_ms > self._ms:
            self._ms, self._logical = wall_ms, 0
        elif self._logical < MAX_LOGICAL:
            self._logical += 1
        else:
            self._ms, self._logical = self._ms + 1, 0
        return format_ts(self._ms, self._logical)

    def observe(self, ts: str, wall_ms: int) -> None:
        """Move past a timestamp seen from another device (unless absurdly far ahead)."""
        ms, logical = parse_ts(ts)
        if ms > wall_ms + MAX_SKEW_MS:
            return
        if (ms, logical) > (self._ms, self._logical):
            self._ms, self._logical = ms, logical

    @property
    def last(self) -> str:
        return format_ts(self._ms, self._logical)
