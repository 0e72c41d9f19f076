"""Bounds of the proxy's own state: rows of closed connections go even when nobody lists them; a
burst of intercepted SYNs reaches the kernel listener a bounded number at a time."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from pytier.proxy.entries import CLOSED_ROW_LINGER_S, PURGE_MIN, EntryTable, ProxyEntry, TransportType
from pytier.proxy.service import MAX_UNACCEPTED, READY_ACCEPT_TIMEOUT_S, ProxyService
from pytier.wire.ipv4 import Ipv4Repr
from pytier.wire.messages import RoutePeerInfo
from pytier.wire.tcp import TcpFlags, TcpRepr


def test_closed_rows_go_without_anyone_listing_them() -> None:
    now = [0.0]
    table = EntryTable(clock=lambda: now[0])
    retired: list[dict[str, object]] = []
    table.on_retire = retired.append
    for i in range(20 * PURGE_MIN):
        key = table.add(ProxyEntry(f"10.0.0.2:{i}", "10.0.0.1:80", TransportType.Kcp))
        table.close(key)
        now[0] += CLOSED_ROW_LINGER_S / 100
    # Only rows closed within the linger (plus at most one purge interval's worth) are still held.
    assert len(table) <= 2 * max(PURGE_MIN, 100)
    assert len(retired) + len(table) == 20 * PURGE_MIN


def test_open_rows_are_never_purged() -> None:
    now = [0.0]
    table = EntryTable(clock=lambda: now[0])
    keys = [table.add(ProxyEntry(f"10.0.0.2:{i}", "10.0.0.1:80", TransportType.Quic))
            for i in range(3 * PURGE_MIN)]
    now[0] += 10 * CLOSED_ROW_LINGER_S
    table.add(ProxyEntry("10.0.0.2:1", "10.0.0.1:80", TransportType.Quic))
    assert table.live() == len(keys) + 1
    assert len(table.rows()) == len(keys) + 1


# ---- the source side's SYN gate ------------------------------------------------------------------

OWN = IPv4Interface("127.0.0.2/8")  # a loopback address, so that start() can bind its listener
DST = IPv4Address("127.0.0.9")  # another "node's" virtual address


class _Stream:
    """What the transport hands the service; only how it ended matters here."""

    def __init__(self) -> None:
        self.aborted = 0

    async def read(self) -> bytes:
        return b""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted += 1

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class _Transport:
    """A transport whose far end always answers at once: the gate, not the transport, is tested."""

    kind = TransportType.Kcp
    on_incoming = None

    def __init__(self) -> None:
        self.opened: list[_Stream] = []

    def accepts(self, dst: RoutePeerInfo, next_hop: RoutePeerInfo | None) -> bool:
        return True

    async def open(self, peer_id: int, conn_data: bytes) -> _Stream:
        self.opened.append(stream := _Stream())
        return stream

    def peer_gone(self, peer_id: int) -> None:
        pass

    async def close(self) -> None:
        pass


def _syn(sport: int) -> bytes:
    tcp = TcpRepr(src_port=sport, dst_port=80, seq=1000 + sport, ack=0, flags=TcpFlags.SYN, window=65535)
    segment = tcp.emit(OWN.ip, DST)
    return Ipv4Repr(src_addr=OWN.ip, dst_addr=DST, protocol=6, payload_len=len(segment)).emit(segment)


def _to_listener(written: list[bytes], port: int) -> list[bytes]:
    return [p for p in written if int.from_bytes(p[22:24], "big") == port]


def test_a_burst_of_syns_reaches_the_listener_a_bounded_number_at_a_time() -> None:
    async def scenario() -> None:
        written: list[bytes] = []
        transport = _Transport()
        service = ProxyService(own=OWN, write_tun=lambda p: written.append(bytes(p)),
                               peer_for_ip=lambda ip: 7, peer_info=lambda peer: RoutePeerInfo(peer_id=peer),
                               next_hop=lambda peer: peer, outbound=[transport], inbound=[])
        await service.start()
        try:
            assert service.nat is not None
            port = service.nat.listener_port
            burst = 3 * MAX_UNACCEPTED + 10
            for i in range(burst):
                assert service.on_tun_packet(_syn(20000 + i))
            await asyncio.sleep(0)  # the connects run; each stream opens at once
            await asyncio.sleep(0)
            assert len(transport.opened) == burst
            assert len(_to_listener(written, port)) == MAX_UNACCEPTED
            # Retransmitted SYNs of held clients are neither let through nor taken for new connections.
            for i in range(burst):
                service.on_tun_packet(_syn(20000 + i))
            assert len(transport.opened) == burst
            # Nobody completes a handshake: each round the expired ones are reset and as many of the
            # held ones go through, until none is left anywhere.
            now = time.monotonic()
            for _ in range(4):
                now += READY_ACCEPT_TIMEOUT_S + 1
                service._expire_ready(now)
            released = {bytes(p[20:22]) for p in _to_listener(written, port)}
            assert len(released) == burst
            assert [s.aborted for s in transport.opened] == [1] * burst
            assert service.entries.live() == 0
            assert not service._ready and not service._held and not service._pending
        finally:
            await service.close()

    asyncio.run(scenario())
