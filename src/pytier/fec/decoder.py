"""The receiving half of FEC: each original packet out exactly once, as early as it can be.

Sans-IO: `receive(frame, now)` returns the packets to deliver now. A data frame's packet goes out
at once; a lost one comes back as soon as any k of its group's k + m frames have arrived. Frames
may come in any order, twice, or after their group ended: a finished group leaves a small record
(which data indices went out) for `tombstone_s`, so a late copy is dropped and a late first copy is
still delivered once. Memory is bounded three ways: a group gives up `group_timeout_s` after its
first frame, at most `max_groups` are open, and they hold at most `max_bytes` of frames (the
oldest group gives way). One decoder serves one peer session: a new session gets a new decoder,
since group ids restart with the sender.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pytier.fec.counters import DecoderCounters
from pytier.fec.erasure import ErasureCode, make_symbol, symbol_payload
from pytier.fec.framing import FecFrameError, FrameKind, parse_frame

__all__ = ["FecDecoder"]

DEFAULT_GROUP_TIMEOUT_S = 1.0  # seconds: well past a flush deadline plus any sane reordering
DEFAULT_TOMBSTONE_S = 10.0  # seconds a finished group still recognises its late frames
DEFAULT_MAX_GROUPS = 1024
DEFAULT_MAX_BYTES = 4 << 20
DEFAULT_MAX_TOMBSTONES = 16384


@dataclass(slots=True)
class _Group:
    first_seen: float
    data: dict[int, bytes] = field(default_factory=dict)
    parity: dict[int, bytes] = field(default_factory=dict)
    delivered: int = 0  # bit i: data index i went out
    top: int = -1  # highest data index seen
    # the group's shape as its first parity frame gave it (data frames carry only the nominal one)
    k: int = 0
    m: int = 0
    size: int = 0
    nbytes: int = 0


class FecDecoder:
    """Rebuilds lost packets of FEC groups; see the module docstring for the guarantees."""

    __slots__ = (
        "_code",
        "_done",
        "_live",
        "_max_bytes",
        "_max_groups",
        "_max_tombstones",
        "_stored",
        "_timeout",
        "_tombstone_s",
        "counters",
    )

    def __init__(
        self,
        *,
        group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
        tombstone_s: float = DEFAULT_TOMBSTONE_S,
        max_groups: int = DEFAULT_MAX_GROUPS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
        code: ErasureCode | None = None,
    ) -> None:
        for name, value in (("group timeout", group_timeout_s), ("tombstone time", tombstone_s)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"FEC {name} {value} s must be a finite number > 0")
        if max_groups < 1 or max_bytes < 1 or max_tombstones < 1:
            raise ValueError("FEC decoder limits must be >= 1")
        self._timeout = group_timeout_s
        self._tombstone_s = tombstone_s
        self._max_groups = max_groups
        self._max_bytes = max_bytes
        self._max_tombstones = max_tombstones
        self._code = code or ErasureCode()
        # both in arrival order of a group's first frame, which with a monotonic clock is age order
        self._live: dict[int, _Group] = {}
        self._done: dict[int, tuple[int, float]] = {}
        self._stored = 0
        self.counters = DecoderCounters()

    @property
    def stored_bytes(self) -> int:
        """Frame bytes held by open groups (never above max_bytes)."""
        return self._stored

    @property
    def open_groups(self) -> int:
        return len(self._live)

    @property
    def finished_groups(self) -> int:
        return len(self._done)

    def next_deadline(self) -> float | None:
        """When the oldest open group or record expires (call poll then), or None."""
        times = []
        if self._live:
            times.append(next(iter(self._live.values())).first_seen + self._timeout)
        if self._done:
            times.append(next(iter(self._done.values()))[1] + self._tombstone_s)
        return min(times) if times else None

    def poll(self, now: float) -> None:
        """Give up groups past their timeout and forget records past theirs."""
        live = self._live
        while live:
            gid, g = next(iter(live.items()))
            if g.first_seen + self._timeout > now:
                break
            self._finish(gid, g, now)
        done = self._done
        while done:
            gid, (_, t) = next(iter(done.items()))
            if t + self._tombstone_s > now:
                break
            del done[gid]

    def receive(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """The packets this frame delivers (itself if data, rebuilt ones once enough arrived).

        FecFrameError for a frame that does not parse; nothing else is raised for any input.
        """
        hdr, payload = parse_frame(frame)
        self.poll(now)
        gid = hdr.group
        is_data = hdr.kind is FrameKind.DATA
        if is_data:
            self.counters.data_frames += 1
        else:
            self.counters.parity_frames += 1
        record = self._done.get(gid)
        if record is not None:
            mask, t = record
            if is_data and not mask >> hdr.index & 1:
                self._done[gid] = (mask | 1 << hdr.index, t)
                return [bytes(payload)]
            if is_data:
                self.counters.duplicates += 1
            return []
        g = self._live.get(gid)
        if g is None:
            g = self._open(gid, now)
        if is_data:
            return self._on_data(gid, g, hdr.index, bytes(payload), now)
        return self._on_parity(gid, g, hdr.index, hdr.k, hdr.m, bytes(payload), now)

    def _open(self, gid: int, now: float) -> _Group:
        while len(self._live) >= self._max_groups:
            old_gid, old = next(iter(self._live.items()))
            self._finish(old_gid, old, now)
        g = self._live[gid] = _Group(now)
        return g

    def _store(self, gid: int, g: _Group, n: int, now: float) -> bool:
        """Account n more bytes to g, evicting older groups to stay within max_bytes."""
        if n > self._max_bytes:
            return False
        while self._stored + n > self._max_bytes:
            old_gid, old = next(iter(self._live.items()))
            if old is g:
                return False
            self._finish(old_gid, old, now)
        g.nbytes += n
        self._stored += n
        return True

    def _on_data(self, gid: int, g: _Group, index: int, packet: bytes, now: float) -> list[bytes]:
        if g.delivered >> index & 1:
            self.counters.duplicates += 1
            return []
        g.delivered |= 1 << index
        g.top = max(g.top, index)
        if g.k and (index >= g.k or len(packet) > g.size - 2):
            self.counters.inconsistent += 1
        elif self._store(gid, g, len(packet), now):
            g.data[index] = packet
        out = [packet]
        self._try_complete(gid, g, out, now)
        return out

    def _on_parity(
        self, gid: int, g: _Group, index: int, k: int, m: int, symbol: bytes, now: float
    ) -> list[bytes]:
        if not g.k:
            g.k, g.m, g.size = k, m, len(symbol)
            for i, p in list(g.data.items()):
                if i >= k or len(p) > g.size - 2:
                    del g.data[i]
                    g.nbytes -= len(p)
                    self._stored -= len(p)
                    self.counters.inconsistent += 1
        elif (k, m, len(symbol)) != (g.k, g.m, g.size):
            self.counters.inconsistent += 1
            return []
        if index in g.parity:
            self.counters.duplicates += 1
            return []
        if self._store(gid, g, len(symbol), now):
            g.parity[index] = symbol
        out: list[bytes] = []
        self._try_complete(gid, g, out, now)
        return out

    def _try_complete(self, gid: int, g: _Group, out: list[bytes], now: float) -> None:
        k = g.k
        if not k:
            return
        want = (1 << k) - 1
        if g.delivered & want != want and len(g.data) + len(g.parity) >= k:
            symbols = {i: make_symbol(p, g.size) for i, p in g.data.items()}
            symbols.update(g.parity)
            for i, sym in enumerate(self._code.recover(k, g.m, symbols)):
                if g.delivered >> i & 1:
                    continue
                try:
                    packet = symbol_payload(sym)
                except FecFrameError:
                    self.counters.inconsistent += 1
                    continue
                g.delivered |= 1 << i
                out.append(packet)
                self.counters.recovered += 1
        if g.delivered & want == want:
            self._finish(gid, g, now)

    def _finish(self, gid: int, g: _Group, now: float) -> None:
        del self._live[gid]
        self._stored -= g.nbytes
        # Without any parity the group's size is unknown (a flush deadline may have cut it short),
        # so only gaps below the highest data index count: a lost tail goes uncounted.
        expected = g.k or g.top + 1
        missing = expected - (g.delivered & ((1 << expected) - 1)).bit_count()
        if missing > 0:
            self.counters.unrecoverable_groups += 1
            self.counters.unrecovered_packets += missing
        done = self._done
        done[gid] = (g.delivered, now)
        while len(done) > self._max_tombstones:
            del done[next(iter(done))]
