"""Loss-aware first hops (--latency-first): the cost formula, the smoothed loss, the hysteresis and the
feasibility rule, driven by recorded ping outcomes at the probe rate (no sleeping)."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Address

import pytest

from pytier.peers.path_cost import (
    DWELL_S,
    HOP_MS,
    PROBE_INTERVAL_S,
    Candidate,
    FirstHopChooser,
    LinkState,
    LossEstimate,
    candidates,
    link_cost,
)
from pytier.peers.route_table import RouteTable
from pytier.wire.messages import RoutePeerInfo

A, B, C, D = 1, 2, 3, 4
PROBES_PER_S = round(1 / PROBE_INTERVAL_S)


def info(peer_id: int) -> RoutePeerInfo:
    return RoutePeerInfo(peer_id=peer_id, version=1, ipv4_addr=IPv4Address(f"10.144.144.{peer_id}"))


def triangle() -> RouteTable:
    """A, B, C all directly connected: A's least-hop route to C is the direct link."""
    return RouteTable(A, None, [B, C], {B: info(B), C: info(C)}, {B: {A, C}, C: {A, B}})


def series(loss: float, seconds: int, rng: random.Random) -> list[list[bool]]:
    """Each second's ping outcomes (True: lost) on a link dropping `loss` of them, as nft numgen would."""
    return [[rng.random() < loss for _ in range(PROBES_PER_S)] for _ in range(seconds)]


class Run:
    """A's view of the triangle, pings at the probe rate on both links, the chooser asked every second."""

    def __init__(self, table: RouteTable, latency_ms: float = 0.5) -> None:
        self.table = table
        self.latency_ms = latency_ms
        self.loss = {B: LossEstimate(), C: LossEstimate()}
        self.chooser = FirstHopChooser()
        self.now = 0.0
        self.hops: list[int] = []  # A's first hop toward C after each second

    def step(self, lost_on_c: list[bool]) -> None:
        for lost in lost_on_c:
            self.loss[C].record(lost)
            self.loss[B].record(False)
        links = {p: LinkState(self.latency_ms, e.value) for p, e in self.loss.items()}
        dests = {p: c for p in self.table.reachable_peers() if (c := self.table.cost(p)) is not None}
        options = candidates(dests, links, {p: self.table.hops_from(p) for p in links})
        self.chooser.update(self.now, options)
        self.hops.append(self.chooser.first_hops()[C])
        self.now += 1.0

    def feed(self, seconds: list[list[bool]]) -> None:
        for outcomes in seconds:
            self.step(outcomes)


def switches(hops: list[int]) -> int:
    return sum(1 for x, y in itertools.pairwise(hops) if x != y)


def test_link_cost_formula() -> None:
    assert link_cost(10.0, 0.0) == 10.0 + HOP_MS
    assert link_cost(None, 0.0) == HOP_MS
    assert link_cost(10.0, 0.3) == pytest.approx(4 * (10.0 + HOP_MS))
    # 10 % loss on a direct link weighs as much as two clean links of the same latency.
    assert link_cost(10.0, 0.1) == pytest.approx(2 * link_cost(10.0, 0.0))
    assert link_cost(-3.0, 2.0) == link_cost(0.0, 1.0)


def test_loss_estimate_follows_recorded_outcomes() -> None:
    est = LossEstimate()
    for second in series(0.3, 60, random.Random(1)):
        for lost in second:
            est.record(lost)
    assert 0.2 < est.value < 0.4
    for _ in range(20 * PROBES_PER_S):
        est.record(False)
    assert est.value < 0.01


def test_lossy_direct_link_is_left_after_the_dwell_and_not_flapped_back() -> None:
    rng = random.Random(1687)
    run = Run(triangle())
    run.feed(series(0.0, 10, rng))
    assert set(run.hops) == {C}
    run.feed(series(0.3, 120, rng))
    lossy = run.hops[10:]
    moved_at = lossy.index(B)
    # The smoothed loss needs a few lost pings, then the challenger must stay cheaper for DWELL_S.
    assert DWELL_S <= moved_at <= 20
    assert set(lossy[moved_at:]) == {B}
    run.feed(series(0.0, 60, rng))
    clean = run.hops[130:]
    back_at = clean.index(C)
    assert DWELL_S <= back_at <= 20
    assert set(clean[back_at:]) == {C}
    assert switches(run.hops) == 2


