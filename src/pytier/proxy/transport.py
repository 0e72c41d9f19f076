"""What a stream transport (KCP, QUIC) offers the proxy, so the proxy never names one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pytier.proxy.entries import TransportType
from pytier.proxy.pipe import ProxyStream
from pytier.wire.messages import RoutePeerInfo


class ConnectRefused(Exception):
    """The destination node could not reach the real destination (refused, unreachable, timed out)."""


class Incoming(Protocol):
    """A stream another node opened toward us, not yet answered."""

    from_peer: int
    conn_data: bytes

    def accept(self) -> ProxyStream: ...

    def refuse(self) -> None: ...


class Transport(Protocol):
    kind: TransportType
    on_incoming: Callable[[Incoming], None] | None

    def accepts(self, dst: RoutePeerInfo, next_hop: RoutePeerInfo | None) -> bool:
        """Whether ``dst`` takes this transport from us (its advertised input flag, and the relay's
        permission when the first hop is not the destination itself)."""
        ...

    async def open(self, peer_id: int, conn_data: bytes) -> ProxyStream:
        """A stream to ``peer_id`` whose far end reached the destination in ``conn_data``; raises
        ConnectRefused when it could not."""
        ...

    def peer_gone(self, peer_id: int) -> None: ...

    async def close(self) -> None: ...
