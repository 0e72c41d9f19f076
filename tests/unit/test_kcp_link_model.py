"""The virtual-time link model, and two KcpEndpoints moving real bytes across it.

These are not speed benchmarks: the goodput floor is far below what the model gives (see `main`) and
only catches stalls and regressions. Goodput figures for a report:

    .venv/bin/python tests/unit/test_kcp_link_model.py [--seconds 10] [--seeds 3] [--loss 0,0.01,...]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest

from pytier.testbed.link_model import DuplexLink, LinkDirection, LinkParams, SansIoNode, run_link
from pytier.transport.kcp_config import KcpConfig
from pytier.transport.kcp_endpoint import KcpEndpoint
from pytier.transport.kcp_events import (
    CloseReason,
    Connected,
    ConnectionClosed,
    DataReceived,
    IncomingConnection,
    PeerFinished,
)
from pytier.wire.messages import KcpConnData, SocketAddr

Packet = tuple[int, int, bytes]


def conn_data(port: int) -> bytes:
    return KcpConnData(
        SocketAddr(IPv4Address("10.144.144.3"), port), SocketAddr(IPv4Address("10.144.144.1"), 80)
    ).encode()


# --- the link model itself ---------------------------------------------------------------------


def test_link_delays_serialises_and_keeps_order() -> None:
    d: LinkDirection[str] = LinkDirection(
        LinkParams(delay_s=0.02, rate_bps=8e6, queue_s=1.0, overhead_bytes=0), random.Random(0)
    )
    assert d.send(0.0, "a", 1000) and d.send(0.0, "b", 1000)  # 1 ms each at 8 Mbit/s
    assert d.next_arrival() == pytest.approx(0.021)
    assert d.deliver(0.0209) == []
    assert d.deliver(0.021) == ["a"]
    assert d.deliver(0.03) == ["b"]
    assert d.backlog_s(0.0) == pytest.approx(0.002) and d.backlog_s(0.01) == 0.0


def test_link_drop_tail_queue_holds_queue_s_of_backlog() -> None:
    d: LinkDirection[int] = LinkDirection(
        LinkParams(delay_s=0.0, rate_bps=8e6, queue_s=0.005, overhead_bytes=0), random.Random(0)
    )
    accepted = [d.send(0.0, i, 1000) for i in range(10)]
    assert accepted == [True] * 6 + [False] * 4  # 5 ms of queue behind the one being sent
    assert d.stats.dropped_queue == 4
    assert d.deliver(1.0) == list(range(6))


def test_link_loss_is_seeded_and_close_to_the_rate() -> None:
    def run(seed: int) -> list[int]:
        d: LinkDirection[int] = LinkDirection(
            LinkParams(delay_s=0.0, rate_bps=None, loss=0.1), random.Random(seed)
        )
        for i in range(20_000):
            d.send(i * 1e-4, i, 100)
        return d.deliver(10.0)

    first = run(5)
    assert first == run(5) and first != run(6)
    assert 0.88 < len(first) / 20_000 < 0.92


def test_run_link_jumps_over_idle_time() -> None:
    link: DuplexLink[str] = DuplexLink(LinkParams(delay_s=0.5, rate_bps=None))
    got: list[tuple[float, str]] = []
    sent = [False]

    def transmit(now: float) -> list[tuple[str, int]]:
        if sent[0]:
            return []
        sent[0] = True
        return [("ping", 4)]

    steps = [0]

    def count_timer() -> float | None:
        steps[0] += 1
        return None

    a = SansIoNode(
        receive=lambda item, now: None,
        transmit=transmit,
        get_timer=count_timer,
        handle_timer=lambda now: None,
    )
    b: SansIoNode[str] = SansIoNode(
        receive=lambda item, now: got.append((now, item)),
        transmit=lambda now: [],
        get_timer=lambda: None,
        handle_timer=lambda now: None,
    )
    end = run_link(link, a, b, start=0.0, until=100.0)
    assert got == [(pytest.approx(0.5), "ping")]
    assert end > 100.0 and steps[0] < 20


# --- KCP over the model ------------------------------------------------------------------------


@dataclass
class Flow:
    """One proxied connection's application on both sides: bytes to send, bytes received."""

    up: bytes
    down: bytes
    handle_a: int = -1
    handle_b: int = -1
    sent_up: int = 0
    sent_down: int = 0
    got_up: bytearray = field(default_factory=bytearray)
    got_down: bytearray = field(default_factory=bytearray)
    closed_a: CloseReason | None = None
    closed_b: CloseReason | None = None
    write_sizes: Callable[[], int] = lambda: 65536


