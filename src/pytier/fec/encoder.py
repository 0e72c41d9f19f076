"""The sending half of FEC: data frames at once, parity when an interleaved block closes.

Sans-IO: `push(packet, now)` returns the frames to send now, in order; `poll(now)` returns the
parity of a block whose flush deadline passed, and `next_deadline()` tells the shell when to call
it. A block is `depth` groups filled round-robin: packet i goes to group i mod depth. The frames
of a block leave in one strict rotation over its groups (data as it comes, then the parity
continuing the rotation where the data stopped), so any run of depth * m consecutive frames holds
at most m of each group: a burst that long costs no group more than its parity.

A block closes when it holds depth * k packets, or at its flush deadline (first packet + flush_s),
so a quiet sender's last packets are protected too. A block closed early shrinks: only its
non-empty groups count, each with k = the packets it got, and m scaled to the share of k its
fullest group reached (at least 1), which keeps the parity share of a short block near the
nominal one.
"""

from __future__ import annotations

import math

from pytier.fec.counters import EncoderCounters
from pytier.fec.erasure import ErasureCode, make_symbol
from pytier.fec.framing import HEADER_LEN, MAX_PAYLOAD, FrameKind, emit_frame
from pytier.fec.params import FecParams

__all__ = ["DEFAULT_FLUSH_S", "MAX_PACKET", "FecEncoder"]

DEFAULT_FLUSH_S = 0.010  # seconds a block may stay open: a lost packet's repair waits at most this
# The symbol adds a 2-byte length to the packet, and a parity frame carries one symbol.
MAX_PACKET = MAX_PAYLOAD - 2


class FecEncoder:
    """Frames packets into interleaved FEC groups; see the module docstring for the order."""

    __slots__ = (
        "_base",
        "_code",
        "_count",
        "_deadline",
        "_flush_s",
        "_groups",
        "_next_group",
        "_params",
        "counters",
    )

    def __init__(
        self,
        params: FecParams | None = None,
        *,
        flush_s: float = DEFAULT_FLUSH_S,
        first_group: int = 0,
        code: ErasureCode | None = None,
    ) -> None:
        if not (flush_s > 0 and math.isfinite(flush_s)):
            raise ValueError(f"FEC flush deadline {flush_s} s must be a finite number > 0")
        self._params = params
        self._flush_s = flush_s
        self._code = code or ErasureCode()
        self._next_group = first_group & 0xFFFFFFFF
        self._groups: list[list[bytes]] = []
        self._base = 0
        self._count = 0
        self._deadline: float | None = None
        self.counters = EncoderCounters()

    @property
    def params(self) -> FecParams | None:
        """The current shape; None means FEC is off and the caller sends packets unframed."""
        return self._params

    def set_params(self, params: FecParams | None) -> list[bytes]:
        """Switch shape (None: off); returns the parity of the block the old shape had open."""
        out = self._close() if params != self._params else []
        self._params = params
        return out

    def push(self, packet: bytes, now: float) -> list[bytes]:
        """The data frame of `packet`, then any parity due: of an overdue block first, or of this one."""
        params = self._params
        if params is None:
            raise ValueError("FEC is off: send the packet unframed")
        if len(packet) > MAX_PACKET:
            raise ValueError(f"packet of {len(packet)} bytes exceeds FEC's {MAX_PACKET}")
        out = self.poll(now)
        depth = params.depth
        if self._deadline is None:
            self._groups = [[] for _ in range(depth)]
            self._base = self._next_group
            self._next_group = (self._next_group + depth) & 0xFFFFFFFF
            self._deadline = now + self._flush_s
        slot = self._count % depth
        group = self._groups[slot]
        out.append(
            emit_frame(FrameKind.DATA, self._base + slot, len(group), params.k, params.m, packet)
        )
        group.append(packet)
        self._count += 1
        self.counters.data_frames += 1
        self.counters.data_bytes += HEADER_LEN + len(packet)
        if self._count == depth * params.k:
            out.extend(self._close())
        return out

    def poll(self, now: float) -> list[bytes]:
        """Parity of the open block if its flush deadline has passed, else nothing."""
        if self._deadline is not None and now >= self._deadline:
            return self._close()
        return []

    def next_deadline(self) -> float | None:
        return self._deadline

    def _close(self) -> list[bytes]:
        params = self._params
        count = self._count
        if params is None or count == 0:
            return []
        groups = [g for g in self._groups if g]
        n_groups = len(groups)
        fullest = len(groups[0])
        full = count == params.depth * params.k
        m = params.m if full else max(1, math.ceil(params.m * fullest / params.k))
        parity: list[list[bytes]] = []
        for g in groups:
            size = 2 + max(len(p) for p in g)
            parity.append(self._code.parity([make_symbol(p, size) for p in g], m))
        out: list[bytes] = []
        for t in range(n_groups * m):
            slot = (count + t) % n_groups
            j = t // n_groups
            k = len(groups[slot])
            out.append(emit_frame(FrameKind.PARITY, self._base + slot, k + j, k, m, parity[slot][j]))
        self.counters.groups += n_groups
        self.counters.parity_frames += len(out)
        self.counters.parity_bytes += sum(len(f) for f in out)
        if not full:
            self.counters.short_groups += sum(1 for g in groups if len(g) < params.k)
        self._groups = []
        self._count = 0
        self._deadline = None
        return out
