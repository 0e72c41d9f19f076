"""Log lines about hostile or broken input without letting the input decide how much we log.

A sender of garbage picks how many packets we see, and with spoofed UDP sources how many sources
too; so each (source, reason) gets at most one line per interval, the line after a quiet spell
says how many were left unsaid, a whole interval carries at most `max_lines` lines, and at most
`max_keys` (source, reason) pairs are remembered (the oldest are forgotten first).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Entry:
    last_line: float
    suppressed: int = 0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 60.0,
        *,
        max_lines: int = 20,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.interval_s = interval_s
        self._max_lines = max_lines
        self._max_keys = max_keys
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._window_start = -interval_s
        self._window_lines = 0
        self._window_dropped = 0

    def log(self, level: int, source: str, reason: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless (source, reason) had its line this interval; True if it was logged."""
        now = self._clock()
        key = (source, reason)
        entry = self._entries.get(key)
        if entry is not None and now - entry.last_line < self.interval_s:
            entry.suppressed += 1
            return False
        if now - self._window_start >= self.interval_s:
            if self._window_dropped:
                self._logger.log(level, "%d more log lines about bad input were suppressed in the last "
                                 "%.0f s", self._window_dropped, self.interval_s)
            self._window_start, self._window_lines, self._window_dropped = now, 0, 0
        if self._window_lines >= self._max_lines:
            # Over budget: this key had no line, so its next chance is its next packet, not an interval on.
            self._window_dropped += 1
            if entry is not None:
                entry.suppressed += 1
            return False
        self._window_lines += 1
        suppressed = entry.suppressed if entry is not None else 0
        if entry is None:
            if len(self._entries) >= self._max_keys:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = _Entry(now)
        else:
            entry.last_line, entry.suppressed = now, 0
            # Re-insert so that dict order stays oldest line first, which is what eviction drops.
            del self._entries[key]
            self._entries[key] = entry
        if suppressed:
            self._logger.log(level, msg + " (%d more like it since the last line)", *args, suppressed)
        else:
            self._logger.log(level, msg, *args)
        return True
