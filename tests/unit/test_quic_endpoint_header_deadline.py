"""The connect-header deadline of incoming QUIC streams, among many streams that completed theirs."""

from __future__ import annotations

from test_quic_endpoint import A, B, Net, connected_stream, received

from pytier.transport.quic_endpoint import QuicSettings


def test_a_stream_without_its_header_is_dropped_at_the_deadline_and_the_others_stay() -> None:
    net = Net(QuicSettings(header_timeout_s=5.0, keepalive_s=60.0))
    ha, hb = connected_stream(net)
    for i in range(199):
        net.a.open(B, b"hdr%d" % i, net.now)
    net.advance(0.5, step_s=0.01)
    assert len(net.b._streams) == 200
    # A stream whose header says 16 bytes and carries 2 of them, written below the endpoint.
    conn = net.a._clients[B]
    sid = conn.quic.get_next_available_stream_id()
    conn.quic.send_stream_data(sid, b"\x00\x10ab")
    started = net.now
    net.advance(0.1, step_s=0.01)
    assert len(net.b._streams) == 201
    timer = net.b.get_timer()
    assert timer is not None and timer <= started + 5.1  # the header deadline, if nothing sooner
    net.advance(4.0)
    assert len(net.b._streams) == 201
    net.advance(1.5)
    assert len(net.b._streams) == 200  # the headerless one went, at its deadline
    net.a.send(ha, b"still here")
    net.advance(0.1, step_s=0.01)
    assert received(net, B, hb) == b"still here"
    assert A in net.b._servers