class Transfer:
    """Endpoint A (peer 1) opens flows to B (peer 2); each side writes its bytes then half-closes."""

    def __init__(self, params: LinkParams, *, seed: int = 1, config: KcpConfig | None = None) -> None:
        self.a = KcpEndpoint(1, now=0.0, config=config, rng=random.Random(seed))
        self.b = KcpEndpoint(2, now=0.0, config=config, rng=random.Random(seed + 100))
        self.link: DuplexLink[Packet] = DuplexLink(params, seed=seed)
        self.flows: list[Flow] = []
        self.by_a: dict[int, Flow] = {}
        self.by_b: dict[int, Flow] = {}
        self.pending: dict[bytes, Flow] = {}
        self.now = 0.0

    def open(self, flow: Flow, port: int) -> None:
        data = conn_data(port)
        flow.handle_a = self.a.connect(2, data, self.now)
        self.by_a[flow.handle_a] = flow
        self.pending[data] = flow
        self.flows.append(flow)

    def _pump(self, ep: KcpEndpoint, handle: int, flow: Flow, up: bool) -> None:
        payload = flow.up if up else flow.down
        sent = flow.sent_up if up else flow.sent_down
        while sent < len(payload):
            taken = ep.send(handle, payload[sent : sent + flow.write_sizes()])
            if taken == 0:
                break
            sent += taken
        if up:
            flow.sent_up = sent
        else:
            flow.sent_down = sent
        if sent == len(payload):
            ep.shutdown_write(handle)

    def app_a(self, now: float) -> None:
        while (ev := self.a.next_event()) is not None:
            flow = self.by_a[ev.handle]
            if isinstance(ev, DataReceived):
                flow.got_down.extend(ev.data)
            elif isinstance(ev, ConnectionClosed):
                flow.closed_a = ev.reason
            elif not isinstance(ev, (Connected, PeerFinished)):
                raise AssertionError(ev)
        for handle, flow in self.by_a.items():
            if flow.closed_a is None and self.a.writable(handle):
                self._pump(self.a, handle, flow, up=True)

    def app_b(self, now: float) -> None:
        while (ev := self.b.next_event()) is not None:
            if isinstance(ev, IncomingConnection):
                flow = self.pending.pop(ev.conn_data)
                flow.handle_b = ev.handle
                self.by_b[ev.handle] = flow
                self.b.accept(ev.handle, now)
                continue
            flow = self.by_b[ev.handle]
            if isinstance(ev, DataReceived):
                flow.got_up.extend(ev.data)
            elif isinstance(ev, ConnectionClosed):
                flow.closed_b = ev.reason
            elif not isinstance(ev, PeerFinished):
                raise AssertionError(ev)
        for handle, flow in self.by_b.items():
            if flow.closed_b is None and self.b.writable(handle):
                self._pump(self.b, handle, flow, up=False)

    def node(self, ep: KcpEndpoint, app: Callable[[float], None]) -> SansIoNode[Packet]:
        return SansIoNode(
            receive=lambda item, now: ep.receive(item[0], item[1], item[2], now),
            transmit=lambda now: [((ep.my_peer_id, t, p), len(p)) for _to, t, p in ep.datagrams_to_send(now)],
            get_timer=ep.get_timer,
            handle_timer=ep.handle_timer,
            app=app,
        )

    def done(self) -> bool:
        return all(f.closed_a is not None and f.closed_b is not None for f in self.flows)

    def run(self, seconds: float, stop: Callable[[], bool] | None = None, *, tick_s: float = 0.001) -> None:
        self.now = run_link(
            self.link,
            self.node(self.a, self.app_a),
            self.node(self.b, self.app_b),
            start=self.now,
            until=self.now + seconds,
            tick_s=tick_s,
            stop=stop,
        )


def bulk_goodput(
    loss: float, *, seconds: float = 10.0, seed: int = 1, config: KcpConfig | None = None
) -> float:
    """Mbit/s of payload delivered A -> B in `seconds` over the 20 ms / 100 Mbit/s / 50 ms-queue link."""
    t = Transfer(LinkParams(loss=loss), seed=seed, config=config)
    flow = Flow(up=bytes(2_000_000_000), down=b"")  # never runs dry; zeros cost nothing to compare
    t.open(flow, 40000)
    t.run(seconds)
    return len(flow.got_up) * 8 / seconds / 1e6


