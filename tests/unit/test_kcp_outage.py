"""KCP's dead-link rule against an outage: a path that goes silent and comes back carries on; the
conversation is ended by the dead-link rule only while the peer is still heard from."""

from __future__ import annotations

from test_kcp_endpoint import Pair  # tests/unit is on sys.path (pytest's prepend import mode)

from pytier.transport.kcp_config import KcpConfig
from pytier.transport.kcp_events import ConnectionClosed

SIZE = 300_000


def test_fifteen_seconds_of_total_loss_mid_transfer_is_survived() -> None:
    pair = Pair()
    ha, hb = pair.connect()
    pair.a.ep.send(ha, b"x" * 100_000)
    pair.run(0.02)
    start = pair.now
    pair.a.drop = pair.b.drop = lambda now, ptype, payload: now < start + 15.0
    sent = 100_000

    def write_more(now: float) -> None:
        nonlocal sent
        if sent < SIZE:
            sent += pair.a.ep.send(ha, b"x" * (SIZE - sent))

    pair.a.after_events = write_more
    pair.run(60.0, stop=lambda: len(pair.b.data.get(hb, b"")) >= SIZE)
    assert bytes(pair.b.data[hb]) == b"x" * SIZE
    assert not pair.a.of(ConnectionClosed) and not pair.b.of(ConnectionClosed)
    # ikcp's own count was reached during the outage: that alone used to end the conversation.
    assert int(pair.a.ep.stats(ha)["timeout_retransmits"]) >= KcpConfig().dead_link


def test_silent_peer_is_left_to_the_idle_timeout() -> None:
    pair = Pair(KcpConfig(dead_link=8, idle_timeout_s=20.0))
    ha, _hb = pair.connect()
    pair.a.drop = pair.b.drop = lambda now, ptype, payload: True
    pair.a.ep.send(ha, b"lost forever")
    pair.run(40.0, stop=lambda: bool(pair.a.of(ConnectionClosed)))
    assert [e.reason.value for e in pair.a.of(ConnectionClosed)] == ["idle timeout"]
