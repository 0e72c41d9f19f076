"""A deterministic virtual-time model of a lossy link, for testing transports without a network.

Each direction is a bottleneck of `rate_bps` with a drop-tail queue that holds at most `queue_s` of
backlog, followed by random loss and a fixed one-way delay. Packets are opaque items with a size;
`overhead_bytes` is added to each one to stand for the UDP/IP/tunnel headers that also occupy the
bottleneck. Loss sits after the queue, so a saturated link delivers about rate x (1 - loss).

Time is whatever float clock the caller passes in (seconds); nothing here reads a real clock, and the
loss pattern depends only on the seed, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LinkParams:
    delay_s: float = 0.020
    rate_bps: float | None = 100e6  # None: no serialisation delay and no queue
    queue_s: float = 0.050  # drop-tail limit, as time needed to drain the backlog
    loss: float = 0.0  # probability that a packet leaving the queue is lost
    overhead_bytes: int = 88


@dataclass(slots=True)
class LinkStats:
    packets_in: int = 0
    bytes_in: int = 0
    dropped_queue: int = 0
    dropped_loss: int = 0
    packets_out: int = 0
    bytes_out: int = 0


@dataclass(slots=True)
class LinkDirection(Generic[T]):
    """One direction of a link. `send` then `deliver` items in FIFO order."""

    params: LinkParams
    rng: random.Random
    stats: LinkStats = field(default_factory=LinkStats)
    _busy_until: float = 0.0
    _in_flight: deque[tuple[float, T, int]] = field(default_factory=deque)

    def send(self, now: float, item: T, size: int) -> bool:
        """Offer an item of `size` bytes at time `now`; False when the queue or the loss drops it."""
        p = self.params
        self.stats.packets_in += 1
        self.stats.bytes_in += size
        if p.rate_bps is None:
            leaves = now
        else:
            start = max(now, self._busy_until)
            if start - now > p.queue_s:
                self.stats.dropped_queue += 1
                return False
            leaves = start + (size + p.overhead_bytes) * 8.0 / p.rate_bps
            self._busy_until = leaves
        if p.loss > 0.0 and self.rng.random() < p.loss:
            self.stats.dropped_loss += 1
            return False
        self._in_flight.append((leaves + p.delay_s, item, size))
        return True

    def next_arrival(self) -> float | None:
        return self._in_flight[0][0] if self._in_flight else None

    def deliver(self, now: float) -> list[T]:
        """Items whose arrival time is at or before `now`, oldest first."""
        out: list[T] = []
        q = self._in_flight
        while q and q[0][0] <= now:
            _, item, size = q.popleft()
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
