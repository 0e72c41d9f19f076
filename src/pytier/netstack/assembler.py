"""Out-of-order reassembly: data that arrived ahead of the next expected byte, kept until the gap fills.

Positions are unwrapped sequence numbers (plain ints that never wrap). Ranges are disjoint, sorted and
never touching; each holds its bytes as a list of chunks, so a run of segments arriving in order behind
a hole costs one append each rather than a growing copy.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["Assembler"]


class Assembler:
    __slots__ = ("_chunks", "_ends", "_starts", "buffered", "max_ranges")

    def __init__(self, max_ranges: int) -> None:
        self.max_ranges = max_ranges
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._chunks: list[list[bytes]] = []
        self.buffered = 0  # bytes held

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        """The number of disjoint ranges held."""
        return len(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        """The held ranges as (start, end) pairs, end exclusive, in order."""
        return list(zip(self._starts, self._ends, strict=True))

    def insert(self, start: int, data: bytes | memoryview) -> bool:
        """Hold `data` at `start`; where it overlaps held bytes, the held bytes win.

        Return False, holding nothing, if it would open a range beyond `max_ranges`.
        """
        end = start + len(data)
        if end <= start:
            return True
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, start)  # first range ending at or after `start`: touching counts
        j = i
        pos = start
        merged: list[bytes] = []
        added = 0
        while j < len(starts) and starts[j] <= end:
            s = starts[j]
            if pos < s:
                merged.append(bytes(data[pos - start : s - start]))
                added += s - pos
            merged.extend(self._chunks[j])
            pos = max(pos, ends[j])
            j += 1
        if pos < end:
            merged.append(bytes(data[pos - start :]))
            added += end - pos
        if i == j:
            if len(starts) >= self.max_ranges:
                return False
            starts.insert(i, start)
            ends.insert(i, end)
            self._chunks.insert(i, merged)
        else:
            new_start = min(start, starts[i])
            new_end = max(end, ends[j - 1])
            starts[i:j] = [new_start]
            ends[i:j] = [new_end]
            self._chunks[i:j] = [merged]
        self.buffered += added
        return True

    def pop_from(self, at: int) -> bytes:
        """Remove and return the bytes from `at` onward if the first range reaches back to `at`.

        Ranges wholly before `at` (already delivered another way) are dropped on the way.
        """
        starts, ends = self._starts, self._ends
        while starts and ends[0] <= at:
            self.buffered -= ends[0] - starts[0]
            del starts[0], ends[0], self._chunks[0]
        if not starts or starts[0] > at:
            return b""
        s, e = starts[0], ends[0]
        data = b"".join(self._chunks[0])
        del starts[0], ends[0], self._chunks[0]
        self.buffered -= e - s
        return data[at - s :]

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._chunks.clear()
        self.buffered = 0
