"""KcpEndpoint: handshake, hedged connect, half close, reset, keepalive, expiry, garbage, leaks.

Two endpoints (peer ids 1 and 2) talk through the virtual-time link model; a filter on each side can
drop chosen packets, and every packet put on the wire is logged with its time so the tests can check
the bytes EasyTier's KCP proxy expects (wire protocol notes §7.1).
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytier.testbed.link_model import DuplexLink, LinkParams, SansIoNode, run_link
from pytier.transport.kcp_config import KcpConfig
from pytier.transport.kcp_endpoint import KcpEndpoint
from pytier.transport.kcp_events import (
    CloseReason,
    Connected,
    ConnectFailed,
    ConnectionClosed,
    DataReceived,
    IncomingConnection,
    KcpEvent,
    PeerFinished,
)
from pytier.wire.kcp_header import KCP_HEADER_LEN, KcpFlag, pack_kcp_header, unpack_kcp_header
from pytier.wire.messages import KcpConnData, SocketAddr

KCP_SRC, KCP_DST = 11, 12
SYN, ACK, FIN, DATA, RST, PING, PONG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
CONN_DATA = KcpConnData(
    SocketAddr(IPv4Address("10.144.144.3"), 43292), SocketAddr(IPv4Address("10.144.144.1"), 7001)
).encode()

Packet = tuple[int, int, bytes]  # (from_peer, packet_type, payload)
E = TypeVar("E")


@dataclass
class Side:
    ep: KcpEndpoint
    events: list[tuple[float, KcpEvent]] = field(default_factory=list)
    data: dict[int, bytearray] = field(default_factory=dict)
    wire: list[tuple[float, int, bytes]] = field(default_factory=list)  # (time, type, payload) sent
    drop: Callable[[float, int, bytes], bool] | None = None
    auto_accept: bool = True
    on_event: Callable[[float, KcpEvent], object] | None = None
    after_events: Callable[[float], None] | None = None  # the application's writes

    def app(self, now: float) -> None:
        while (event := self.ep.next_event()) is not None:
            self.events.append((now, event))
            if isinstance(event, DataReceived):
                self.data.setdefault(event.handle, bytearray()).extend(event.data)
            elif isinstance(event, IncomingConnection) and self.auto_accept:
                self.ep.accept(event.handle, now)
            if self.on_event is not None:
                self.on_event(now, event)
        if self.after_events is not None:
            self.after_events(now)

    def transmit(self, now: float) -> list[tuple[Packet, int]]:
        out: list[tuple[Packet, int]] = []
        for _to, ptype, payload in self.ep.datagrams_to_send(now):
            self.wire.append((now, ptype, payload))
            if self.drop is not None and self.drop(now, ptype, payload):
                continue
            out.append(((self.ep.my_peer_id, ptype, payload), len(payload)))
        return out

    def node(self) -> SansIoNode[Packet]:
        ep = self.ep
        return SansIoNode(
            receive=lambda item, now: ep.receive(item[0], item[1], item[2], now),
            transmit=self.transmit,
            get_timer=ep.get_timer,
            handle_timer=ep.handle_timer,
            app=self.app,
        )

    def of(self, kind: type[E]) -> list[E]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def flags(self) -> list[int]:
        return [unpack_kcp_header(p)[3] for _, _, p in self.wire]


class Pair:
    def __init__(
        self,
        config: KcpConfig | None = None,
        *,
        delay: float = 0.005,
        loss: float = 0.0,
        rate_bps: float | None = None,
    ) -> None:
        cfg = config or KcpConfig()
        self.now = 0.0
        self.a = Side(KcpEndpoint(1, now=0.0, config=cfg, rng=random.Random(1)))
        self.b = Side(KcpEndpoint(2, now=0.0, config=cfg, rng=random.Random(2)))
        self.link: DuplexLink[Packet] = DuplexLink(
            LinkParams(delay_s=delay, rate_bps=rate_bps, loss=loss), seed=7
        )

    def run(self, seconds: float, stop: Callable[[], bool] | None = None) -> None:
        self.now = run_link(
            self.link, self.a.node(), self.b.node(), start=self.now, until=self.now + seconds, stop=stop
        )

    def connect(self) -> tuple[int, int]:
        """A connects to B and both sides are established; returns (handle at A, handle at B)."""
        ha = self.a.ep.connect(2, CONN_DATA, self.now)
        self.run(
            2.0,
            stop=lambda: bool(self.a.of(Connected)) and self.b.ep.stats(self.hb())["state"] == "established",
        )
        assert self.a.of(Connected) == [Connected(ha)]
        return ha, self.hb()

    def hb(self) -> int:
        incoming = self.b.of(IncomingConnection)
        assert len(incoming) == 1
        return incoming[0].handle


def hdr(payload: bytes) -> tuple[int, int, int, int]:
    return unpack_kcp_header(payload)


def connected_count_is(side: Side, n: int) -> bool:
    return len(side.of(Connected)) == n


# --- handshake ---------------------------------------------------------------------------------


def test_handshake_speaks_easytier_bytes_and_carries_data_both_ways() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    (incoming,) = pair.b.of(IncomingConnection)
    assert incoming == IncomingConnection(hb, 1, CONN_DATA)

    _, ptype, syn = pair.a.wire[0]
    conv, src, dst, flag = hdr(syn)
    assert (ptype, src, dst, flag) == (KCP_SRC, 1, 2, SYN)
    assert syn[KCP_HEADER_LEN:] == CONN_DATA
    assert syn[13] == 0  # rsv
    _, ptype, synack = pair.b.wire[0]
    assert ptype == KCP_DST and hdr(synack) == (conv, 1, 2, SYN | ACK) and len(synack) == KCP_HEADER_LEN
    _, ptype, ack = pair.a.wire[1]
    assert ptype == KCP_SRC and hdr(ack) == (conv, 1, 2, ACK | DATA) and len(ack) == KCP_HEADER_LEN

    assert pair.a.ep.send(ha, b"hello from A") == 12
    assert pair.b.ep.send(hb, b"hello from B") == 12
    pair.run(1.0, stop=lambda: len(pair.b.data.get(hb, b"")) == 12 and len(pair.a.data.get(ha, b"")) == 12)
    assert bytes(pair.b.data[hb]) == b"hello from A"
    assert bytes(pair.a.data[ha]) == b"hello from B"
    for side, ptype_expected in ((pair.a, KCP_SRC), (pair.b, KCP_DST)):
        for _, ptype, payload in side.wire[2 if side is pair.a else 1 :]:
            assert ptype == ptype_expected and hdr(payload) == (conv, 1, 2, ACK | DATA)
            if len(payload) > KCP_HEADER_LEN:
                assert payload[KCP_HEADER_LEN + 4] in (81, 82, 83, 84)  # ikcp segment commands
    assert pair.a.ep.stats(ha)["bytes_received"] == 12 and pair.b.ep.stats(hb)["bytes_sent"] == 12


def test_hedged_connect_survives_lost_syns() -> None:
    pair = Pair()
    lost: list[int] = []

    def drop_two_syns(now: float, ptype: int, payload: bytes) -> bool:
        if hdr(payload)[3] == SYN and len(lost) < 2:
            lost.append(hdr(payload)[0])
            return True
        return False

    pair.a.drop = drop_two_syns
    ha, hb = pair.connect()
    syns = [(t, hdr(p)[0]) for t, _, p in pair.a.wire if hdr(p)[3] == SYN]
    assert [round(t, 3) for t, _ in syns] == [0.0, 0.2, 0.4]
    first = syns[0][1]
    assert [c for _, c in syns] == [first, (first + 1) & 0xFFFFFFFF, (first + 2) & 0xFFFFFFFF]
    won = hdr(pair.b.wire[0][2])[0]
    assert won == syns[2][1]
    # the two lost attempts are reset by the initiator once the third one won
    resets = sorted(hdr(p)[0] for _, _, p in pair.a.wire if hdr(p)[3] == RST)
    assert resets == sorted(lost)
    pair.run(1.0)
    assert pair.a.ep.handles() == [ha] and pair.b.ep.handles() == [hb]


def test_hedged_syns_attach_to_a_pending_accept() -> None:
    pair = Pair()
    pair.b.auto_accept = False
    ha = pair.a.ep.connect(2, CONN_DATA, 0.0)
    pair.run(1.5)
    (incoming,) = pair.b.of(IncomingConnection)  # five attempts, one connection
    syn_convs = {hdr(p)[0] for _, _, p in pair.a.wire if hdr(p)[3] == SYN}
    assert len(syn_convs) == 5
    assert pair.b.ep.counters["rx_hedged_syn"] >= 4
    pair.b.ep.accept(incoming.handle, pair.now)
    pair.run(1.0, stop=lambda: bool(pair.a.of(Connected)))
    assert pair.a.of(Connected) == [Connected(ha)]
    synacks = {hdr(p)[0] for _, _, p in pair.b.wire if hdr(p)[3] == SYN | ACK}
    assert len(synacks) == 1  # only the first triple is answered
    pair.run(1.0)
    assert pair.a.ep.handles() == [ha] and pair.b.ep.handles() == [incoming.handle]
    assert pair.b.ep.stats(incoming.handle)["state"] == "established"


def test_refused_connect_fails_at_the_initiator() -> None:
    pair = Pair()
    pair.b.auto_accept = False
    pair.b.on_event = lambda now, ev: (
        pair.b.ep.refuse(ev.handle) if isinstance(ev, IncomingConnection) else None
    )
    ha = pair.a.ep.connect(2, CONN_DATA, 0.0)
    pair.run(3.0, stop=lambda: bool(pair.a.of(ConnectFailed)))
    assert pair.a.of(ConnectFailed) == [ConnectFailed(ha, CloseReason.REFUSED)]
    assert pair.now < 0.1
    (closed,) = pair.b.of(ConnectionClosed)
    assert closed.reason is CloseReason.REFUSED
    assert RST in pair.b.flags()
    pair.run(1.0)
    assert pair.a.ep.handles() == [] and pair.b.ep.handles() == []


def test_connect_times_out_when_nothing_answers() -> None:
    pair = Pair(KcpConfig(connect_timeout_s=2.0))
    pair.a.drop = lambda now, ptype, payload: True
    ha = pair.a.ep.connect(2, CONN_DATA, 0.0)
    pair.run(5.0, stop=lambda: bool(pair.a.of(ConnectFailed)))
    assert pair.a.of(ConnectFailed) == [ConnectFailed(ha, CloseReason.CONNECT_TIMEOUT)]
    assert 2.0 <= pair.now < 2.1
    syns = [hdr(p) for _, _, p in pair.a.wire if hdr(p)[3] == SYN]
    assert len({s[0] for s in syns}) == 5 and len(syns) > 5  # five attempts, each retransmitted


def test_lost_synack_is_retransmitted() -> None:
    pair = Pair()
    dropped: list[float] = []

    def drop_first_synack(now: float, ptype: int, payload: bytes) -> bool:
        if hdr(payload)[3] == SYN | ACK and not dropped:
            dropped.append(now)
            return True
        return False

    pair.b.drop = drop_first_synack
    pair.a.drop = lambda now, ptype, payload: hdr(payload)[3] == SYN and now > 0  # no hedges get through
    ha, _ = pair.connect()
    assert dropped and pair.a.of(Connected) == [Connected(ha)]
    assert pair.now < 0.5


def test_acceptor_speaks_first_when_the_handshake_ack_is_lost() -> None:
    pair = Pair()
    pair.a.drop = lambda now, ptype, payload: len(payload) == KCP_HEADER_LEN and hdr(payload)[3] == ACK | DATA
    pair.b.on_event = lambda now, ev: (
        pair.b.ep.send(ev.handle, b"220 ready") if isinstance(ev, IncomingConnection) else None
    )
    ha = pair.a.ep.connect(2, CONN_DATA, 0.0)
    pair.run(2.0, stop=lambda: bytes(pair.a.data.get(ha, b"")) == b"220 ready")
    assert bytes(pair.a.data[ha]) == b"220 ready"
    hb = pair.hb()
    pair.run(0.5)
    assert pair.b.ep.stats(hb)["state"] == "established"


# --- closing -----------------------------------------------------------------------------------


def test_half_close_in_both_directions() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    up = random.Random(1).randbytes(100_000)
    down = random.Random(2).randbytes(60_000)
    assert pair.a.ep.send(ha, up) == len(up)
    pair.a.ep.shutdown_write(ha)
    pair.run(3.0, stop=lambda: bool(pair.b.of(PeerFinished)))
    assert bytes(pair.b.data[hb]) == up
    assert pair.b.of(PeerFinished) == [PeerFinished(hb)]
    assert pair.a.ep.stats(ha)["state"] == "local-closed" and pair.b.ep.stats(hb)["state"] == "peer-closed"
    assert pair.a.ep.writable(ha) == 0 and pair.b.ep.writable(hb) > 0
    fins = [(p, t) for _, t, p in pair.a.wire if hdr(p)[3] == FIN]
    assert fins and all(len(p) == KCP_HEADER_LEN for p, _ in fins)

    assert pair.b.ep.send(hb, down) == len(down)
    pair.b.ep.shutdown_write(hb)
    pair.run(
        3.0, stop=lambda: len(pair.a.of(ConnectionClosed)) == 1 and len(pair.b.of(ConnectionClosed)) == 1
    )
    assert bytes(pair.a.data[ha]) == down
    assert pair.a.of(PeerFinished) == [PeerFinished(ha)]
    (ca,) = pair.a.of(ConnectionClosed)
    (cb,) = pair.b.of(ConnectionClosed)
    assert ca.reason is CloseReason.FINISHED and cb.reason is CloseReason.FINISHED
    assert ca.stats["bytes_sent"] == len(up) and ca.stats["bytes_received"] == len(down)
    assert pair.a.ep.handles() == [] and pair.b.ep.handles() == []


def test_lost_fin_is_retransmitted() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    pair.a.drop = lambda now, ptype, payload: (
        hdr(payload)[3] == FIN and sum(1 for _, _, p in pair.a.wire if hdr(p)[3] == FIN) == 1
    )
    pair.a.ep.shutdown_write(ha)
    pair.run(3.0, stop=lambda: bool(pair.b.of(PeerFinished)))
    assert pair.b.of(PeerFinished) == [PeerFinished(hb)]
    assert sum(1 for f in pair.a.flags() if f == FIN) == 2


def test_abort_resets_the_peer() -> None:
    pair = Pair()
    ha, _ = pair.connect()
    pair.a.ep.abort(ha)
    pair.run(1.0, stop=lambda: bool(pair.b.of(ConnectionClosed)))
    assert [e.reason for e in pair.a.of(ConnectionClosed)] == [CloseReason.ABORTED]
    assert [e.reason for e in pair.b.of(ConnectionClosed)] == [CloseReason.RESET]
    assert hdr(pair.a.wire[-1][2])[3] == RST
    assert pair.a.ep.handles() == [] and pair.b.ep.handles() == []


def test_data_after_close_resets() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    pair.a.ep.close(ha)
    pair.run(0.5)
    pair.b.ep.send(hb, b"nobody listens")
    pair.run(1.0, stop=lambda: bool(pair.b.of(ConnectionClosed)))
    assert [e.reason for e in pair.a.of(ConnectionClosed)] == [CloseReason.ABORTED]
    assert [e.reason for e in pair.b.of(ConnectionClosed)] == [CloseReason.RESET]
    assert ha not in pair.a.data


# --- liveness ----------------------------------------------------------------------------------


def test_keepalive_pings_are_answered_and_keep_the_conversation() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    start = pair.now
    pair.run(75.0)
    pings = [(t, p) for t, _, p in pair.a.wire + pair.b.wire if hdr(p)[3] == PING and t > start]
    pongs = [(t, p) for t, _, p in pair.a.wire + pair.b.wire if hdr(p)[3] == PING | PONG and t > start]
    assert len(pings) >= 7 and len(pongs) == len(pings)
    assert all(len(p) == KCP_HEADER_LEN for _, p in pings + pongs)
    assert pair.a.ep.stats(ha)["state"] == "established" and pair.b.ep.stats(hb)["state"] == "established"


def test_silent_peer_expires() -> None:
    pair = Pair(KcpConfig(idle_timeout_s=3.0, keepalive_s=1.0))
    pair.connect()
    cut = pair.now
    pair.a.drop = pair.b.drop = lambda now, ptype, payload: True
    pair.run(10.0, stop=lambda: bool(pair.a.of(ConnectionClosed)) and bool(pair.b.of(ConnectionClosed)))
    for side in (pair.a, pair.b):
        ((when, closed),) = [(t, e) for t, e in side.events if isinstance(e, ConnectionClosed)]
        assert closed.reason is CloseReason.IDLE_TIMEOUT
        assert cut + 2.9 < when < cut + 3.1
        assert side.ep.handles() == []


def test_unknown_triples_get_rst_and_rst_gets_nothing() -> None:
    ep = KcpEndpoint(2, now=0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(77, 1, 2, ACK | DATA) + b"\x00" * 30, 0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(78, 1, 2, RST), 0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(79, 1, 2, PING), 0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(80, 1, 2, PING | PONG), 0.0)
    ep.receive(1, KCP_DST, pack_kcp_header(81, 2, 1, SYN), 0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(82, 1, 2, FIN), 0.0)
    out = ep.datagrams_to_send(0.0)
    assert out == [
        (1, KCP_DST, pack_kcp_header(77, 1, 2, RST)),
        (1, KCP_DST, pack_kcp_header(79, 1, 2, RST)),
        (1, KCP_SRC, pack_kcp_header(81, 2, 1, RST)),
        (1, KCP_DST, pack_kcp_header(82, 1, 2, RST)),
    ]
    assert ep.next_event() is None and ep.handles() == []


def test_peer_gone_closes_all_its_conversations() -> None:
    pair = Pair()
    ha1, hb1 = pair.connect()
    hb2 = pair.b.ep.connect(1, CONN_DATA + b"x", pair.now)  # the other role, same two nodes
    pair.run(1.0, stop=lambda: bool(pair.b.of(Connected)))
    ha3 = pair.a.ep.connect(3, CONN_DATA, pair.now)  # peer 3 never answers
    pair.a.events.clear()
    pair.a.ep.datagrams_to_send(pair.now)
    pair.a.ep.peer_gone(2)
    assert pair.a.ep.datagrams_to_send(pair.now) == []
    pair.a.app(pair.now)
    closed = {e.handle: e.reason for e in pair.a.of(ConnectionClosed)}
    assert len(closed) == 2 and set(closed.values()) == {CloseReason.PEER_GONE}
    assert ha1 in closed
    assert pair.a.ep.handles() == [ha3]
    assert hb2 > 0 and hb1 > 0


# --- robustness --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    from_peer=st.integers(0, 3),
    ptype=st.sampled_from([KCP_SRC, KCP_DST, 1, 0]),
    payload=st.binary(max_size=80),
)
def test_arbitrary_bytes_never_raise(from_peer: int, ptype: int, payload: bytes) -> None:
    ep = KcpEndpoint(2, now=0.0)
    ep.receive(from_peer, ptype, payload, 0.0)
    ep.datagrams_to_send(0.0)
    ep.handle_timer(1.0)


@settings(max_examples=300, deadline=None)
@given(conv=st.integers(0, 0xFFFFFFFF), flag=st.integers(0, 0xFF), body=st.binary(max_size=200))
def test_arbitrary_packets_for_us_never_raise(conv: int, flag: int, body: bytes) -> None:
    ep = KcpEndpoint(2, now=0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(conv, 1, 2, flag) + body, 0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(conv, 1, 2, SYN) + body, 0.0)  # any body is a connect
    ep.receive(1, KCP_DST, pack_kcp_header(conv, 2, 1, flag) + body, 0.0)
    while (event := ep.next_event()) is not None:
        if isinstance(event, IncomingConnection):
            assert event.conn_data == body
            ep.accept(event.handle, 0.0)
    ep.receive(1, KCP_SRC, pack_kcp_header(conv, 1, 2, flag) + body, 0.1)
    ep.datagrams_to_send(0.1)
    ep.handle_timer(30.0)


@settings(max_examples=200, deadline=None)
@given(packets=st.lists(st.tuples(st.integers(0, 0x7F), st.binary(max_size=120)), max_size=12))
def test_arbitrary_flags_and_bodies_on_live_conversations_never_raise(
    packets: list[tuple[int, bytes]],
) -> None:
    pair = Pair(delay=0.001)
    pair.connect()
    conv = hdr(pair.a.wire[0][2])[0]
    now = pair.now
    for i, (flag, body) in enumerate(packets):
        if i % 2:
            pair.b.ep.receive(1, KCP_SRC, pack_kcp_header(conv, 1, 2, flag) + body, now)
        else:
            pair.a.ep.receive(2, KCP_DST, pack_kcp_header(conv, 1, 2, flag) + body, now)
        pair.a.ep.datagrams_to_send(now)
        pair.b.ep.datagrams_to_send(now)
    pair.run(2.0)


def test_closed_conversations_free_their_kcp_state() -> None:
    pair = Pair(KcpConfig(time_wait_s=1.0))
    probes: list[Callable[[], object]] = []
    for i in range(3):
        ha = pair.a.ep.connect(2, CONN_DATA + bytes([i]), pair.now)
        pair.run(1.0, stop=partial(connected_count_is, pair.a, i + 1))
        session = pair.a.ep._streams[ha].session
        assert session is not None
        probes.append(session.kcp_alive)
        pair.a.ep.send(ha, b"x" * 5000)
        pair.a.ep.shutdown_write(ha)
    pair.b.on_event = lambda now, ev: (
        pair.b.ep.shutdown_write(ev.handle) if isinstance(ev, PeerFinished) else None
    )
    for incoming in pair.b.of(IncomingConnection):
        pair.b.ep.shutdown_write(incoming.handle)
    pair.run(5.0)
    del session
    gc.collect()
    assert len(pair.a.of(ConnectionClosed)) == 3
    assert all(probe() is None for probe in probes)
    for ep in (pair.a.ep, pair.b.ep):
        assert ep._streams == {} and ep._by_key == {} and ep._hedge_index == {}
        assert ep.get_timer() is None


def test_one_big_send_goes_past_ikcps_fragment_limit() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    room = pair.a.ep.writable(ha)
    assert room >= 128 * KcpConfig().mss
    blob = random.Random(3).randbytes(room + 1000)
    taken = pair.a.ep.send(ha, blob)
    assert taken == room
    pair.run(5.0, stop=lambda: len(pair.b.data.get(hb, b"")) == taken)
    assert bytes(pair.b.data[hb]) == blob[:taken]


def test_paused_reader_stops_the_sender_and_recovers_from_a_lost_window_update() -> None:
    pair = Pair(KcpConfig(rcv_wnd=128, snd_wnd=128), delay=0.02)
    ha, hb = pair.connect()
    pair.b.ep.pause_reading(hb)
    blob = random.Random(4).randbytes(600_000)
    sent = 0

    def writer(now: float) -> None:
        nonlocal sent
        if sent < len(blob):
            sent += pair.a.ep.send(ha, blob[sent : sent + 65536])

    pair.a.after_events = writer
    pair.run(2.0)
    assert pair.a.ep.stats(ha)["remote_window"] == 0
    assert pair.a.ep.writable(ha) == 0 and sent < len(blob)
    assert hb not in pair.b.data

    # Resume, and lose everything B sends for the next 100 ms: the window update among it.
    resumed = pair.now
    pair.b.drop = lambda now, ptype, payload: now < resumed + 0.1
    pair.b.ep.resume_reading(hb)
    pair.run(10.0, stop=lambda: len(pair.b.data.get(hb, b"")) == len(blob))
    assert bytes(pair.b.data[hb]) == blob
    assert pair.now - resumed < 1.5  # ikcp alone would wait 7 s for its first window probe


def first_segment_is(payload: bytes, cmd: int) -> bool:
    return len(payload) > KCP_HEADER_LEN + 4 and payload[KCP_HEADER_LEN + 4] == cmd


def test_retransmits_count_fast_resends() -> None:
    # 10 Mbit/s: one data packet per millisecond, so B acknowledges them in separate packets.
    pair = Pair(delay=0.02, rate_bps=10e6)
    ha, hb = pair.connect()
    dropped: list[bytes] = []

    def drop_segment_0(now: float, ptype: int, payload: bytes) -> bool:
        if not dropped and first_segment_is(payload, 81):
            dropped.append(payload)
            return True
        return False

    pair.a.drop = drop_segment_0
    blob = random.Random(5).randbytes(20 * KcpConfig().mss)
    assert pair.a.ep.send(ha, blob) == len(blob)
    pair.run(5.0, stop=lambda: len(pair.b.data.get(hb, b"")) == len(blob))
    assert bytes(pair.b.data[hb]) == blob and len(dropped) == 1
    pair.run(0.2)
    a, b = pair.a.ep.stats(ha), pair.b.ep.stats(hb)
    # ikcp's own count (xmit) sees timeout resends only; segment 0 went again as a fast resend.
    assert (a["retransmits"], a["timeout_retransmits"]) == (1, 0)
    assert (b["segments_in"], b["duplicates_in"]) == (20, 0)


def test_lost_ack_of_an_out_of_order_segment_is_repeated_not_answered_by_a_resend() -> None:
    # 10 Mbit/s: one data packet per millisecond, so B acknowledges them in separate packets.
    pair = Pair(delay=0.02, rate_bps=10e6)
    ha, hb = pair.connect()
    dropped: dict[str, bytes] = {}

    def drop_first(name: str, cmd: int) -> Callable[[float, int, bytes], bool]:
        def drop(now: float, ptype: int, payload: bytes) -> bool:
            if name not in dropped and first_segment_is(payload, cmd):
                dropped[name] = payload
                return True
            return False

        return drop

    pair.a.drop = drop_first("data", 81)  # segment 0: everything after it arrives out of order
    pair.b.drop = drop_first("ack", 82)  # the ACK of segment 1, which una cannot stand in for
    blob = random.Random(5).randbytes(20 * KcpConfig().mss)
    assert pair.a.ep.send(ha, blob) == len(blob)
    pair.run(5.0, stop=lambda: len(pair.b.data.get(hb, b"")) == len(blob))
    assert bytes(pair.b.data[hb]) == blob and set(dropped) == {"data", "ack"}
    pair.run(0.2)  # time for a needless resend to arrive
    a, b = pair.a.ep.stats(ha), pair.b.ep.stats(hb)
    # Only segment 0 went again, as a fast resend; B never saw a segment twice.
    assert (a["retransmits"], a["timeout_retransmits"]) == (1, 0)
    assert (b["segments_in"], b["duplicates_in"]) == (20, 0)


@pytest.mark.parametrize("role", ["initiator", "acceptor"])
def test_ping_in_half_closed_states_gets_pong(role: str) -> None:
    pair = Pair()
    ha, hb = pair.connect()
    closer, other, h_other = (pair.a, pair.b, hb) if role == "initiator" else (pair.b, pair.a, ha)
    closer.ep.shutdown_write(ha if role == "initiator" else hb)
    pair.run(1.0, stop=lambda: bool(other.of(PeerFinished)))
    conv, src, dst, _ = hdr(pair.a.wire[0][2])
    ptype = KCP_SRC if closer is pair.b else KCP_DST
    from_peer = 1 if closer is pair.b else 2
    closer.ep.receive(from_peer, ptype, pack_kcp_header(conv, src, dst, PING), pair.now)
    ((_, _, payload),) = closer.ep.datagrams_to_send(pair.now)
    assert hdr(payload)[3] == PING | PONG
    assert other.ep.stats(h_other)["state"] == "peer-closed"


def test_conversations_between_the_same_nodes_in_both_roles() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    hb2 = pair.b.ep.connect(1, CONN_DATA, pair.now)
    pair.run(1.0, stop=lambda: bool(pair.b.of(Connected)))
    (incoming,) = pair.a.of(IncomingConnection)
    pair.a.ep.send(ha, b"to B on the first")
    pair.b.ep.send(hb2, b"to A on the second")
    pair.run(1.0, stop=lambda: hb in pair.b.data and incoming.handle in pair.a.data)
    assert bytes(pair.b.data[hb]) == b"to B on the first"
    assert bytes(pair.a.data[incoming.handle]) == b"to A on the second"
    assert KcpFlag.DATA in KcpFlag(hdr(pair.b.wire[-1][2])[3])


def test_data_that_is_never_acknowledged_ends_the_conversation() -> None:
    pair = Pair(KcpConfig(dead_link=8))
    ha, hb = pair.connect()
    # B still answers pings (so the idle timeout never fires) but loses every data packet.
    pair.a.drop = lambda now, ptype, payload: len(payload) > KCP_HEADER_LEN
    pair.a.ep.send(ha, b"lost forever")
    pair.run(30.0, stop=lambda: bool(pair.a.of(ConnectionClosed)))
    assert [e.reason for e in pair.a.of(ConnectionClosed)] == [CloseReason.DEAD_LINK]
    pair.run(1.0)
    assert [e.reason for e in pair.b.of(ConnectionClosed)] == [CloseReason.RESET]
    assert pair.b.ep.handles() == [] and hb not in pair.b.data


def test_timer_work_follows_the_conversations_due_not_all_of_them() -> None:
    # 2,000 idle conversations and one moving data: in a second of virtual time the endpoint's timer
    # visits only the conversations whose timers are due (the busy one's flushes), not every
    # conversation at every tick. Counted by wrapping the endpoint's per-conversation timer step.
    idle = 2000
    pair = Pair(KcpConfig(keepalive_s=10.0))
    for i in range(idle):
        pair.a.ep.connect(2, CONN_DATA + i.to_bytes(2, "big"), pair.now)
    pair.run(3.0, stop=partial(connected_count_is, pair.a, idle))
    assert len(pair.a.of(Connected)) == idle
    pair.run(1.0)  # the handshakes' last packets settle
    busy = pair.a.ep.connect(2, CONN_DATA + b"busy", pair.now)
    pair.run(1.0, stop=partial(connected_count_is, pair.a, idle + 1))
    visits: list[int] = []
    for side in (pair.a, pair.b):
        step = side.ep._on_timer

        def counted(stream: object, now: float, ms: int, step: Callable[..., None] = step) -> None:
            visits.append(1)
            step(stream, now, ms)

        side.ep._on_timer = counted  # type: ignore[method-assign]
    pair.a.ep.send(busy, b"x" * 2_000_000)
    pair.run(1.0)
    got = sum(len(d) for d in pair.b.data.values())
    assert got > 100_000  # the busy conversation moved data all along
    assert 0 < len(visits) < idle // 4
