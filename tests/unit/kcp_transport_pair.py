"""Two real KcpTransports in one event loop, each one's datagrams handed to the other's on_packet
on the next loop turn: the proxy's KCP side end to end, without a tunnel or a TUN device."""

from __future__ import annotations

import asyncio

from pytier.proxy.kcp import KcpStream, KcpTransport
from pytier.proxy.transport import Incoming

PEER_A, PEER_B = 11, 22


def linked_pair() -> tuple[KcpTransport, KcpTransport, asyncio.Queue[KcpStream]]:
    """Transports A and B (call from inside the loop); the streams B accepts arrive in the queue."""
    loop = asyncio.get_running_loop()
    transports: dict[int, KcpTransport] = {}

    def sender(me: int) -> object:
        def send(to: int, packet_type: int, payload: bytes) -> None:
            loop.call_soon(transports[to].on_packet, me, packet_type, payload)
        return send

    a = transports[PEER_A] = KcpTransport(PEER_A, sender(PEER_A))  # type: ignore[arg-type]
    b = transports[PEER_B] = KcpTransport(PEER_B, sender(PEER_B))  # type: ignore[arg-type]
    accepted: asyncio.Queue[KcpStream] = asyncio.Queue()

    def on_incoming(incoming: Incoming) -> None:
        accepted.put_nowait(incoming.accept())  # type: ignore[arg-type]

    b.on_incoming = on_incoming
    return a, b, accepted
