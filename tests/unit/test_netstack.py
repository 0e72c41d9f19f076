"""The user-space TCP stack against scripted peers: every segment in is built with the wire codecs,
every segment out is parsed (checksums verified) with them, and time is a fake clock."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from pytier.netstack import (
    CloseReason,
    Connected,
    ConnectionClosed,
    DataReceived,
    Endpoint,
    FourTuple,
    NetStack,
    NetStackConfig,
    NetStackError,
    NetStackEvent,
    PeerFinished,
    SynReceived,
    Writable,
)
from pytier.wire.ipv4 import Ipv4Repr
from pytier.wire.tcp import TcpFlags as F
from pytier.wire.tcp import TcpRepr

MASK = 0xFFFFFFFF
CLIENT = Endpoint(IPv4Address("10.144.144.2"), 40000)
SERVER = Endpoint(IPv4Address("192.168.50.7"), 80)
CFG = NetStackConfig(recv_buffer=64 * 1024, send_buffer=64 * 1024)
MSS = CFG.mss  # 1460


@dataclass
class Seg:
    src: Endpoint
    dst: Endpoint
    tcp: TcpRepr

    @property
    def flags(self) -> F:
        return self.tcp.flags

    @property
    def seq(self) -> int:
        return self.tcp.seq

    @property
    def ack(self) -> int:
        return self.tcp.ack

    @property
    def payload(self) -> bytes:
        return self.tcp.payload


def parse(packet: bytes) -> Seg:
    ip = Ipv4Repr.parse(packet)
    assert ip.protocol == 6 and ip.dont_fragment and ip.total_len == len(packet)
    tcp = TcpRepr.parse(ip.src_addr, ip.dst_addr, packet[ip.header_len :])
    return Seg(Endpoint(ip.src_addr, tcp.src_port), Endpoint(ip.dst_addr, tcp.dst_port), tcp)


def build(src: Endpoint, dst: Endpoint, **fields: object) -> bytes:
    tcp = TcpRepr(src_port=src.port, dst_port=dst.port, **fields).emit(src.addr, dst.addr)  # type: ignore[arg-type]
    return Ipv4Repr(src.addr, dst.addr, 6, len(tcp)).emit(tcp)


class Harness:
    def __init__(self, config: NetStackConfig = CFG, accept: object = None) -> None:
        self.now = 0.0
        self.accepted: list[FourTuple] = []
        self.log: list[tuple[float, Seg]] = []  # what timers sent, and when

        def predicate(tup: FourTuple) -> bool:
            self.accepted.append(tup)
            return accept(tup) if callable(accept) else True

        self.stack = NetStack(accept=predicate, now=0.0, config=config, isn_secret=bytes(16))

    def feed(self, packet: bytes) -> None:
        self.stack.receive_packet(packet, self.now)

    def out(self) -> list[Seg]:
        return [parse(p) for p in self.stack.packets_to_send(self.now)]

    def events(self) -> list[NetStackEvent]:
        events = []
        while (event := self.stack.next_event()) is not None:
            events.append(event)
        return events

    def tick(self, seconds: float) -> list[Seg]:
        """Advance the clock, firing each timer at its own time; return what went out."""
        end = self.now + seconds
        sent: list[Seg] = []
        for _ in range(10_000):
            timer = self.stack.get_timer()
            if timer is None or timer > end:
                break
            self.now = max(self.now, timer)
            self.stack.handle_timer(self.now)
            fired = self.out()
            self.log += [(self.now, seg) for seg in fired]
            sent += fired
        self.now = end
        return sent


class Peer:
    """A scripted TCP peer: keeps its own sequence numbers and builds segments with the codecs."""

    def __init__(
        self,
        h: Harness,
        me: Endpoint = CLIENT,
        them: Endpoint = SERVER,
        *,
        iss: int = 1000,
        window: int = 65535,
        mss: int | None = 1460,
        wscale: int | None = 0,
        sack: bool = False,
    ) -> None:
        self.h = h
        self.me = me
        self.them = them
        self.seq = iss
        self.rcv = 0  # what we acknowledge
        self.window = window
        self.mss = mss
        self.wscale = wscale
        self.sack = sack

    def packet(
        self,
        flags: F,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int | None = None,
        options: bool = False,
        sack: tuple[tuple[int, int], ...] = (),
    ) -> bytes:
        return build(
            self.me,
            self.them,
            seq=(self.seq if seq is None else seq) & MASK,
            ack=(self.rcv if ack is None else ack) & MASK if flags & F.ACK else 0,
            flags=flags,
            window=self.window if window is None else window,
            mss=self.mss if options else None,
            window_scale=self.wscale if options else None,
            sack_permitted=self.sack and options,
            sack_ranges=tuple((left & MASK, right & MASK) for left, right in sack),
            payload=payload,
        )

    def send(self, flags: F = F.ACK, payload: bytes = b"", **kw: object) -> None:
        self.h.feed(self.packet(flags, payload, **kw))  # type: ignore[arg-type]
        if "seq" not in kw:
            self.seq += len(payload) + bool(flags & F.SYN) + bool(flags & F.FIN)

    def syn(self) -> None:
        self.send(F.SYN, options=True)

    def take(self, segs: list[Seg]) -> bytes:
        """Accept in-order data and FINs from segments the stack sent; return the data."""
        data = b""
        for s in segs:
            if s.seq == self.rcv & MASK and (s.payload or s.flags & F.FIN):
                data += s.payload
                self.rcv += len(s.payload) + bool(s.flags & F.FIN)
        return data


def connect_passive(h: Harness, peer: Peer) -> int:
    peer.syn()
    [event] = h.events()
    assert isinstance(event, SynReceived)
    h.stack.accept(event.handle)
    [synack] = h.out()
    assert synack.flags == F.SYN | F.ACK
    peer.rcv = synack.seq + 1
    peer.send(F.ACK)
    assert h.events() == [Connected(event.handle)]
    assert h.out() == []
    return event.handle


def open_pair(config: NetStackConfig = CFG, **peer_kw: object) -> tuple[Harness, Peer, int]:
    h = Harness(config)
    peer = Peer(h, **peer_kw)  # type: ignore[arg-type]
    return h, peer, connect_passive(h, peer)


def data_events(events: list[NetStackEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


# ----------------------------------------------------------------------------------------------
# opening


def test_syn_is_held_until_the_owner_accepts_then_handshake_completes() -> None:
    h = Harness()
    peer = Peer(h, wscale=7)
    peer.syn()
    assert h.out() == []  # nothing goes back until the owner decides
    [event] = h.events()
    assert event == SynReceived(event.handle, CLIENT, SERVER)
    assert h.accepted == [FourTuple(CLIENT, SERVER)]
    h.tick(5.0)
    assert h.out() == []

    h.stack.accept(event.handle)
    [synack] = h.out()
    assert (synack.src, synack.dst) == (SERVER, CLIENT)  # answered from the address the SYN asked for
    assert synack.flags == F.SYN | F.ACK and synack.ack == 1001
    assert synack.tcp.mss == MSS and synack.tcp.window_scale == CFG.window_shift
    assert synack.tcp.window == 65535  # never scaled in a SYN
    assert not synack.tcp.sack_permitted and synack.tcp.timestamps is None
    peer.rcv = synack.seq + 1
    peer.send(F.ACK)
    assert h.events() == [Connected(event.handle)]
    info = h.stack.info(event.handle)
    assert info.state == "established" and info.src == CLIENT and info.dst == SERVER
    assert info.local == SERVER and info.remote == CLIENT


def test_refuse_answers_the_held_syn_with_rst() -> None:
    h = Harness()
    Peer(h).syn()
    [event] = h.events()
    assert isinstance(event, SynReceived)
    h.stack.refuse(event.handle)
    [rst] = h.out()
    assert rst.flags == F.RST | F.ACK and rst.seq == 0 and rst.ack == 1001
    assert h.events() == [ConnectionClosed(event.handle, CloseReason.REFUSED)]
    assert h.stack.connection_count == 0
    with pytest.raises(NetStackError, match="unknown connection handle"):
        h.stack.send(event.handle, b"x")


def test_tuples_the_predicate_declines_are_not_answered() -> None:
    h = Harness(accept=lambda tup: tup.dst.port != 81)
    Peer(h, them=Endpoint(SERVER.addr, 81)).syn()
    Peer(h, them=Endpoint(SERVER.addr, 81)).send(F.ACK, b"data")
    assert h.out() == [] and h.events() == []
    assert h.stack.drops["not ours"] == 2


def test_held_syn_times_out_with_rst() -> None:
    h = Harness()
    Peer(h).syn()
    [event] = h.events()
    assert h.tick(CFG.accept_timeout - 0.1) == []
    [rst] = h.tick(0.2)
    assert rst.flags & F.RST
    assert h.events() == [ConnectionClosed(event.handle, CloseReason.ACCEPT_TIMEOUT)]


def test_lost_synack_is_resent_on_a_repeated_syn_and_by_timer_with_backoff() -> None:
    h = Harness()
    peer = Peer(h)
    peer.syn()
    [event] = h.events()
    h.stack.accept(event.handle)
    [first] = h.out()
    peer.send(F.SYN, options=True, seq=1000)  # the peer did not get it and tries again
    [again] = h.out()
    assert again.flags == F.SYN | F.ACK and again.seq == first.seq
    # Then silence from the peer: resent 1, 2, 4, 8, 16 s apart, then the stack gives up.
    h.tick(200.0)
    assert all(seg.flags == F.SYN | F.ACK for _, seg in h.log)
    times = [t for t, _ in h.log]
    assert [round(b - a, 3) for a, b in zip([0.0, *times], times, strict=False)] == [1, 2, 4, 8, 16]
    assert h.events() == [ConnectionClosed(event.handle, CloseReason.TIMEOUT)]
    assert h.stack.connection_count == 0


def test_mss_from_the_peer_limits_our_segments_and_defaults_to_536() -> None:
    for peer_mss, expect in ((536, 536), (None, 536), (9000, MSS), (1, 48)):
        h, _peer, handle = open_pair(mss=peer_mss)
        assert h.stack.info(handle).mss == expect
        h.stack.send(handle, bytes(5000))
        segs = h.out()
        assert segs and all(len(s.payload) <= expect for s in segs)
        assert len(segs[0].payload) == expect


def test_window_scaling_both_ways() -> None:
    # The peer offers shift 7: its window field counts 128-byte units.
    h, _peer, handle = open_pair(wscale=7, window=16, mss=512)  # 16 * 128 = 2048 bytes
    h.stack.send(handle, bytes(10_000))
    assert sum(len(s.payload) for s in h.out()) == 2048
    # Ours: a 1 MiB buffer needs shift 5, and is advertised whole in 32-byte units.
    big = Harness(NetStackConfig(recv_buffer=1 << 20))
    assert big.stack.config.window_shift == 5
    bpeer = Peer(big, wscale=7)
    connect_passive(big, bpeer)
    bpeer.send(F.ACK, b"x" * 1000)
    big.events()
    [ack] = big.out()
    assert ack.tcp.window == (1 << 20) >> 5


def test_without_window_scale_from_the_peer_none_is_used() -> None:
    h = Harness(NetStackConfig(recv_buffer=1 << 20))
    peer = Peer(h, wscale=None, window=65535)
    peer.syn()
    [event] = h.events()
    h.stack.accept(event.handle)
    [synack] = h.out()
    assert synack.tcp.window_scale is None
    peer.rcv = synack.seq + 1
    peer.send(F.ACK, b"x" * 100)
    h.events()
    [ack] = h.out()
    # The right edge stays until it can move by an MSS (receiver silly-window avoidance) ...
    assert ack.tcp.window == 65535 - 100
    peer.send(F.ACK, b"x" * 2000)
    h.events()
    [ack] = h.out()
    assert ack.tcp.window == 65535  # ... and a 1 MiB buffer cannot be advertised unscaled


# ----------------------------------------------------------------------------------------------
# data


def test_in_order_data_is_delivered_and_acknowledged() -> None:
    h, peer, handle = open_pair()
    peer.send(F.ACK | F.PSH, b"hello ")
    peer.send(F.ACK | F.PSH, b"world")
    assert h.events() == [DataReceived(handle, b"hello world")]
    [ack] = h.out()
    assert ack.flags == F.ACK and ack.ack == peer.seq and ack.payload == b""
    assert h.stack.info(handle).bytes_received == 11


def test_an_ack_goes_out_after_ack_every_segments_without_waiting_for_a_flush() -> None:
    h, peer, _handle = open_pair()
    for _ in range(CFG.ack_every):
        peer.send(F.ACK, b"x" * 100)
    assert [s.ack for s in parse_all(h.stack.out)] == [peer.seq]


def parse_all(packets: list[bytes]) -> list[Seg]:
    return [parse(p) for p in packets]


def test_out_of_order_segments_are_reassembled_with_a_duplicate_ack_each() -> None:
    h, peer, _handle = open_pair()
    base = peer.seq
    a, b, c, d = b"a" * 100, b"b" * 100, b"c" * 100, b"d" * 100
    peer.send(F.ACK, c, seq=base + 200)
    peer.send(F.ACK, b, seq=base + 100)
    peer.send(F.ACK, d, seq=base + 300)
    peer.send(F.ACK, c[:50], seq=base + 200)  # a duplicate of part of what is held
    dup_acks = h.out()
    assert [s.ack for s in dup_acks] == [base] * 4
    assert h.events() == []
    peer.send(F.ACK, a, seq=base)
    assert data_events(h.events()) == a + b + c + d
    [ack] = h.out()
    assert ack.ack == base + 400
    # Old data again: acknowledged, not delivered twice.
    peer.send(F.ACK, a + b, seq=base)
    assert h.events() == []
    assert [s.ack for s in h.out()] == [base + 400]


def test_a_segment_overlapping_delivered_data_delivers_only_the_new_part() -> None:
    h, peer, _handle = open_pair()
    base = peer.seq
    peer.send(F.ACK, b"0123456789", seq=base)
    peer.send(F.ACK, b"56789abcdef", seq=base + 5)
    assert data_events(h.events()) == b"0123456789abcdef"


def test_fin_ahead_of_a_hole_waits_for_the_hole() -> None:
    h, peer, handle = open_pair()
    base = peer.seq
    peer.send(F.ACK | F.FIN, b"tail", seq=base + 4)
    assert h.events() == []
    assert [s.ack for s in h.out()] == [base]
    peer.send(F.ACK, b"head", seq=base)
    assert h.events() == [DataReceived(handle, b"headtail"), PeerFinished(handle)]
    [ack] = h.out()
    assert ack.ack == base + 9  # the FIN counted


def test_sequence_numbers_wrap_around() -> None:
    h, peer, _handle = open_pair(iss=MASK - 150)
    chunks = [bytes([i]) * 100 for i in range(4)]
    for chunk in chunks:
        peer.send(F.ACK, chunk)
    assert data_events(h.events()) == b"".join(chunks)
    [ack] = h.out()
    assert ack.ack == (MASK - 150 + 1 + 400) & MASK


def test_our_sequence_numbers_wrap_around(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    monkeypatch.setattr(h.stack, "_isn", lambda key, now: MASK - 1000)
    peer = Peer(h)
    handle = connect_passive(h, peer)
    data = bytes(range(256)) * 20
    h.stack.send(handle, data)
    got = peer.take(h.out())
    assert got == data
    peer.send(F.ACK)
    assert h.stack.info(handle).send_buffered == 0
    assert h.stack.info(handle).bytes_sent == len(data)


# ----------------------------------------------------------------------------------------------
# sending, retransmission


def test_send_respects_the_buffer_and_reports_writable_after_acks() -> None:
    config = NetStackConfig(send_buffer=10_000)
    h, peer, handle = open_pair(config)
    assert h.stack.send(handle, bytes(25_000)) == 10_000
    assert h.stack.send_capacity(handle) == 0
    assert h.stack.send(handle, b"more") == 0
    got = peer.take(h.out())
    assert len(got) == 10_000
    assert h.events() == []
    peer.send(F.ACK)
    assert h.events() == [Writable(handle)]
    assert h.stack.send_capacity(handle) == 10_000


def test_rto_retransmits_with_backoff_and_karn_ignores_ambiguous_samples() -> None:
    h2 = Harness(CFG)
    peer2 = Peer(h2)
    handle2 = connect_passive(h2, peer2)
    assert h2.stack.info(handle2).srtt == 0.0  # the SYN|ACK was timed: it was never retransmitted
    h2.stack.send(handle2, b"x" * 100)
    [first] = h2.out()
    rto0 = h2.stack.info(handle2).rto
    assert rto0 == pytest.approx(CFG.min_rto)  # the handshake sample was ~0 s
    [again] = h2.tick(rto0 + 0.001)
    assert again.seq == first.seq and again.payload == first.payload
    assert h2.stack.info(handle2).rto == pytest.approx(2 * rto0)  # backed off
    assert h2.tick(2 * rto0 - 0.01) == []
    [third] = h2.tick(0.02)
    assert third.seq == first.seq
    assert h2.stack.info(handle2).rto == pytest.approx(4 * rto0)
    srtt = h2.stack.info(handle2).srtt
    h2.tick(0.05)
    peer2.rcv = first.seq + 100
    peer2.send(F.ACK)
    info = h2.stack.info(handle2)
    assert info.srtt == srtt  # Karn: an ACK of a retransmitted segment is no sample
    assert info.rto == pytest.approx(4 * rto0)  # and the backoff stays until a real sample
    assert info.retransmits == 2
    # A fresh segment acknowledged after 50 ms is a sample.
    h2.stack.send(handle2, b"y" * 100)
    h2.out()
    h2.tick(0.05)
    peer2.rcv += 100
    peer2.send(F.ACK)
    info = h2.stack.info(handle2)
    assert info.srtt == pytest.approx(0.05 / 8)  # RFC 6298: SRTT += (R - SRTT) / 8
    assert info.rto == pytest.approx(CFG.min_rto)  # a fresh sample ended the backoff


def test_retransmission_gives_up_with_rst_after_max_retransmits() -> None:
    config = NetStackConfig(max_retransmits=3, max_rto=1.0)
    h, _peer, handle = open_pair(config)
    h.stack.send(handle, b"x" * 10)
    h.out()
    sent = h.tick(30.0)
    assert [len(s.payload) for s in sent[:3]] == [10, 10, 10]
    assert sent[-1].flags & F.RST
    assert h.events() == [ConnectionClosed(handle, CloseReason.TIMEOUT)]


def test_three_duplicate_acks_trigger_fast_retransmit_and_newreno_recovery() -> None:
    h, peer, handle = open_pair()
    h.stack.send(handle, bytes(10 * MSS))
    segs = h.out()
    assert len(segs) == 10
    base = segs[0].seq
    peer.rcv = base + MSS  # the second segment is lost; the others arrive
    peer.send(F.ACK)
    h.out()
    for _ in range(2):
        peer.send(F.ACK)
    assert h.out() == []
    peer.send(F.ACK)  # the third duplicate
    [retx] = h.out()
    assert retx.seq == base + MSS and len(retx.payload) == MSS
    # A partial ACK (the fourth is lost too) retransmits the next hole at once.
    peer.rcv = base + 3 * MSS
    peer.send(F.ACK)
    retx2 = h.out()
    assert retx2[0].seq == base + 3 * MSS
    peer.rcv = base + 10 * MSS
    peer.send(F.ACK)
    info = h.stack.info(handle)
    assert info.send_buffered == 0 and info.retransmits == 2


def test_zero_window_stops_sending_and_probes_until_it_opens() -> None:
    h, peer, handle = open_pair(window=1000)
    h.stack.send(handle, bytes(5000))
    [seg] = h.out()
    assert len(seg.payload) == 1000
    peer.rcv = seg.seq + 1000
    peer.send(F.ACK, window=0)
    assert h.out() == []
    probes = h.tick(1.0)
    assert probes and all(p.seq == (peer.rcv - 1) & MASK and p.payload == b"" for p in probes)
    n = len(probes)
    more = h.tick(10.0)
    assert 0 < len(more) < 10 * n  # backing off
    peer.send(F.ACK, window=4000)
    segs = h.out()
    assert sum(len(s.payload) for s in segs) == 4000


def test_pause_reading_closes_the_window_and_resume_opens_it() -> None:
    h, peer, handle = open_pair()
    h.stack.pause_reading(handle)
    sent = 0
    while sent < CFG.recv_buffer:
        peer.send(F.ACK, bytes(1000))
        sent += 1000
    acks = h.out()
    assert h.events() == []
    assert acks[-1].tcp.window == 0 and acks[-1].ack == (peer.seq - (sent - CFG.recv_buffer)) & MASK
    accepted_up_to = acks[-1].ack
    peer.send(F.ACK, bytes(1000), seq=accepted_up_to)  # beyond the window: not taken
    [ack] = h.out()
    assert ack.ack == accepted_up_to and ack.tcp.window == 0
    h.stack.resume_reading(handle)
    events = h.events()
    assert len(data_events(events)) == CFG.recv_buffer
    [update] = h.out()
    assert update.ack == accepted_up_to  # a window update: the whole buffer is free again
    assert update.tcp.window << CFG.window_shift == CFG.recv_buffer


def test_a_zero_window_probe_is_answered_with_the_current_window() -> None:
    h, peer, _handle = open_pair()
    peer.send(F.ACK, seq=peer.seq - 1)  # Linux-style probe: one byte behind
    [ack] = h.out()
    assert ack.ack == peer.seq and ack.tcp.window > 0


# ----------------------------------------------------------------------------------------------
# closing


def test_active_close_through_fin_wait_and_time_wait() -> None:
    h, peer, handle = open_pair()
    h.stack.send(handle, b"bye")
    h.stack.shutdown_write(handle)
    [seg] = h.out()
    assert seg.flags & F.FIN and seg.payload == b"bye"  # the FIN rides on the last data
    with pytest.raises(NetStackError, match="shut for writing"):
        h.stack.send(handle, b"x")
    peer.take([seg])
    peer.send(F.ACK)
    assert h.stack.info(handle).state == "fin-wait-2"
    peer.send(F.ACK, b"still talking")  # half-closed: the peer may go on
    peer.send(F.ACK | F.FIN)
    assert h.events() == [
        DataReceived(handle, b"still talking"),
        PeerFinished(handle),
        ConnectionClosed(handle, CloseReason.FINISHED),
    ]
    [ack] = h.out()
    assert ack.ack == peer.seq
    assert h.stack.time_wait_count == 1
    peer.send(F.ACK | F.FIN, seq=peer.seq - 1)  # our ACK was lost: the peer resends its FIN
    [again] = h.out()
    assert again.ack == peer.seq
    h.tick(CFG.time_wait + 0.1)
    assert h.stack.connection_count == 0 and h.stack.time_wait_count == 0


def test_passive_close_through_close_wait_and_last_ack() -> None:
    h, peer, handle = open_pair()
    peer.send(F.ACK | F.FIN, b"request")
    assert h.events() == [DataReceived(handle, b"request"), PeerFinished(handle)]
    assert h.stack.info(handle).state == "close-wait"
    h.stack.send(handle, b"response")
    segs = h.out()
    assert peer.take(segs) == b"response"
    h.stack.shutdown_write(handle)
    [fin] = h.out()
    assert fin.flags & F.FIN and h.stack.info(handle).state == "last-ack"
    peer.take([fin])
    peer.send(F.ACK)
    assert h.events() == [ConnectionClosed(handle, CloseReason.FINISHED)]
    assert h.stack.connection_count == 0 and h.stack.time_wait_count == 0


def test_simultaneous_close_goes_through_closing() -> None:
    h, peer, handle = open_pair()
    h.stack.shutdown_write(handle)
    [fin] = h.out()
    peer.send(F.ACK | F.FIN)  # crosses ours: does not acknowledge it
    assert h.stack.info(handle).state == "closing"
    assert h.events() == [PeerFinished(handle)]
    [ack] = h.out()
    assert ack.ack == peer.seq
    peer.rcv = fin.seq + 1
    peer.send(F.ACK)
    assert h.events() == [ConnectionClosed(handle, CloseReason.FINISHED)]
    assert h.stack.time_wait_count == 1


def test_fin_that_also_acknowledges_ours_goes_straight_to_time_wait() -> None:
    h, peer, handle = open_pair()
    h.stack.shutdown_write(handle)
    [fin] = h.out()
    peer.rcv = fin.seq + 1
    peer.send(F.ACK | F.FIN)
    assert h.events() == [PeerFinished(handle), ConnectionClosed(handle, CloseReason.FINISHED)]
    assert h.stack.time_wait_count == 1


def test_unacknowledged_fin_is_retransmitted() -> None:
    h, _peer, handle = open_pair()
    h.stack.shutdown_write(handle)
    [fin] = h.out()
    again = h.tick(1.0)
    assert again and all(seg.flags & F.FIN and seg.seq == fin.seq for seg in again)


def test_time_wait_table_is_bounded() -> None:
    config = NetStackConfig(max_time_wait=4)
    h = Harness(config)
    for i in range(10):
        peer = Peer(h, Endpoint(CLIENT.addr, 30000 + i))
        handle = connect_passive(h, peer)
        h.stack.shutdown_write(handle)
        [fin] = h.out()
        peer.rcv = fin.seq + 1
        peer.send(F.ACK | F.FIN)
        h.out()
        h.events()
        assert h.stack.time_wait_count <= 4
    assert h.stack.connection_count == 4
    assert h.stack.drops["time-wait evicted"] == 6


def test_a_new_syn_ends_time_wait_and_opens_a_new_connection() -> None:
    h, peer, handle = open_pair()
    h.stack.shutdown_write(handle)
    [fin] = h.out()
    peer.rcv = fin.seq + 1
    peer.send(F.ACK | F.FIN)
    h.out()
    h.events()
    again = Peer(h, iss=peer.seq + 100_000)
    again.syn()
    [event] = h.events()
    assert isinstance(event, SynReceived) and event.handle != handle


def test_orphan_in_fin_wait_2_gives_up_after_its_timeout() -> None:
    config = NetStackConfig(fin_wait2_timeout=5.0)
    h, peer, handle = open_pair(config)
    h.stack.close(handle)
    [fin] = h.out()
    peer.rcv = fin.seq + 1
    peer.send(F.ACK)
    assert h.events() == []
    h.tick(5.1)
    assert h.events() == [ConnectionClosed(handle, CloseReason.TIMEOUT)]
    assert h.stack.connection_count == 0


def test_data_after_close_resets_the_connection() -> None:
    h, peer, handle = open_pair()
    h.stack.close(handle)
    h.out()
    peer.send(F.ACK, b"late")
    [rst] = h.out()
    assert rst.flags & F.RST
    assert h.events() == [ConnectionClosed(handle, CloseReason.ABORTED)]


def test_close_with_unread_data_resets() -> None:
    h, peer, handle = open_pair()
    h.stack.pause_reading(handle)
    peer.send(F.ACK, b"unread")
    h.out()
    h.stack.close(handle)
    [rst] = h.out()
    assert rst.flags & F.RST
    assert h.events() == [ConnectionClosed(handle, CloseReason.ABORTED)]


def test_abort_sends_rst_and_drops_queued_data() -> None:
    h, peer, handle = open_pair(window=0)
    h.stack.send(handle, b"never sent")
    h.stack.abort(handle)
    [rst] = h.out()
    assert rst.flags == F.RST | F.ACK and rst.ack == peer.seq
    assert h.events() == [ConnectionClosed(handle, CloseReason.ABORTED)]


# ----------------------------------------------------------------------------------------------
# RST and SYN in every state


def to_state(state: str) -> tuple[Harness, Peer, int]:
    """A connection driven into `state` by scripted segments."""
    if state == "syn-received":
        h = Harness()
        peer = Peer(h)
        peer.syn()
        [event] = h.events()
        h.stack.accept(event.handle)
        [synack] = h.out()
        peer.rcv = synack.seq + 1
        return h, peer, event.handle
    h, peer, handle = open_pair()
    if state in ("fin-wait-1", "fin-wait-2", "closing", "time-wait"):
        h.stack.shutdown_write(handle)
        [fin] = h.out()
        if state in ("fin-wait-2", "time-wait"):
            peer.rcv = fin.seq + 1
            peer.send(F.ACK)
        if state in ("closing", "time-wait"):
            peer.send(F.ACK | F.FIN)
    elif state in ("close-wait", "last-ack"):
        peer.send(F.ACK | F.FIN)
        if state == "last-ack":
            h.stack.shutdown_write(handle)
    h.out()
    h.events()
    assert h.stack.info(handle).state == state if state != "time-wait" else h.stack.time_wait_count == 1
    return h, peer, handle


STATES = [
    "syn-received",
    "established",
    "fin-wait-1",
    "fin-wait-2",
    "close-wait",
    "closing",
    "last-ack",
    "time-wait",
]


@pytest.mark.parametrize("state", STATES)
def test_rst_at_rcv_nxt_ends_the_connection_in_every_state(state: str) -> None:
    h, peer, handle = to_state(state)
    peer.send(F.RST)
    assert h.out() == []  # never answer a RST
    events = h.events()
    if state == "time-wait":
        assert events == []  # the owner already heard FINISHED
    else:
        assert events == [ConnectionClosed(handle, CloseReason.RESET)]
    assert h.stack.connection_count == 0


@pytest.mark.parametrize("state", STATES)
def test_rst_inside_the_window_but_not_at_rcv_nxt_gets_a_challenge_ack(state: str) -> None:
    h, peer, _handle = to_state(state)
    peer.send(F.RST, seq=peer.seq + 10)
    [ack] = h.out()
    assert ack.flags == F.ACK and ack.ack == peer.seq & MASK
    assert h.events() == []
    assert h.stack.connection_count == 1


@pytest.mark.parametrize("state", STATES)
def test_rst_outside_the_window_is_ignored(state: str) -> None:
    h, peer, _handle = to_state(state)
    peer.send(F.RST, seq=peer.seq + 10_000_000)
    assert h.out() == [] and h.events() == []
    assert h.stack.connection_count == 1


@pytest.mark.parametrize("state", [s for s in STATES if s not in ("syn-received", "time-wait")])
def test_syn_in_a_synchronized_state_gets_a_challenge_ack(state: str) -> None:
    h, peer, _handle = to_state(state)
    peer.send(F.SYN, seq=peer.seq + 5, options=True)
    [ack] = h.out()
    assert ack.flags == F.ACK and ack.ack == peer.seq & MASK
    assert h.events() == [] and h.stack.connection_count == 1


def test_ack_of_something_never_sent_in_syn_received_gets_rst() -> None:
    h, peer, _handle = to_state("syn-received")
    bogus = peer.rcv + 5000
    peer.send(F.ACK, ack=bogus)
    [rst] = h.out()
    assert rst.flags == F.RST and rst.seq == bogus & MASK
    assert h.events() == []


def test_rst_held_syn_ignores_everything_but_the_owner() -> None:
    h = Harness()
    peer = Peer(h)
    peer.syn()
    [event] = h.events()
    peer.send(F.RST, seq=1001)
    peer.send(F.ACK, b"early")
    assert h.out() == [] and h.events() == []
    h.stack.accept(event.handle)
    assert h.out()[0].flags == F.SYN | F.ACK


# ----------------------------------------------------------------------------------------------
# segments for no connection, checksums


def test_segments_without_a_connection_get_the_rfc_9293_rst() -> None:
    h = Harness()
    peer = Peer(h)
    peer.send(F.ACK, b"stray", ack=777)
    [rst] = h.out()
    assert rst.flags == F.RST and rst.seq == 777 and (rst.src, rst.dst) == (SERVER, CLIENT)
    peer.send(F.FIN, b"abc", seq=5000)
    [rst] = h.out()
    assert rst.flags == F.RST | F.ACK and rst.seq == 0 and rst.ack == 5000 + 3 + 1
    peer.send(F.RST)
    assert h.out() == []


def test_bad_checksums_are_dropped_silently() -> None:
    h, peer, handle = open_pair()
    packet = bytearray(peer.packet(F.ACK, b"payload"))
    packet[-1] ^= 0xFF
    h.feed(bytes(packet))
    packet = bytearray(peer.packet(F.ACK, b"payload"))
    packet[8] ^= 0x01  # TTL: only the IPv4 header checksum can tell
    h.feed(bytes(packet))
    assert h.out() == [] and h.events() == []
    assert h.stack.drops["tcp checksum"] == 1 and h.stack.drops["ipv4 checksum"] == 1
    peer.send(F.ACK, b"payload")
    assert h.events() == [DataReceived(handle, b"payload")]


def test_non_tcp_fragments_and_garbage_are_counted_drops() -> None:
    h = Harness()
    udp = Ipv4Repr(CLIENT.addr, SERVER.addr, 17, 8).emit(bytes(8))
    frag = Ipv4Repr(CLIENT.addr, SERVER.addr, 6, 20, more_fragments=True).emit(bytes(20))
    for packet in (udp, frag, b"", b"\x45", bytes(40)):
        h.feed(packet)
    assert h.out() == [] and h.events() == []
    assert sum(h.stack.drops.values()) == 5


# ----------------------------------------------------------------------------------------------
# active open


def test_connect_sends_syn_with_options_and_completes() -> None:
    h = Harness()
    handle = h.stack.connect(SERVER, CLIENT)  # from any address we like
    [syn] = h.out()
    assert syn.flags == F.SYN and (syn.src, syn.dst) == (SERVER, CLIENT)
    assert syn.tcp.mss == MSS and syn.tcp.window_scale == CFG.window_shift
    peer = Peer(h, CLIENT, SERVER, iss=5000, wscale=2)
    peer.rcv = syn.seq + 1
    peer.send(F.SYN | F.ACK, options=True)
    assert h.events() == [Connected(handle)]
    [ack] = h.out()
    assert ack.flags == F.ACK and ack.ack == 5001
    assert h.accepted == []  # an active open never asks the predicate
    info = h.stack.info(handle)
    assert info.src == SERVER and info.dst == CLIENT
    peer.send(F.ACK | F.PSH, b"hi")
    h.stack.send(handle, b"there")
    assert h.events() == [DataReceived(handle, b"hi")]
    assert peer.take(h.out()) == b"there"
    with pytest.raises(NetStackError, match="in use"):
        h.stack.connect(SERVER, CLIENT)


def test_connect_refused_by_rst() -> None:
    h = Harness()
    handle = h.stack.connect(SERVER, CLIENT)
    [syn] = h.out()
    peer = Peer(h, CLIENT, SERVER)
    peer.send(F.RST | F.ACK, seq=0, ack=syn.seq + 2)  # wrong ACK: not for our SYN
    peer.send(F.RST, seq=0)  # no ACK: cannot be for our SYN
    assert h.events() == []
    peer.send(F.RST | F.ACK, seq=0, ack=syn.seq + 1)
    assert h.events() == [ConnectionClosed(handle, CloseReason.REFUSED)]
    assert h.out() == []


def test_connect_answered_with_a_bad_ack_gets_rst() -> None:
    h = Harness()
    h.stack.connect(SERVER, CLIENT)
    [syn] = h.out()
    peer = Peer(h, CLIENT, SERVER)
    peer.send(F.SYN | F.ACK, ack=syn.seq + 99, options=True)
    [rst] = h.out()
    assert rst.flags == F.RST and rst.seq == (syn.seq + 99) & MASK


def test_connect_times_out_after_syn_retries() -> None:
    config = NetStackConfig(syn_retries=2)
    h = Harness(config)
    handle = h.stack.connect(SERVER, CLIENT)
    h.out()
    sent = h.tick(20.0)
    assert [s.flags for s in sent] == [F.SYN, F.SYN]
    assert h.events() == [ConnectionClosed(handle, CloseReason.TIMEOUT)]


def test_simultaneous_open() -> None:
    h = Harness()
    handle = h.stack.connect(SERVER, CLIENT)
    [syn] = h.out()
    peer = Peer(h, CLIENT, SERVER, iss=9000)
    peer.send(F.SYN, options=True)  # their SYN crosses ours
    [synack] = h.out()
    assert synack.flags == F.SYN | F.ACK and synack.seq == syn.seq and synack.ack == 9001
    assert h.stack.info(handle).state == "syn-received"
    peer.rcv = syn.seq + 1
    peer.send(F.SYN | F.ACK, seq=9000, options=True)  # and their SYN|ACK of ours
    assert h.events() == [Connected(handle)]
    h.stack.send(handle, b"x")
    assert peer.take(h.out()) == b"x"


def test_close_before_the_handshake() -> None:
    h = Harness()
    handle = h.stack.connect(SERVER, CLIENT)
    h.stack.close(handle)
    assert h.events() == [ConnectionClosed(handle, CloseReason.ABORTED)]
    Peer(h).syn()
    [event] = h.events()
    assert isinstance(event, SynReceived)
    h.stack.close(event.handle)  # a held SYN closed is a refused one
    assert h.out()[0].flags & F.RST
    assert h.events() == [ConnectionClosed(event.handle, CloseReason.REFUSED)]


def test_data_queued_before_the_handshake_goes_out_after_it() -> None:
    h = Harness()
    peer = Peer(h)
    peer.syn()
    [event] = h.events()
    h.stack.send(event.handle, b"early bird")
    h.stack.shutdown_write(event.handle)
    h.stack.accept(event.handle)
    [synack] = h.out()
    assert synack.payload == b""
    peer.rcv = synack.seq + 1
    peer.send(F.ACK)
    segs = h.out()
    assert peer.take(segs) == b"early bird" and segs[-1].flags & F.FIN
    assert h.stack.info(event.handle).state == "fin-wait-1"


# ----------------------------------------------------------------------------------------------
# SACK and the tail loss probe


def test_sack_is_used_only_when_both_offer_it() -> None:
    for offered in (True, False):
        h = Harness()
        peer = Peer(h, sack=offered)
        peer.syn()
        [event] = h.events()
        h.stack.accept(event.handle)
        [synack] = h.out()
        assert synack.tcp.sack_permitted is offered
    h = Harness(NetStackConfig(sack=False))
    Peer(h, sack=True).syn()
    h.stack.accept(h.events()[0].handle)
    assert not h.out()[0].tcp.sack_permitted
    h = Harness()
    h.stack.connect(SERVER, CLIENT)
    assert h.out()[0].tcp.sack_permitted  # an active open offers it


def test_out_of_order_data_is_reported_in_sack_blocks_latest_first() -> None:
    h, peer, _handle = open_pair(sack=True)
    base = peer.seq
    peer.send(F.ACK, b"c" * 100, seq=base + 300)
    peer.send(F.ACK, b"e" * 100, seq=base + 500)
    peer.send(F.ACK, b"b" * 100, seq=base + 100)
    [ack] = h.out()  # with SACK, one ACK per flush says it all
    assert ack.ack == base
    assert ack.tcp.sack_ranges == (
        (base + 100, base + 200),
        (base + 500, base + 600),
        (base + 300, base + 400),
    )
    peer.send(F.ACK, b"a" * 100, seq=base)
    peer.send(F.ACK, b"B" * 100, seq=base + 200)
    peer.send(F.ACK, b"d" * 100, seq=base + 400)
    assert data_events(h.events()) == b"".join(c * 100 for c in (b"a", b"b", b"B", b"c", b"d", b"e"))
    [ack] = h.out()
    assert ack.ack == base + 600 and ack.tcp.sack_ranges == ()


def test_segments_shrink_to_make_room_for_sack_blocks() -> None:
    h, peer, handle = open_pair(sack=True)
    peer.send(F.ACK, b"x" * 100, seq=peer.seq + 1000)  # a hole: our segments now carry a SACK block
    h.stack.send(handle, bytes(5000))
    segs = [p for p in h.stack.packets_to_send(h.now)]
    assert all(len(p) <= CFG.mtu for p in segs)
    parsed = [parse(p) for p in segs]
    assert all(s.tcp.sack_ranges for s in parsed)
    assert len(parsed[0].payload) == MSS - 12  # NOP NOP SACK(10) + one 8-byte block


def test_sack_scoreboard_resends_only_the_holes() -> None:
    h, peer, handle = open_pair(sack=True)
    h.stack.send(handle, bytes(10 * MSS))
    segs = h.out()
    base = segs[0].seq
    assert len(segs) == 10
    # The first two segments are lost; the other eight arrived.
    peer.rcv = base
    peer.send(F.ACK, sack=((base + 2 * MSS, base + 10 * MSS),))
    retx = h.out()
    assert [(s.seq, len(s.payload)) for s in retx] == [(base, MSS), (base + MSS, MSS)]
    peer.send(F.ACK, sack=((base + 2 * MSS, base + 10 * MSS),))  # the same news again: nothing new
    assert h.out() == []
    peer.rcv = base + 10 * MSS
    peer.send(F.ACK)
    info = h.stack.info(handle)
    assert info.retransmits == 2 and info.send_buffered == 0


def test_a_lost_retransmission_is_resent_once_later_data_is_sacked() -> None:
    h, peer, handle = open_pair(sack=True)
    h.stack.send(handle, bytes(10 * MSS))
    base = h.out()[0].seq
    peer.rcv = base
    peer.send(F.ACK, sack=((base + MSS, base + 10 * MSS),))
    [retx] = h.out()
    assert retx.seq == base
    h.stack.send(handle, bytes(2 * MSS))
    fresh = h.out()
    assert [s.seq for s in fresh] == [base + 10 * MSS, base + 11 * MSS]
    # The retransmission was lost, the fresh data after it arrived: it cannot be in flight still.
    peer.send(F.ACK, sack=((base + MSS, base + 12 * MSS),))
    [again] = h.out()
    assert again.seq == base and len(again.payload) == MSS


def test_tail_loss_probe_resends_the_last_segment_long_before_the_rto() -> None:
    h, peer, handle = open_pair(sack=True)
    h.stack.send(handle, bytes(5 * MSS))
    segs = h.out()
    base = segs[0].seq
    rto = h.stack.info(handle).rto
    [probe] = h.tick(0.011)  # 2 * SRTT, at least 10 ms
    assert probe.seq == base + 4 * MSS and len(probe.payload) == MSS
    assert rto > 0.011
    # The probe's ACK SACKs it: everything below that is not acknowledged was lost.
    peer.rcv = base + 2 * MSS
    peer.send(F.ACK, sack=((base + 4 * MSS, base + 5 * MSS),))
    retx = h.out()
    assert [s.seq for s in retx] == [base + 2 * MSS, base + 3 * MSS]
    peer.rcv = base + 5 * MSS
    peer.send(F.ACK)
    assert h.stack.info(handle).send_buffered == 0
    assert h.tick(5.0) == []  # nothing outstanding, nothing fires


def test_answers_to_unacceptable_segments_are_rate_limited() -> None:
    h, peer, _handle = open_pair()
    for _ in range(5):
        peer.send(F.ACK, b"old", seq=peer.seq - 100)  # stale data, as a confused peer might keep sending
    assert len(h.out()) == 1
    h.tick(CFG.answer_interval)
    peer.send(F.ACK, b"old", seq=peer.seq - 100)
    assert len(h.out()) == 1


# ----------------------------------------------------------------------------------------------
# limits and bookkeeping


def test_connection_limit_answers_new_syns_with_rst() -> None:
    h = Harness(NetStackConfig(max_connections=2))
    for port in (1001, 1002):
        Peer(h, Endpoint(CLIENT.addr, port)).syn()
    assert len(h.events()) == 2
    Peer(h, Endpoint(CLIENT.addr, 1003)).syn()
    assert h.events() == []
    [rst] = h.out()
    assert rst.flags == F.RST | F.ACK and rst.ack == 1001
    assert h.stack.drops["connection limit"] == 1
    with pytest.raises(NetStackError, match="connections already open"):
        h.stack.connect(SERVER, Endpoint(CLIENT.addr, 2000))


def test_connect_reuses_a_tuple_left_in_time_wait() -> None:
    h, peer, handle = open_pair()
    h.stack.shutdown_write(handle)
    [fin] = h.out()
    peer.rcv = fin.seq + 1
    peer.send(F.ACK | F.FIN)
    h.out()
    h.events()
    assert h.stack.time_wait_count == 1
    again = h.stack.connect(SERVER, CLIENT)  # the same four-tuple, from our side this time
    [syn] = h.out()
    assert syn.flags == F.SYN and again != handle
    assert h.stack.time_wait_count == 0 and h.stack.connection_count == 1


def test_timer_entries_of_finished_connections_do_not_pile_up() -> None:
    h = Harness()
    for port in range(1000, 1300):
        Peer(h, Endpoint(CLIENT.addr, port)).syn()
        [event] = h.events()
        h.stack.refuse(event.handle)  # each left a timer entry (its accept timeout) behind
        h.out()
        h.events()
    assert h.stack.connection_count == 0
    assert len(h.stack._timers) <= 64 + 1
    assert h.stack.get_timer() is None


def test_syns_to_or_from_multicast_addresses_are_ignored() -> None:
    h = Harness()
    Peer(h, them=Endpoint(IPv4Address("224.0.0.9"), 80)).syn()
    Peer(h, me=Endpoint(IPv4Address("255.255.255.255"), 80)).syn()
    assert h.out() == [] and h.events() == []
    assert h.stack.drops["multicast"] == 2


def test_send_after_a_reset_the_owner_has_not_seen_yet_takes_nothing() -> None:
    h, peer, handle = open_pair()
    peer.send(F.RST)
    assert h.stack.send(handle, b"too late") == 0  # ConnectionClosed is still queued
    h.stack.shutdown_write(handle)
    h.stack.close(handle)
    h.stack.abort(handle)
    assert h.out() == []
    assert h.events() == [ConnectionClosed(handle, CloseReason.RESET)]
    with pytest.raises(NetStackError):
        h.stack.send(handle, b"x")


def test_close_after_shutdown_write_makes_an_orphan_that_times_out() -> None:
    config = NetStackConfig(fin_wait2_timeout=3.0)
    h, peer, handle = open_pair(config)
    h.stack.shutdown_write(handle)
    [fin] = h.out()
    peer.rcv = fin.seq + 1
    peer.send(F.ACK)
    h.tick(10.0)  # half-closed, the owner still reading: no timeout
    assert h.stack.info(handle).state == "fin-wait-2"
    h.stack.close(handle)
    h.tick(3.1)
    assert h.events() == [ConnectionClosed(handle, CloseReason.TIMEOUT)]
