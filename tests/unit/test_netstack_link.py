"""Two user-space stacks talking through a simulated link that loses, duplicates, delays and reorders
packets, on a virtual clock: both streams must arrive byte-exact and both ends must finish cleanly."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from pytier.netstack import (
    CloseReason,
    Connected,
    ConnectionClosed,
    DataReceived,
    Endpoint,
    NetStack,
    NetStackConfig,
    PeerFinished,
    SynReceived,
)

CLIENT = Endpoint(IPv4Address("10.144.144.2"), 40000)
SERVER = Endpoint(IPv4Address("192.168.50.7"), 80)
DELAY = 0.005  # seconds one way
MAX_STEPS = 400_000
MAX_VIRTUAL_TIME = 3600.0  # seconds
# A long TIME_WAIT: under heavy loss the last FIN may be retransmitted late, and the test wants
# FINISHED on both sides rather than the RST a short TIME_WAIT would rightly produce.
SIM_CONFIG = NetStackConfig(recv_buffer=32 * 1024, send_buffer=48 * 1024, time_wait=600.0, max_retransmits=20)


@dataclass
class App:
    outgoing: bytes
    handle: int | None = None
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    connected: bool = False
    peer_finished: bool = False
    closed: CloseReason | None = None
    shut: bool = False
    paused_until: float | None = None  # a pause in reading, with its end in virtual time


class Sim:
    def __init__(
        self,
        seed: int,
        *,
        loss: float,
        dup: float,
        jitter: float,
        pause: float,
        size_a: int,
        size_b: int,
        config: NetStackConfig = SIM_CONFIG,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.jitter, self.pause = loss, dup, jitter, pause
        self.now = 0.0
        self.a = NetStack(accept=lambda tup: False, now=0.0, config=config, isn_secret=b"a" * 16)
        self.b = NetStack(accept=lambda tup: tup.dst == SERVER, now=0.0, config=config, isn_secret=b"b" * 16)
        self.app_a = App(self.rng.randbytes(size_a))
        self.app_b = App(self.rng.randbytes(size_b))
        self.wire: list[tuple[float, int, int, bytes]] = []  # (arrival, tie-break, to b?, packet)
        self.sent_packets = 0
        self.lost = 0

    def run(self) -> None:
        self.app_a.handle = self.a.connect(CLIENT, SERVER)
        for _ in range(MAX_STEPS):
            self.apps()
            self.transmit(self.a, to_b=True)
            self.transmit(self.b, to_b=False)
            if self.app_a.closed is not None and self.app_b.closed is not None:
                return
            due = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None]
            due += [
                app.paused_until
                for app in (self.app_a, self.app_b)
                if app.paused_until is not None and app.closed is None
            ]
            if self.wire:
                due.append(self.wire[0][0])
            if not due:
                break
            self.now = max(self.now, min(due))
            assert self.now < MAX_VIRTUAL_TIME, "virtual time ran out"
            while self.wire and self.wire[0][0] <= self.now:
                _, _, to_b, packet = heapq.heappop(self.wire)
                (self.b if to_b else self.a).receive_packet(packet, self.now)
            for stack in (self.a, self.b):
                timer = stack.get_timer()
                if timer is not None and timer <= self.now:
                    stack.handle_timer(self.now)
        raise AssertionError(f"no clean finish: a={self.app_a.closed} b={self.app_b.closed}")

    def transmit(self, stack: NetStack, *, to_b: bool) -> None:
        for packet in stack.packets_to_send(self.now):
            self.sent_packets += 1
            if self.rng.random() < self.loss:
                self.lost += 1
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                arrival = self.now + DELAY + self.rng.random() * self.jitter
                heapq.heappush(self.wire, (arrival, self.sent_packets, to_b, packet))

    def apps(self) -> None:
        for stack, app in ((self.a, self.app_a), (self.b, self.app_b)):
            if app.handle is not None and app.closed is None and app.connected:
                # Pauses start and end before the events are read, so that data a resume releases
                # is read now; each lasts up to half a second of virtual time.
                if app.paused_until is not None and self.now >= app.paused_until:
                    app.paused_until = None
                    stack.resume_reading(app.handle)
                elif app.paused_until is None and self.pause and self.rng.random() < self.pause:
                    app.paused_until = self.now + self.rng.uniform(0.001, 0.5)
                    stack.pause_reading(app.handle)
            while (event := stack.next_event()) is not None:
                if isinstance(event, SynReceived):
                    assert app.handle is None and (event.src, event.dst) == (CLIENT, SERVER)
                    app.handle = event.handle
                    stack.accept(event.handle)
                elif isinstance(event, Connected):
                    app.connected = True
                elif isinstance(event, DataReceived):
                    assert not app.peer_finished
                    app.received += event.data
                elif isinstance(event, PeerFinished):
                    app.peer_finished = True
                elif isinstance(event, ConnectionClosed):
                    assert app.closed is None
                    app.closed = event.reason
            if app.handle is None or app.closed is not None or not app.connected:
                continue
            if app.sent < len(app.outgoing):
                app.sent += stack.send(app.handle, app.outgoing[app.sent : app.sent + 20_000])
            elif not app.shut:
                app.shut = True
                stack.shutdown_write(app.handle)

    def check(self) -> None:
        assert self.app_b.received == self.app_a.outgoing
        assert self.app_a.received == self.app_b.outgoing
        assert self.app_a.closed is CloseReason.FINISHED
        assert self.app_b.closed is CloseReason.FINISHED


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.2]),
    dup=st.sampled_from([0.0, 0.05]),
    jitter=st.sampled_from([0.0, 0.002, 0.02]),  # beyond DELAY packets overtake each other
    pause=st.sampled_from([0.0, 0.05]),
    size_a=st.integers(0, 120_000),
    size_b=st.integers(0, 120_000),
)
def test_streams_survive_loss_duplication_reordering_and_pauses(
    seed: int, loss: float, dup: float, jitter: float, pause: float, size_a: int, size_b: int
) -> None:
    sim = Sim(seed, loss=loss, dup=dup, jitter=jitter, pause=pause, size_a=size_a, size_b=size_b)
    sim.run()
    sim.check()


def test_two_megabytes_each_way_through_a_bad_link() -> None:
    sim = Sim(1, loss=0.05, dup=0.02, jitter=0.01, pause=0.02, size_a=2_000_000, size_b=2_000_000)
    sim.run()
    sim.check()
    assert sim.lost > 100
    # Whatever remains of the connection is TIME_WAIT (on one side, or both after a simultaneous close).
    assert sim.a.connection_count == sim.a.time_wait_count
    assert sim.b.connection_count == sim.b.time_wait_count


def test_sack_recovery_beats_the_rto() -> None:
    """With SACK, losses are repaired from the scoreboard well within the first RTO."""
    sims = {}
    for sack in (True, False):
        config = NetStackConfig(recv_buffer=64 * 1024, send_buffer=64 * 1024, sack=sack, time_wait=600.0)
        sim = Sim(
            3, loss=0.03, dup=0.0, jitter=0.0, pause=0.0, size_a=1_000_000, size_b=1_000_000, config=config
        )
        sim.run()
        sim.check()
        sims[sack] = sim
    assert sims[True].now < sims[False].now