def test_loss_hovering_near_break_even_does_not_flap() -> None:
    # Loss around the point where the direct link costs as much as two hops (10 %), and just inside
    # either edge of the hysteresis band: ten minutes each, whichever way the route points, it stays.
    for loss in (0.06, 0.10, 0.14):
        for seed in range(3):
            run = Run(triangle())
            run.feed(series(loss, 600, random.Random(seed)))
            assert switches(run.hops) <= 1, (loss, seed)


def test_a_second_of_total_loss_moves_nothing() -> None:
    run = Run(triangle())
    run.feed([[False] * PROBES_PER_S] * 10 + [[True] * PROBES_PER_S] + [[False] * PROBES_PER_S] * 30)
    assert set(run.hops) == {C}


def test_hop_count_breaks_cost_ties_and_clean_links_keep_least_hops() -> None:
    run = Run(triangle(), latency_ms=0.0)
    run.feed([[False] * PROBES_PER_S] * 30)
    assert set(run.hops) == {C}
    assert run.chooser.choice(C) == Candidate(C, HOP_MS, 1)
    assert run.chooser.choice(B) == Candidate(B, HOP_MS, 1)


def test_lost_first_hop_is_replaced_at_once() -> None:
    chooser = FirstHopChooser()
    chooser.update(0.0, {C: [Candidate(B, 10.0, 2), Candidate(C, 9.0, 1)]})
    assert chooser.first_hops() == {C: C}
    switched = chooser.update(1.0, {C: [Candidate(B, 10.0, 2)]})
    assert [(s.old.hop, s.new.hop) for s in switched] == [(C, B)]
    assert chooser.update(2.0, {}) == [] and chooser.first_hops() == {}


def test_challenger_must_stay_cheaper_without_interruption() -> None:
    chooser = FirstHopChooser(margin=0.25, dwell_s=3.0)
    direct, cheap, close = Candidate(C, 20.0, 1), Candidate(B, 10.0, 2), Candidate(B, 16.0, 2)
    chooser.update(0.0, {C: [direct, Candidate(B, 30.0, 2)]})
    for t in (1.0, 2.0, 3.0):
        chooser.update(t, {C: [direct, cheap]})
    chooser.update(3.5, {C: [direct, close]})  # only 20 % cheaper: the dwell starts over
    for t in (4.0, 5.0, 6.0):
        assert chooser.update(t, {C: [direct, cheap]}) == []
    assert chooser.first_hops() == {C: C}
    switched = chooser.update(7.0, {C: [direct, cheap]})
    assert [(s.old, s.new) for s in switched] == [(direct, cheap)]


def test_only_neighbours_no_farther_than_us_qualify() -> None:
    # A - B - D and A - C, C - B: B is one hop from D, C two (through B), A two.
    table = RouteTable(A, None, [B, C], {B: info(B), C: info(C), D: info(D)},
                       {B: {A, C, D}, C: {A, B}, D: {B}})
    assert table.hops_from(C) == {C: 0, A: 1, B: 1, D: 2}
    links = {B: LinkState(1.0, 0.9), C: LinkState(1.0, 0.0)}
    dests = {p: c for p in table.reachable_peers() if (c := table.cost(p)) is not None}
    options = candidates(dests, links, {p: table.hops_from(p) for p in links})
    # C is as far from D as A is, so it qualifies; a neighbour farther than A never would.
    assert {c.hop for c in options[D]} == {B, C}
    far = RouteTable(A, None, [B, C], {B: info(B), C: info(C), D: info(D)},
                     {B: {A, D}, C: {A}, D: {B}})
    far_dests = {p: c for p in far.reachable_peers() if (c := far.cost(p)) is not None}
    far_options = candidates(far_dests, links, {p: far.hops_from(p) for p in links})
    # C reaches D only back through A (3 hops > A's 2): sending there would loop.
    assert {c.hop for c in far_options[D]} == {B}