@pytest.mark.parametrize("tick_s", [0.001, 0.0001])
def test_no_needless_resends_at_20_percent_loss(tick_s: float) -> None:
    # A fifth of B's ACK packets are lost, and (with the 0.1 ms step) A flushes several times per
    # millisecond, one ACK packet after another: neither may make A send again what arrived.
    # Summed over three seeds: one seed's share of duplicates swings between 0.7% and 2.4%.
    duplicates = segments_in = retransmits = segments_sent = 0
    for seed in (1, 2, 3):
        t = Transfer(LinkParams(loss=0.2), seed=seed)
        flow = Flow(up=bytes(200_000_000), down=b"")
        t.open(flow, 40002)
        t.run(2.0, tick_s=tick_s)
        a, b = t.a.stats(flow.handle_a), t.b.stats(flow.handle_b)
        duplicates += int(b["duplicates_in"])
        segments_in += int(b["segments_in"])
        retransmits += int(a["retransmits"])
        segments_sent += int(a["segments_sent"])
    assert duplicates < 0.02 * segments_in
    # 20% of the segments are lost, and 20% of their resends: 0.25 resends per segment.
    assert retransmits < 0.3 * segments_sent


def test_random_writes_arrive_intact_through_10_percent_loss() -> None:
    rng = random.Random(11)
    t = Transfer(LinkParams(loss=0.1), seed=3)
    flow = Flow(
        up=rng.randbytes(12_000_000),
        down=rng.randbytes(4_000_000),
        write_sizes=lambda: rng.randint(1, 70_000),
    )
    t.open(flow, 40001)
    cpu = time.process_time()
    t.run(30.0, stop=t.done)
    assert flow.closed_a is CloseReason.FINISHED and flow.closed_b is CloseReason.FINISHED
    assert hashlib.sha256(flow.got_up).digest() == hashlib.sha256(flow.up).digest()
    assert hashlib.sha256(flow.got_down).digest() == hashlib.sha256(flow.down).digest()
    assert time.process_time() - cpu < 10.0


def test_goodput_floor_at_10_percent_loss() -> None:
    assert bulk_goodput(0.1, seconds=10.0) >= 40.0


def test_parallel_bulk_conversations_share_the_path_fairly() -> None:
    t = Transfer(LinkParams(loss=0.05), seed=4)
    flows = [Flow(up=bytes(200_000_000), down=b"") for _ in range(6)]
    for i, flow in enumerate(flows):
        t.open(flow, 30000 + i)
    t.run(6.0)
    got = [len(f.got_up) for f in flows]
    assert min(got) / max(got) > 0.7
    assert sum(got) * 8 / 6.0 / 1e6 >= 40.0


def test_two_hundred_concurrent_conversations_all_complete() -> None:
    rng = random.Random(5)
    t = Transfer(LinkParams(loss=0.05), seed=9)
    for i in range(200):
        t.open(
            Flow(up=rng.randbytes(rng.randint(1, 40_000)), down=rng.randbytes(rng.randint(1, 40_000))),
            20000 + i,
        )
    t.run(60.0, stop=t.done)
    assert [
        f for f in t.flows if f.closed_a is not CloseReason.FINISHED or f.closed_b is not CloseReason.FINISHED
    ] == []
    assert all(f.got_up == f.up and f.got_down == f.down for f in t.flows)
    assert t.a.handles() == [] and t.b.handles() == []


def main() -> None:
    parser = argparse.ArgumentParser(description="KCP goodput in the virtual-time link model")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--loss", default="0,0.01,0.05,0.1,0.2")
    parser.add_argument("--interval", type=int, default=KcpConfig().interval_ms, help="ikcp interval, ms")
    parser.add_argument(
        "--easytier",
        action="store_true",
        help="EasyTier's ikcp parameters: no pacing, windows 1024, nodelay 1",
    )
    args = parser.parse_args()
    config = (
        KcpConfig(pacing=False, snd_wnd=1024, rcv_wnd=1024, nodelay=1, interval_ms=args.interval)
        if args.easytier
        else KcpConfig(interval_ms=args.interval)
    )
    print(
        f"link: 20 ms one way, 100 Mbit/s, 50 ms drop-tail queue, 88 B overhead; {args.seconds:g} s per run"
    )
    for loss in (float(x) for x in args.loss.split(",")):
        cpu = time.process_time()
        runs = [
            bulk_goodput(loss, seconds=args.seconds, seed=s, config=config) for s in range(1, args.seeds + 1)
        ]
        runs.sort()
        cpu_per_run = (time.process_time() - cpu) / len(runs)
        print(
            f"loss {loss * 100:4.1f}% each way: median {runs[len(runs) // 2]:5.1f} Mbit/s "
            f"(runs {', '.join(f'{r:.1f}' for r in runs)}; {cpu_per_run:.2f} s CPU per run)"
        )


if __name__ == "__main__":
    main()
