"""What every underlay tunnel offers the peer layer: opaque packets in and out, and a close signal."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytier.tunnel.udp_socket import SocketStats

log = logging.getLogger("pytier.tunnel")

PacketHandler = Callable[["Tunnel", bytes], None]
BatchHandler = Callable[["Tunnel", list[bytes]], None]
CloseHandler = Callable[["Tunnel", str], None]


@dataclass(slots=True)
class TunnelStats:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    # Sends the OS refused (EPERM from a firewall, ENOBUFS, no route): counted as loss, never fatal.
    tx_errors: int = 0
    rx_malformed: int = 0


@dataclass(slots=True)
class TunnelInfo:
    scheme: str
    local_addr: str
    remote_addr: str
    is_client: bool
    extra: dict[str, str] = field(default_factory=dict)


class Tunnel:
    """One underlay connection to one other node; carries whole peer packets (header + payload)."""

    def __init__(self, info: TunnelInfo) -> None:
        self.info = info
        self.stats = TunnelStats()
        # The batching counters of the UDP socket under this tunnel; a listener's socket is shared.
        self.socket_stats: SocketStats | None = None
        self.closed = False
        self.close_reason = ""
        self._on_packet: PacketHandler | None = None
        self._on_packets: BatchHandler | None = None
        self._on_close: CloseHandler | None = None
        # Packets that arrive before the owner attached (e.g. right after a UDP Sack) wait here.
        self._early: list[bytes] = []

    def set_handlers(self, on_packet: PacketHandler, on_close: CloseHandler,
                     on_packets: BatchHandler | None = None) -> None:
        """`on_packets`, if given, takes the batches that `deliver_many` hands over in one call."""
        self._on_packet = on_packet
        self._on_packets = on_packets
        self._on_close = on_close
        early, self._early = self._early, []
        for pkt in early:
            on_packet(self, pkt)
        if self.closed:
            on_close(self, self.close_reason)

    def deliver(self, packet: bytes) -> None:
        self.stats.rx_packets += 1
        self.stats.rx_bytes += len(packet)
        handler = self._on_packet
        if handler is None:
            if len(self._early) < 64:
                self._early.append(packet)
            return
        handler(self, packet)

    def deliver_many(self, packets: list[bytes]) -> None:
        """Several packets that arrived together (one GRO read), in order."""
        batch = self._on_packets
        if batch is None or self._on_packet is None:
            for packet in packets:
                self.deliver(packet)
            return
        stats = self.stats
        stats.rx_packets += len(packets)
        stats.rx_bytes += sum(map(len, packets))
        batch(self, packets)

    def send(self, packet: bytes) -> None:
        raise NotImplementedError

    def close(self, reason: str = "closed locally") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._close_transport()
        if self._on_close is not None:
            self._on_close(self, reason)

    def _close_transport(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        i = self.info
        return f"<{type(self).__name__} {i.scheme} {i.local_addr} -> {i.remote_addr}>"


class Listener:
    """What the node reads from every listener: its address, and what it dropped or refused by reason."""

    def __init__(self) -> None:
        self.local_addr = ""
        self.counters: collections.Counter[str] = collections.Counter()
        self.rx_malformed = 0

    @property
    def tx_errors(self) -> int:
        return 0

    @property
    def socket_stats(self) -> SocketStats | None:
        return None

    def close(self) -> None:
        raise NotImplementedError
