"""Property tests of the user-space TCP stack: whatever arrives, the stack only counts drops and never
raises; its state stays consistent; what it sends always parses; its helpers match simple models."""

from __future__ import annotations

from ipaddress import IPv4Address
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from pytier.netstack import (
    ConnectionClosed,
    Endpoint,
    NetStack,
    NetStackConfig,
    NetStackError,
    NetStackEvent,
    SynReceived,
)
from pytier.netstack.assembler import Assembler
from pytier.netstack.connection import SENDING, Connection
from pytier.netstack.segment import SegmentWriter
from pytier.wire.ipv4 import Ipv4Repr
from pytier.wire.tcp import TcpFlags, TcpRepr

MASK = 0xFFFFFFFF
LOCAL = Endpoint(IPv4Address("192.168.50.7"), 80)
REMOTES = [
    Endpoint(IPv4Address("10.144.144.2"), 40000),
    Endpoint(IPv4Address("10.144.144.3"), 40001),
    Endpoint(IPv4Address("10.144.144.4"), 40002),
]
CONFIG = NetStackConfig(
    mtu=600, recv_buffer=4000, send_buffer=3000, max_ooo_ranges=4, max_time_wait=2, ack_every=3
)


def segment(src: Endpoint, dst: Endpoint, **fields: object) -> bytes:
    body = TcpRepr(src_port=src.port, dst_port=dst.port, **fields).emit(src.addr, dst.addr)  # type: ignore[arg-type]
    return Ipv4Repr(src.addr, dst.addr, 6, len(body)).emit(body)


class World:
    """A stack with a held SYN, an established connection, and an active open, plus what it emitted."""

    def __init__(self) -> None:
        self.now = 0.0
        self.stack = NetStack(
            accept=lambda tup: tup.dst == LOCAL, now=0.0, config=CONFIG, isn_secret=bytes(16)
        )
        self.closed: set[int] = set()
        self.handles: list[int] = []
        for i, remote in enumerate(REMOTES[:2]):
            self.feed(segment(remote, LOCAL, seq=1000 * i, ack=0, flags=TcpFlags.SYN, window=5000, mss=500))
        self.drain()
        self.stack.accept(self.handles[1])
        self.flush()
        conn = self.conn(self.handles[1])
        assert conn is not None
        self.feed(
            segment(REMOTES[1], LOCAL, seq=1001, ack=(conn.iss + 1) & MASK, flags=TcpFlags.ACK, window=9000)
        )
        self.stack.send(self.handles[1], bytes(2500))
        self.handles.append(self.stack.connect(LOCAL, REMOTES[2]))
        self.flush()
        self.drain()

    def conn(self, handle: int) -> Connection | None:
        return self.stack._by_handle.get(handle)

    def conn_of(self, remote: Endpoint) -> Connection | None:
        return next((c for c in self.stack._by_key.values() if c.remote == remote), None)

    def feed(self, packet: bytes) -> None:
        self.stack.receive_packet(packet, self.now)

    def drain(self) -> list[NetStackEvent]:
        events = []
        while (event := self.stack.next_event()) is not None:
            assert event.handle not in self.closed, f"{event} after ConnectionClosed"
            if isinstance(event, SynReceived):
                self.handles.append(event.handle)
            if isinstance(event, ConnectionClosed):
                self.closed.add(event.handle)
            events.append(event)
        return events

    def flush(self) -> None:
        for packet in self.stack.packets_to_send(self.now):
            ip = Ipv4Repr.parse(packet)  # checksums verified
            tcp = TcpRepr.parse(ip.src_addr, ip.dst_addr, packet[ip.header_len :])
            assert Endpoint(ip.src_addr, tcp.src_port) in (LOCAL, *REMOTES[2:])

    def check(self) -> None:
        stack = self.stack
        for conn in stack._by_key.values():
            assert conn.snd_una <= conn.snd_nxt <= conn.snd_max
            assert abs(conn.snd_base - conn.snd_una) <= 1
            assert len(conn.snd_buf) <= CONFIG.send_buffer
            assert len(conn.rcv_buf) <= CONFIG.recv_buffer
            assert conn.ooo.buffered <= CONFIG.recv_buffer
            assert len(conn.ooo.ranges()) <= CONFIG.max_ooo_ranges
            if conn.state in SENDING and conn.snd_nxt > conn.snd_una:
                assert conn.rto_at is not None, f"data in flight without a timer in {conn.state}"
            for when in (conn.rto_at, conn.deadline):
                if when is not None:
                    assert conn.scheduled is not None and conn.scheduled <= when
        assert stack.time_wait_count <= CONFIG.max_time_wait


relative = st.one_of(st.integers(-3000, 6000), st.integers(0, MASK))

