"""The KCP lane of the FEC glue: its framing kinds, KcpSrc/KcpDst packets that arrive or are rebuilt
handed to the registered KCP handlers (never to the UDP side), what is sent toward which peer, and
the peer view with both lanes (the real encoder and decoder)."""

from __future__ import annotations

import struct
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from pytier.fec import FecParams
from pytier.mgmt.metrics import ProxyTotals, node_families, render
from pytier.peers.fec_link import (
    KCP_FLUSH_S,
    KIND_FRAME,
    KIND_KCP_FRAME,
    KIND_KCP_PLAIN,
    KIND_KCP_REPORT,
    KIND_PLAIN,
    LANE_KCP,
    MAX_PROTECTED_PACKET,
    FecReceiver,
    FecSender,
    FecService,
    decode_report,
)
from pytier.wire.peer_header import PacketType

PEER = 7


class Harness:
    """A FecService with the KCP handlers registered, and what reached each side."""

    def __init__(self, *, usable: bool = True, enabled_kcp: bool = True) -> None:
        self.sent: list[bytes] = []
        self.ip: list[bytes] = []
        self.kcp: list[tuple[int, int, bytes]] = []
        self.service = FecService(enabled=False, enabled_kcp=enabled_kcp, send=self._send,
                                  deliver=lambda _peer, packet: self.ip.append(packet),
                                  usable=lambda _peer: usable)
        for ptype in (PacketType.KcpSrc, PacketType.KcpDst):
            self.service.register(ptype, self._handler(int(ptype)))

    def _send(self, _peer: int, payload: bytes) -> bool:
        self.sent.append(payload)
        return True

    def _handler(self, ptype: int) -> Callable[[int, bytes], None]:
        return lambda peer, payload: self.kcp.append((peer, ptype, payload))


def kcp_packets(n: int) -> list[tuple[int, bytes]]:
    return [(int(PacketType.KcpSrc if i % 3 else PacketType.KcpDst), i.to_bytes(4, "big") + bytes(i % 300))
            for i in range(n)]


def test_kcp_lane_hands_arrived_and_rebuilt_packets_to_the_kcp_handlers_once() -> None:
    rx = Harness()
    tx = FecSender(KCP_FLUSH_S, LANE_KCP)
    tx.encoder.set_params(FecParams(8, 3, 2))
    packets = kcp_packets(160)
    frames: list[bytes] = []
    for i, (ptype, payload) in enumerate(packets):
        wrapped = tx.wrap(bytes((ptype,)) + payload, i * 0.001)
        assert wrapped is not None
        frames += wrapped
    frames += tx.poll(1.0)
    assert {f[0] for f in frames} == {KIND_KCP_FRAME}
    # every fifth frame lost, one frame twice
    arrived = [f for i, f in enumerate(frames) if i % 5 != 2] + [frames[0]]
    for f in arrived:
        rx.service.on_packet(PEER, f)
    assert sorted(rx.kcp) == sorted((PEER, ptype, payload) for ptype, payload in packets)
    assert rx.ip == []
    totals = rx.service.totals()
    assert totals["fec_kcp_rx_recovered"] == totals["fec_rx_recovered"] > 0
    assert totals["fec_kcp_rx_packets"] == len(packets)
    # the receiver reports the loss it saw, as a KCP_REPORT the sender's lane takes
    report = rx.service._kcp.receivers[PEER].report(2.0)
    assert report is not None and report[0] == KIND_KCP_REPORT
    sample = decode_report(report)
    assert sample is not None and sample.lost > 0


def test_udp_lane_still_delivers_ip_packets_and_lanes_keep_their_own_sequence() -> None:
    rx = Harness()
    udp = FecSender()
    ip = bytes((0x45,)) + bytes(40)
    for frame in udp.wrap(ip, 0.0) or []:
        assert frame[0] == KIND_PLAIN
        rx.service.on_packet(PEER, frame)
    assert rx.ip == [ip] and rx.kcp == []
    # an IP packet on the KCP lane has no KCP handler: counted, not handed to anyone
    kcp = FecSender(KCP_FLUSH_S, LANE_KCP)
    for frame in kcp.wrap(ip, 0.0) or []:
        assert frame[0] == KIND_KCP_PLAIN
        rx.service.on_packet(PEER, frame)
    assert rx.ip == [ip] and rx.kcp == []
    assert rx.service.totals()["fec_kcp_rx_malformed"] == 1
    assert rx.service._udp.receivers[PEER].meter.packets == 1
    assert rx.service._kcp.receivers[PEER].meter.packets == 1


def test_send_side_takes_kcp_only_with_the_flag_toward_a_usable_peer_and_within_the_mtu() -> None:
    on = Harness()
    assert on.service.send_peer_packet(PEER, int(PacketType.KcpSrc), b"kcp")
    [payload] = on.sent
    kind, _seq = struct.unpack_from(">BI", payload)
    assert kind == KIND_KCP_PLAIN and payload[5:] == bytes((PacketType.KcpSrc,)) + b"kcp"
    # too big for one underlay datagram once framed: the caller sends it plain (counted)
    assert not on.service.send_peer_packet(PEER, int(PacketType.KcpDst), bytes(MAX_PROTECTED_PACKET))
    assert on.service.totals()["fec_tx_too_big"] == 1
    for off in (Harness(enabled_kcp=False), Harness(usable=False)):
        assert not off.service.send_peer_packet(PEER, int(PacketType.KcpSrc), b"kcp")
        assert off.sent == []
    # --enable-fec-kcp alone leaves UDP packets to plain Data
    assert on.service.enabled is False


@given(st.binary(max_size=64))
def test_service_takes_arbitrary_bytes(data: bytes) -> None:
    h = Harness()
    prefixes = [b"", *(bytes((kind, 0, 0, 0, 1)) for kind in range(8)), bytes((KIND_KCP_FRAME,)),
                bytes((KIND_FRAME, 0, 0, 0, 2, 0x10))]
    for prefix in prefixes:
        h.service.on_packet(PEER, prefix + data)
    r = FecReceiver(LANE_KCP)
    r.receive(bytes((KIND_KCP_FRAME, 0, 0, 0, 1)) + data, 0.0)
    report = r.report(1.0)
    assert report is None or decode_report(report) is not None


def test_peer_view_and_metrics_with_both_lanes() -> None:
    h = Harness()
    h.service.enabled = True
    h.service.send_udp(PEER, bytes((0x45,)) + bytes(40))
    h.service.send_peer_packet(PEER, int(PacketType.KcpSrc), b"kcp")
    h.service._kcp.senders[PEER].encoder.set_params(FecParams(32, 20, 2))
    row = h.service.describe(PEER, True)
    assert row["fec"] == "udp off, kcp 32+20x2" and row["fec_kcp"] == "32+20x2"
    assert row["fec_tx_data"] == 0
    only_kcp = Harness()
    only_kcp.service.send_peer_packet(PEER, int(PacketType.KcpSrc), b"kcp")
    assert only_kcp.service.describe(PEER, True)["fec"] == "off"
    assert h.service.describe(PEER, False) == {"fec": None}
    assert h.service.kcp_shape(PEER) == "32+20x2" and only_kcp.service.kcp_shape(PEER) == "off"
    assert Harness(usable=False).service.kcp_shape(PEER) is None
    assert Harness(enabled_kcp=False).service.kcp_shape(PEER) is None
    rows = [{"peer_id": 2, "hostname": "b", "tunnel": "udp", **row}]
    text = render(node_families({}, {}, rows, None, ProxyTotals()))
    assert 'pytier_peer_fec_parity_ratio{peer_id="2",hostname="b"} 0.625' in text
