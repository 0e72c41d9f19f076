"""A deterministic virtual-time model of a lossy link, for testing transports without a network.

Each direction is, in order: an optional token-bucket policer at ingress (what does not conform is
dropped at once); a bottleneck of `rate_bps` with a drop-tail queue that holds at most `queue_s` of
backlog; random loss and optional Gilbert-Elliott burst loss, as two independent channels; and a
fixed one-way delay, plus an extra delay for a `reorder` share of packets, which the packets behind
them then overtake. Packets are opaque items with a size; `overhead_bytes` is added to each one to
stand for the UDP/IP/tunnel headers that also occupy the bottleneck. Loss sits after the queue, so a
saturated link delivers about rate x (1 - loss).

Time is whatever float clock the caller passes in (seconds); nothing here reads a real clock, and the
loss pattern depends only on the seed, so a run is reproducible. Parameters may be replaced mid-run
(`set_params`) to model a path that changes under a live connection.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pytier.testbed.path_model import GilbertElliott, Policer, Reorderer

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LinkParams:
    delay_s: float = 0.020
    rate_bps: float | None = 100e6  # None: no serialisation delay and no queue
    queue_s: float = 0.050  # drop-tail limit, as time needed to drain the backlog
    loss: float = 0.0  # probability that a packet leaving the queue is lost
    overhead_bytes: int = 88
    # Gilbert-Elliott burst loss (see path_model.GilbertElliott), on when burst_loss > 0; the good
    # state loses nothing, so random `loss` is the way to add background loss.
    burst_enter: float = 0.0  # per packet, good -> bad
    burst_exit: float = 1.0  # per packet, bad -> good; mean stay in bad is 1/burst_exit packets
    burst_loss: float = 0.0  # loss probability in the bad state
    police_bps: float | None = None  # token-bucket policer at ingress; None: no policer
    police_bucket_bytes: int = 65536
    reorder: float = 0.0  # share of packets held back by reorder_delay_s
    reorder_delay_s: float = 0.0


@dataclass(slots=True)
class LinkStats:
    packets_in: int = 0
    bytes_in: int = 0
    dropped_queue: int = 0
    dropped_loss: int = 0
    dropped_burst: int = 0
    dropped_police: int = 0
    reordered: int = 0
    packets_out: int = 0
    bytes_out: int = 0


@dataclass(slots=True)
class LinkDirection(Generic[T]):
    """One direction of a link. `send` then `deliver` items in arrival-time order.

    The policer, burst-loss chain and reorderer draw from the direction's `rng`, and none of them
    draws when it is off, so a run with only the classic parameters sees the same loss pattern as
    before they existed.
    """

    params: LinkParams
    rng: random.Random
    stats: LinkStats = field(default_factory=LinkStats)
    _busy_until: float = 0.0
    # (arrival, sequence, item, size): the sequence keeps equal arrival times in send order and spares
    # comparing items, which may not be orderable.
    _in_flight: list[tuple[float, int, T, int]] = field(default_factory=list)
    _sent: int = 0
    _burst: GilbertElliott | None = field(init=False, default=None)
    _policer: Policer | None = field(init=False, default=None)
    _reorderer: Reorderer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._build_models()

    def _build_models(self) -> None:
        p = self.params
        self._burst = (
            GilbertElliott(p.burst_enter, p.burst_exit, p.burst_loss, self.rng) if p.burst_loss > 0 else None
        )
        self._policer = None if p.police_bps is None else Policer(p.police_bps, p.police_bucket_bytes)
        self._reorderer = Reorderer(p.reorder, p.reorder_delay_s, self.rng) if p.reorder > 0 else None

    def set_params(self, params: LinkParams) -> None:
        """Switch to new parameters mid-run: the queue and what is in flight stay, the models start afresh
        (a full policer bucket, the burst chain in its good state)."""
        self.params = params
        self._build_models()

    def send(self, now: float, item: T, size: int) -> bool:
        """Offer an item of `size` bytes at time `now`; False when the policer, queue or loss drops it."""
        p = self.params
        st = self.stats
        st.packets_in += 1
        st.bytes_in += size
        if self._policer is not None and not self._policer.admit(size, now):
            st.dropped_police += 1
            return False
        if p.rate_bps is None:
            leaves = now
        else:
            start = max(now, self._busy_until)
            if start - now > p.queue_s:
                st.dropped_queue += 1
                return False
            leaves = start + (size + p.overhead_bytes) * 8.0 / p.rate_bps
            self._busy_until = leaves
        lost = p.loss > 0.0 and self.rng.random() < p.loss
        # The burst chain moves on every packet, lost to random loss or not: the two are independent.
        burst_lost = self._burst is not None and self._burst.drop()
        if lost:
            st.dropped_loss += 1
            return False
        if burst_lost:
            st.dropped_burst += 1
            return False
        arrival = leaves + p.delay_s
        if self._reorderer is not None:
            extra = self._reorderer.extra_delay()
            if extra:
                st.reordered += 1
                arrival += extra
        heapq.heappush(self._in_flight, (arrival, self._sent, item, size))
        self._sent += 1
        return True

    def next_arrival(self) -> float | None:
        return self._in_flight[0][0] if self._in_flight else None

    def deliver(self, now: float) -> list[T]:
        """Items whose arrival time is at or before `now`, earliest arrival first."""
        out: list[T] = []
        q = self._in_flight
        while q and q[0][0] <= now:
            _, _, item, size = heapq.heappop(q)
            self.stats.packets_out += 1
            self.stats.bytes_out += size
            out.append(item)
        return out

    def backlog_s(self, now: float) -> float:
        return max(0.0, self._busy_until - now)


class DuplexLink(Generic[T]):
    """Two independent directions, A->B and B->A, each with its own parameters and loss stream."""

    def __init__(self, a_to_b: LinkParams, b_to_a: LinkParams | None = None, *, seed: int = 0) -> None:
        self.a_to_b: LinkDirection[T] = LinkDirection(a_to_b, random.Random(seed * 2 + 1))
        self.b_to_a: LinkDirection[T] = LinkDirection(
            b_to_a if b_to_a is not None else a_to_b, random.Random(seed * 2 + 2)
        )

    def set_params(self, a_to_b: LinkParams, b_to_a: LinkParams | None = None) -> None:
        """New parameters mid-run; `b_to_a` defaults to the same as `a_to_b`, as in the constructor."""
        self.a_to_b.set_params(a_to_b)
        self.b_to_a.set_params(b_to_a if b_to_a is not None else a_to_b)

    def next_arrival(self) -> float | None:
        times = [t for t in (self.a_to_b.next_arrival(), self.b_to_a.next_arrival()) if t is not None]
        return min(times) if times else None


@dataclass(slots=True)
class SansIoNode(Generic[T]):
    """One end of a simulated link, given as the calls of a sans-IO protocol object.

    `receive(item, now)` takes one arrived item; `transmit(now)` returns (item, size) pairs to send;
    `get_timer()`/`handle_timer(now)` are the protocol's timer; `app(now)`, if given, is the owner's
    logic (consume events, write data) and runs after arrivals and timers, before transmitting.
    """

    receive: Callable[[T, float], None]
    transmit: Callable[[float], list[tuple[T, int]]]
    get_timer: Callable[[], float | None]
    handle_timer: Callable[[float], None]
    app: Callable[[float], None] | None = None


def run_link(
    link: DuplexLink[T],
    a: SansIoNode[T],
    b: SansIoNode[T],
    *,
    start: float,
    until: float,
    tick_s: float = 0.001,
    stop: Callable[[], bool] | None = None,
) -> float:
    """Advance virtual time from `start` to `until` (or until `stop()` is true); returns the end time.

    Time moves in steps of at least `tick_s` and jumps over idle stretches straight to the next arrival
    or timer (rounded up to the tick), so a run of N virtual seconds costs at most N / tick_s steps.
    """
    now = start
    sides = ((a, link.b_to_a, link.a_to_b), (b, link.a_to_b, link.b_to_a))
    while now <= until:
        for node, inbound, outbound in sides:
            for item in inbound.deliver(now):
                node.receive(item, now)
            timer = node.get_timer()
            if timer is not None and timer <= now:
                node.handle_timer(now)
            if node.app is not None:
                node.app(now)
            for item, size in node.transmit(now):
                outbound.send(now, item, size)
        if stop is not None and stop():
            return now
        candidates = [t for t in (link.next_arrival(), a.get_timer(), b.get_timer()) if t is not None]
        step = now + tick_s
        if candidates:
            ticks = math.ceil((min(candidates) - start) / tick_s - 1e-9)
            step = max(step, start + ticks * tick_s)
        else:
            step = max(step, until + tick_s)
        now = step
    return now