segments = st.tuples(
    st.just("segment"),
    st.integers(0, len(REMOTES) - 1),
    st.integers(0, 0x1FF),  # flags, including the odd combinations
    relative,  # seq, relative to what the stack expects
    relative,  # ack, relative to SND.UNA
    st.integers(0, 0xFFFF),
    st.integers(0, 700),  # payload bytes
    st.booleans(),  # options
)
ticks = st.tuples(st.just("tick"), st.floats(0.0, 30.0))
calls = st.tuples(
    st.just("call"),
    st.sampled_from(
        ["accept", "refuse", "send", "shutdown_write", "close", "abort", "pause_reading", "resume_reading"]
    ),
    st.integers(0, 2),
    st.integers(0, 5000),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(segments, ticks, calls), max_size=40))
def test_any_sequence_of_segments_timers_and_calls_keeps_the_stack_consistent(actions: list[tuple]) -> None:
    world = World()
    stack = world.stack
    for action in actions:
        if action[0] == "segment":
            _, who, flags, seq_off, ack_off, window, size, options = action
            conn = world.conn_of(REMOTES[who])
            base_seq = conn.rcv_nxt if conn is not None else 0
            base_ack = conn.snd_una if conn is not None else 0
            world.feed(
                segment(
                    REMOTES[who],
                    LOCAL,
                    seq=(base_seq + seq_off) & MASK,
                    ack=(base_ack + ack_off) & MASK,
                    flags=TcpFlags(flags),
                    window=window,
                    mss=536 if options else None,
                    window_scale=3 if options else None,
                    payload=bytes(size),
                )
            )
        elif action[0] == "tick":
            world.now += action[1]
            timer = stack.get_timer()
            if timer is not None and timer <= world.now:
                stack.handle_timer(world.now)
        else:
            _, name, which, size = action
            try:
                if name == "send":
                    stack.send(world.handles[which], bytes(size))
                else:
                    getattr(stack, name)(world.handles[which])
            except NetStackError:
                pass
        world.drain()
        world.flush()
        world.check()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=20))
def test_arbitrary_bytes_are_dropped_without_raising(packets: list[bytes]) -> None:
    world = World()
    for packet in packets:
        world.feed(packet)
        world.flush()
    world.check()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_packets_are_dropped_or_handled_without_raising(data: st.DataObject) -> None:
    world = World()
    conn = world.conn(world.handles[1])
    assert conn is not None
    packet = bytearray(
        segment(
            REMOTES[1],
            LOCAL,
            seq=conn.rcv_nxt & MASK,
            ack=conn.snd_una & MASK,
            flags=TcpFlags.ACK,
            window=100,
            payload=b"abc",
        )
    )
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(packet) - 1))
        packet[i] = data.draw(st.integers(0, 255))
    world.feed(bytes(packet))
    world.drain()
    world.flush()
    world.check()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60)), max_size=30), st.integers(1, 6))
def test_assembler_matches_a_model(pieces: list[tuple[int, int]], max_ranges: int) -> None:
    truth = bytes(i % 251 for i in range(400))
    asm = Assembler(max_ranges)
    held: set[int] = set()
    for start, length in pieces:
        before = asm.ranges()
        if asm.insert(1000 + start, truth[start : start + length]):
            held.update(range(start, min(start + length, len(truth))))
        else:
            assert asm.ranges() == before  # refused means untouched
        ranges = asm.ranges()
        assert len(ranges) <= max_ranges
        assert all(a < b for a, b in ranges)
        assert all(b1 < a2 for (_, b1), (a2, _) in pairwise(ranges))  # never touching
        assert {i for a, b in ranges for i in range(a - 1000, b - 1000)} == held
        assert asm.buffered == len(held)
    got = asm.pop_from(1000)
    run = 0
    while run in held:
        run += 1
    assert got == truth[:run]


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(0, MASK),
    ack=st.integers(0, MASK),
    flags=st.integers(0, 0xFF),
    window=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=1500),
    sport=st.integers(1, 0xFFFF),
    dport=st.integers(1, 0xFFFF),
    src=st.integers(0, MASK),
    dst=st.integers(0, MASK),
    ttl=st.integers(1, 255),
)
def test_segment_writer_agrees_with_the_codecs(
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes,
    sport: int,
    dport: int,
    src: int,
    dst: int,
    ttl: int,
) -> None:
    a, b = IPv4Address(src), IPv4Address(dst)
    packet = SegmentWriter(a.packed, sport, b.packed, dport, ttl).segment(seq, ack, flags, window, payload)
    ip = Ipv4Repr.parse(packet)  # verifies the header checksum
    assert (ip.src_addr, ip.dst_addr, ip.ttl, ip.protocol, ip.dont_fragment) == (a, b, ttl, 6, True)
    tcp = TcpRepr.parse(a, b, packet[ip.header_len :])  # verifies the TCP checksum
    assert tcp == TcpRepr(
        src_port=sport,
        dst_port=dport,
        seq=seq,
        ack=ack,
        flags=TcpFlags(flags),
        window=window,
        payload=payload,
    )
    assert tcp.emit(a, b) == packet[20:]
