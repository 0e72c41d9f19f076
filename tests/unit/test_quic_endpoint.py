"""The sans-IO QUIC proxy endpoint: stream headers, half-close, teardown, keep-alive, caching, timeouts."""

from __future__ import annotations

import struct

from pytier.transport.quic_endpoint import (
    IncomingStream,
    QuicEndpoint,
    QuicEndpointEvent,
    QuicSettings,
    StreamClosed,
    StreamData,
    StreamFinished,
    StreamOpened,
)
from pytier.wire.peer_header import PacketType

A, B = 0x0A, 0x0B


class Net:
    """Two endpoints, A and B, joined by a zero-delay link; `cut` drops everything."""

    def __init__(self, settings: QuicSettings | None = None) -> None:
        self.now = 100.0
        self.a = QuicEndpoint(A, settings)
        self.b = QuicEndpoint(B, settings)
        self.events: dict[int, list[QuicEndpointEvent]] = {A: [], B: []}
        self.cut = False
        self.sent: dict[int, list[tuple[int, int, bytes]]] = {A: [], B: []}

    def step(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            moved = False
            for src, ep, other in ((A, self.a, self.b), (B, self.b, self.a)):
                for ev_time in (ep.get_timer(),):
                    if ev_time is not None and ev_time <= self.now:
                        ep.handle_timer(self.now)
                for to, kind, data in ep.datagrams_to_send(self.now):
                    self.sent[src].append((to, kind, data))
                    if not self.cut:
                        other.receive(src, kind, data, self.now)
                        moved = True
                while (ev := ep.next_event()) is not None:
                    self.events[src].append(ev)
            if not moved:
                return

    def advance(self, seconds: float, step_s: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step_s)
            self.step()

    def of(self, node: int, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events[node] if isinstance(e, kind)]


def connected_stream(net: Net, conn_data: bytes = b"hdr") -> tuple[int, int]:
    h = net.a.open(B, conn_data, net.now)
    net.step()
    [opened] = net.of(A, StreamOpened)
    [incoming] = net.of(B, IncomingStream)
    assert opened.handle == h and incoming.conn_data == conn_data and incoming.from_peer == A
    net.b.accept(incoming.handle)
    return h, incoming.handle


def received(net: Net, node: int, handle: int) -> bytes:
    return b"".join(e.data for e in net.of(node, StreamData) if e.handle == handle)


def test_packet_types_follow_the_roles() -> None:
    net = Net()
    connected_stream(net)
    assert {kind for _, kind, _ in net.sent[A]} == {int(PacketType.QuicSrc)}
    assert {kind for _, kind, _ in net.sent[B]} == {int(PacketType.QuicDst)}
    assert all(to == B for to, _, _ in net.sent[A]) and all(to == A for to, _, _ in net.sent[B])


def test_stream_header_is_u16_length_then_conn_data() -> None:
    net = Net()
    h, _ = connected_stream(net, b"\x0a\x0b" * 10)
    # The first STREAM bytes on the wire: u16 BE length, then the connect data.
    assert any(struct.pack(">H", 20) + b"\x0a\x0b" * 10 in data for _, _, data in net.sent[A])
    assert h >= 1


def test_data_both_ways_and_half_close() -> None:
    net = Net()
    ha, hb = connected_stream(net)
    net.a.send(ha, b"ping" * 1000)
    net.a.shutdown_write(ha)
    net.advance(0.2)  # the pacer lets a couple of packets out per instant, the rest over time
    assert received(net, B, hb) == b"ping" * 1000
    assert [e.handle for e in net.of(B, StreamFinished)] == [hb]
    # B's half is still open after A finished.
    net.b.send(hb, b"pong" * 2000)
    net.b.shutdown_write(hb)
    net.advance(0.2)
    assert received(net, A, ha) == b"pong" * 2000
    assert [e.handle for e in net.of(A, StreamFinished)] == [ha]
    net.a.close(ha)
    net.b.close(hb)
    net.step()
    assert not net.of(A, StreamClosed) and not net.of(B, StreamClosed)


def test_data_sent_with_the_header_waits_for_accept() -> None:
    net = Net()
    h = net.a.open(B, b"hdr", net.now)
    net.a.send(h, b"early")
    net.step()
    [incoming] = net.of(B, IncomingStream)
    assert net.of(B, StreamData) == []
    net.b.accept(incoming.handle)
    net.step()
    assert received(net, B, incoming.handle) == b"early"


def test_abort_resets_the_far_side() -> None:
    net = Net()
    ha, hb = connected_stream(net)
    net.a.abort(ha)
    net.step()
    [closed] = net.of(B, StreamClosed)
    assert closed.handle == hb and "by the peer" in closed.reason and closed.opened


def test_refused_stream_fails_the_opener() -> None:
    net = Net()
    ha, hb = connected_stream(net)
    net.b.refuse(hb)
    net.step()
    [closed] = net.of(A, StreamClosed)
    assert closed.handle == ha


def test_oversized_header_is_refused() -> None:
    net = Net()
    h = net.a.open(B, b"x" * 513, net.now)
    net.step()
    assert net.of(B, IncomingStream) == []
    assert [e.handle for e in net.of(A, StreamClosed)] == [h]


def test_header_not_complete_in_five_seconds_is_refused() -> None:
    net = Net()
    connected_stream(net, b"x" * 100)
    empty = net.a.open(B, b"", net.now)
    net.step()
    assert [e.conn_data for e in net.of(B, IncomingStream)] == [b"x" * 100, b""]
    # A header that never completes: the length says 50, only 10 bytes follow.
    raw = net.a._clients[B].quic
    sid = raw.get_next_available_stream_id()
    raw.send_stream_data(sid, struct.pack(">H", 50) + b"y" * 10)
    net.step()
    assert len(net.of(B, IncomingStream)) == 2
    net.advance(4.9)
    assert len(net.b._servers[A].streams) == 3
    net.advance(0.3)
    assert len(net.b._servers[A].streams) == 2  # refused: reset and stopped
    assert empty > 0


def test_second_stream_reuses_the_connection() -> None:
    net = Net()
    connected_stream(net)
    initials = sum(1 for _, _, d in net.sent[A] if d[0] & 0xF0 == 0xC0)
    h2 = net.a.open(B, b"two", net.now)
    assert [e.handle for e in net.a._events if isinstance(e, StreamOpened)] == [h2]  # no handshake
    net.step()
    assert sum(1 for _, _, d in net.sent[A] if d[0] & 0xF0 == 0xC0) == initials
    assert len(net.a._clients) == 1 and len(net.b._servers) == 1


def test_keepalive_every_five_seconds_when_idle() -> None:
    net = Net()
    connected_stream(net)
    net.advance(1.0)
    before = len(net.sent[A])
    net.advance(20.0, step_s=0.5)
    # Distinct packets: this coarse clock lets the PTO fire before the delayed ACK of each PING comes,
    # and a probe timeout's datagram goes out in copies.
    pings = len({data for _, _, data in net.sent[A][before:]})
    assert 3 <= pings <= 6  # ~every 5 s (each answered by an ACK from B)
    assert A in net.b._servers and B in net.a._clients  # 20 s > nothing: kept alive past... the idle timeout
    net.advance(20.0, step_s=0.5)
    assert A in net.b._servers and B in net.a._clients  # 40 s: longer than the 30 s idle timeout


def test_idle_connection_is_dropped_after_the_cache_time() -> None:
    net = Net(QuicSettings(conn_cache_idle_s=10.0))
    ha, hb = connected_stream(net)
    net.a.shutdown_write(ha)
    net.b.shutdown_write(hb)
    net.step()
    net.a.close(ha)
    net.b.close(hb)
    net.advance(9.0, step_s=0.5)
    assert B in net.a._clients
    net.advance(2.0, step_s=0.5)
    assert B not in net.a._clients and A not in net.b._servers  # the server saw CONNECTION_CLOSE


def test_connect_timeout_fails_the_open() -> None:
    net = Net()
    net.cut = True
    h = net.a.open(B, b"hdr", net.now)
    net.advance(9.5, step_s=0.5)
    assert net.of(A, StreamClosed) == []
    net.advance(1.0, step_s=0.5)
    [closed] = net.of(A, StreamClosed)
    assert closed.handle == h and not closed.opened and "timed out" in closed.reason


def test_peer_restart_replaces_the_server_connection() -> None:
    net = Net()
    ha, hb = connected_stream(net)
    old = net.b._servers[A]
    net.a = QuicEndpoint(A)  # A restarted: a new client connection from scratch
    h2 = net.a.open(B, b"again", net.now)
    net.step()
    assert net.b._servers[A] is not old
    assert [e.handle for e in net.of(B, StreamClosed)] == [hb]
    assert net.of(B, IncomingStream)[-1].conn_data == b"again"
    assert h2 >= 1 and ha >= 1


def test_peer_gone_fails_its_streams() -> None:
    net = Net()
    ha, _ = connected_stream(net)
    net.a.peer_gone(B, net.now)
    [closed] = net.of(A, StreamClosed) or [e for e in net.a._events if isinstance(e, StreamClosed)]
    assert closed.handle == ha and closed.opened
    assert B not in net.a._clients


def test_flow_control_follows_consumption() -> None:
    net = Net(QuicSettings(stream_window=64 * 1024))
    ha, hb = connected_stream(net)
    net.a.send(ha, bytes(1 << 20))
    net.advance(1.0, step_s=0.01)
    got = len(received(net, B, hb))
    assert got <= 64 * 1024 + 16  # header included in the credit
    net.b.consume(hb, got)
    net.advance(1.0, step_s=0.01)
    assert len(received(net, B, hb)) > got
    assert net.a.unsent(ha) > 0


def test_stats() -> None:
    net = Net()
    ha, _ = connected_stream(net)
    net.a.send(ha, bytes(30000))  # within a stream's initial credit: B reads nothing
    net.advance(0.5, step_s=0.01)
    stats = net.a.stats(ha)
    assert set(stats) == {"rtt_ms", "retrans", "segments_sent", "spurious", "bbr_state", "bw_mbit"}
    assert stats["bbr_state"] in ("startup", "drain", "probe_bw", "probe_rtt")
    assert int(stats["segments_sent"]) >= 30000 // 1380  # type: ignore[call-overload]
    net.a.abort(ha)
    final = net.a.take_final_stats(ha)  # what the proxy table shows for the closed row
    assert final is not None and final["segments_sent"] == stats["segments_sent"]
    assert net.a.take_final_stats(ha) is None


def test_late_data_of_an_aborted_stream_is_not_a_new_stream() -> None:
    net = Net()
    ha, hb = connected_stream(net)
    net.a.send(ha, b"\x00\x03abc" * 4000)  # in flight toward B (and shaped like a stream header) ...
    net.b.abort(hb)  # ... when B is done with the stream
    net.advance(0.5)
    assert len(net.of(B, IncomingStream)) == 1


def test_accepting_a_stream_that_is_gone_says_so() -> None:
    net = Net()
    h = net.a.open(B, b"hdr", net.now)
    net.step()
    [incoming] = net.of(B, IncomingStream)
    net.a.abort(h)
    net.step()
    assert net.b.accept(incoming.handle) is False
