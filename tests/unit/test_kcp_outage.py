"""KCP against an outage: a path that goes silent and comes back carries on (the conversation is
ended by the dead-link rule only while the peer is still heard from), and the silence costs a few
windows of resends, not a flood."""

from __future__ import annotations

import dataclasses
import math

from test_kcp_endpoint import Pair  # tests/unit is on sys.path (pytest's prepend import mode)
from test_kcp_link_model import Flow, Transfer

from pytier.testbed.scenarios import SCENARIOS
from pytier.transport import kcp_pacer
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


def test_ten_second_blackout_costs_a_few_windows_not_a_flood() -> None:
    # ikcp resends every segment in flight at each timeout, and its backoff grows slowly: a bulk
    # sender once put 148 MB on the wire during a 10 s blackout of this path (1,000x its window).
    # Now nothing new enters flight once the path has been silent for a while, and resends go out
    # in trains of SILENT_PROBE_SEGMENTS with a backoff up to SILENT_PROBE_MAX_MS.
    params = SCENARIOS["random-0"].model
    t = Transfer(params, seed=1)
    flow = Flow(up=bytes(2_000_000_000), down=b"")
    t.open(flow, 40000)
    t.run(3.0)
    before = t.a.stats(flow.handle_a)
    in_flight = int(before["in_flight"])
    t.link.set_params(dataclasses.replace(params, loss=1.0))
    t.run(1.0)
    silent_from = t.a.stats(flow.handle_a)
    t.run(9.0)
    after = t.a.stats(flow.handle_a)
    # The backoff reaches its cap within a few doublings, so 10 s hold at most this many trains.
    first = kcp_pacer.SILENT_MIN_MS
    doublings = math.ceil(math.log2(kcp_pacer.SILENT_PROBE_MAX_MS / first))
    trains = doublings + 1 + math.ceil(10_000 / kcp_pacer.SILENT_PROBE_MAX_MS)
    probe_segments = trains * kcp_pacer.SILENT_PROBE_SEGMENTS
    resends = int(after["retransmits"]) - int(before["retransmits"])
    # Before the path counts as silent, the segments in flight time out once or twice.
    assert resends <= 2 * in_flight + probe_segments, (resends, in_flight)
    late_bytes = int(after["bytes_out"]) - int(silent_from["bytes_out"])
    assert late_bytes <= probe_segments * KcpConfig().mtu, late_bytes
    # The path comes back: the conversation carries on at speed.
    t.link.set_params(params)
    got = len(flow.got_up)
    t.run(1.0)
    t.run(3.0)
    resumed = (len(flow.got_up) - got) * 8 / 4.0 / 1e6
    assert flow.closed_a is None and flow.closed_b is None
    assert resumed >= 50.0, resumed
