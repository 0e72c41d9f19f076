"""The proxy entry table behind `pytier-cli proxy`: one row per proxied TCP connection, on both sides."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Rows stay visible this long after their connection closed, so a user sees how it ended.
CLOSED_ROW_LINGER_S = 5.0
# Rows held before add() drops the expired ones; then twice what was left (amortised O(1) per add).
PURGE_MIN = 256


class EntryState(enum.IntEnum):
    """EasyTier's TcpProxyEntryState numbering."""

    Unknown = 0
    SynReceived = 1
    ConnectingDst = 2
    Connected = 3
    Closed = 4
    ClosingSrc = 5
    ClosingDst = 6


class TransportType(enum.IntEnum):
    """EasyTier's TcpProxyEntryTransportType numbering."""

    Tcp = 0
    Kcp = 1
    Quic = 2


@dataclass(slots=True)
class ProxyEntry:
    src: str
    dst: str
    transport: TransportType
    state: EntryState = EntryState.SynReceived
    start_time: float = field(default_factory=time.time)
    # Bytes from the TCP client toward the destination, and back.
    tx_bytes: int = 0
    rx_bytes: int = 0
    closed_at: float | None = None
    peer_id: int | None = None
    stats: Callable[[], dict[str, Any]] | None = None
    why: str | None = None  # --proxy-transport auto: what it measured and chose

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "src": self.src,
            "dst": self.dst,
            "start_time": int(self.start_time),
            "state": self.state.name,
            "transport_type": self.transport.name,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "peer_id": self.peer_id,
        }
        if self.why is not None:
            row["why"] = self.why
        if self.stats is not None:
            row.update(self.stats())
        return row


class EntryTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[int, ProxyEntry] = {}
        self._next = 0
        self._clock = clock
        self._purge_at = PURGE_MIN
        self.closed_total = 0  # rows closed since the table was made
        # Told each row as it leaves the table, so that totals over all connections (the metrics) can
        # keep what it carried.
        self.on_retire: Callable[[dict[str, Any]], None] | None = None

    def add(self, entry: ProxyEntry) -> int:
        # Closed rows also go here, not only when someone lists them: a node nobody queries would
        # otherwise keep a row for every connection it ever proxied.
        if len(self._entries) >= self._purge_at:
            self.purge()
            self._purge_at = max(PURGE_MIN, 2 * len(self._entries))
        self._next += 1
        self._entries[self._next] = entry
        return self._next

    def get(self, key: int) -> ProxyEntry:
        return self._entries[key]

    def close(self, key: int) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.closed_at is None:
            entry.state = EntryState.Closed
            entry.closed_at = self._clock()
            self.closed_total += 1

    def purge(self) -> None:
        """Drop the closed rows past their linger."""
        now = self._clock()
        for key in [k for k, e in self._entries.items()
                    if e.closed_at is not None and now - e.closed_at > CLOSED_ROW_LINGER_S]:
            entry = self._entries.pop(key)
            if self.on_retire is not None:
                self.on_retire(entry.row())

    def rows(self) -> list[dict[str, Any]]:
        self.purge()
        return [e.row() for e in self._entries.values()]

    def __len__(self) -> int:
        """Rows held, closed ones still lingering included."""
        return len(self._entries)

    def live(self) -> int:
        return sum(1 for e in self._entries.values() if e.closed_at is None)
