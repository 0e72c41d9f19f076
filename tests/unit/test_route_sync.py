"""OSPF route sync core: convergence, versions, sessions, wire-safety rules, conflicts and timers.

Cores are wired together in process by `CoreNet`, which carries each SyncRouteInfo request to its
destination core and the response back, with a fake clock.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytier.peers.route_sync import (
    ConflictDetected,
    MyInfo,
    RouteEvent,
    RoutesChanged,
    RouteSync,
    RouteTimers,
    conn_bitmap,
)
from pytier.wire.errors import WireError
from pytier.wire.messages import (
    PeerFeatureFlag,
    PeerIdVersion,
    RouteConnPeerList,
    RoutePeerInfo,
    SyncRouteInfoRequest,
    SyncRouteInfoResponse,
)
from pytier.wire.protobuf import Writer

# ---- simulator ------------------------------------------------------------------------------


@dataclass
class Exchange:
    src: int
    dst: int
    request: bytes
    response: bytes | None


@dataclass
class CoreNet:
    timers: RouteTimers = field(default_factory=RouteTimers)
    now: float = 1000.0
    seed: int = 7
    cores: dict[int, RouteSync] = field(default_factory=dict)
    links: set[frozenset[int]] = field(default_factory=set)
    exchanges: list[Exchange] = field(default_factory=list)
    events: dict[int, list[RouteEvent]] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)

    def add(
        self, peer_id: int, ipv4: str | None = None, hostname: str = "", proxy: tuple[str, ...] = ()
    ) -> RouteSync:
        info = MyInfo(IPv4Interface(ipv4) if ipv4 else None, proxy, hostname or f"host-{peer_id}")
        core = RouteSync(
            peer_id,
            info,
            now=self.now,
            wall_clock=lambda: 1_700_000_000.5,
            timers=self.timers,
            rng=random.Random(self.seed * 1_000_003 + peer_id),
        )
        self.cores[peer_id] = core
        self.events[peer_id] = []
        return core

    def connect(self, a: int, b: int) -> None:
        self.links.add(frozenset((a, b)))
        self.cores[a].peer_connected(b, self.now)
        self.cores[b].peer_connected(a, self.now)

    def disconnect(self, a: int, b: int) -> None:
        self.links.discard(frozenset((a, b)))
        self.cores[a].peer_disconnected(b, self.now)
        self.cores[b].peer_disconnected(a, self.now)

    def remove(self, peer_id: int) -> None:
        """The node goes away: every neighbour sees its links drop."""
        for link in [lk for lk in self.links if peer_id in lk]:
            (other,) = link - {peer_id}
            self.disconnect(peer_id, other)
        del self.cores[peer_id]

    def step(self) -> int:
        """Every core sends what it has due; returns how many requests went out."""
        sent = 0
        for src in sorted(self.cores):
            if src in self.stopped:
                continue
            core = self.cores[src]
            for out in core.poll(self.now):
                sent += 1
                dst_core = self.cores.get(out.peer_id)
                if (
                    frozenset((src, out.peer_id)) not in self.links
                    or dst_core is None
                    or out.peer_id in self.stopped
                ):
                    self.exchanges.append(Exchange(src, out.peer_id, out.request, None))
                    core.handle_sync_failure(out.peer_id, out.token, self.now)
                    continue
                response = dst_core.handle_sync_request(src, out.request, self.now)
                self.exchanges.append(Exchange(src, out.peer_id, out.request, response))
                core.handle_sync_response(out.peer_id, out.token, response, self.now)
        for peer_id, core in self.cores.items():
            self.events[peer_id] += core.pop_events()
        return sent

    def settle(self, max_rounds: int = 100) -> int:
        for rounds in range(max_rounds):
            if self.step() == 0:
                return rounds
        raise AssertionError("route sync did not settle")

    def advance(self, seconds: float, step_s: float | None = None, sweep: bool = True) -> None:
        """Let time pass in steps, syncing and sweeping as the shell would."""
        step_s = step_s or self.timers.tick_s
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step_s)
            self.step()
            if sweep:
                for core in self.cores.values():
                    core.sweep(self.now)

    def requests(self) -> list[tuple[int, int, SyncRouteInfoRequest]]:
        return [(e.src, e.dst, SyncRouteInfoRequest.decode(e.request)) for e in self.exchanges]

    def responses(self) -> list[SyncRouteInfoResponse]:
        return [SyncRouteInfoResponse.decode(e.response) for e in self.exchanges if e.response is not None]


def check_wire_rules(net: CoreNet) -> None:
    """The §5.9 rules, on every request that crossed the simulated network."""
    for src, dst, req in net.requests():
        assert req.my_peer_id == src
        for info in req.peer_infos or []:
            assert info.peer_id != dst, f"{src} sent {dst} its own RoutePeerInfo"
            assert info.version >= 1
        assert req.conn_peer_list is None
        if req.conn_bitmap is not None:
            n = len(req.conn_bitmap.peer_ids)
            assert len(req.conn_bitmap.bitmap) == math.ceil(n * n / 8)
    for resp in net.responses():
        assert resp.error is None


# ---- helpers ----------------------------------------------------------------------------------

SHORT = RouteTimers(
    tick_s=1.0,
    initiator_resync_s=10.0,
    rpc_timeout_s=3.0,
    retry_min_s=0.05,
    retry_max_s=5.0,
    refresh_s=100.0,
    info_ttl_s=150.0,
    unreachable_ttl_s=5.0,
    sweep_s=1.0,
    known_version_ttl_s=60.0,
)


def foreign_info(peer_id: int, version: int, ipv4: str | None = None, extra: bytes = b"") -> RoutePeerInfo:
    """A RoutePeerInfo as another implementation might send it, with fields this codec skips."""
    info = RoutePeerInfo(
        peer_id=peer_id,
        inst_id=bytes(range(16)),
        ipv4_addr=IPv4Address(ipv4) if ipv4 else None,
        hostname=f"foreign-{peer_id}",
        version=version,
        easytier_version="2.6.4-81487c36",
        peer_route_id=0xABCDEF,
        network_length=24,
    )
    return RoutePeerInfo.decode(info.encode_fields() + extra)


def _unknown_fields() -> bytes:
    """ipv6_addr (15) and groups (16): real nodes send them, this codec skips them, relays must keep them."""
    addr = Writer()
    addr.uint32(1, 0xFE800000)
    addr.uint32(4, 1)
    inet = Writer()
    inet.message(1, addr.getvalue())
    inet.uint32(2, 64)
    group = Writer()
    group.string(1, "admin")
    group.bytes_(2, b"\x01\x02")
    w = Writer()
    w.message(15, inet.getvalue())
    w.message(16, group.getvalue())
    return w.getvalue()


UNKNOWN_FIELDS = _unknown_fields()


def sync_request(
    sender: int,
    session_id: int,
    infos: list[RoutePeerInfo] | None = None,
    conn: dict[int, tuple[int, set[int]]] | None = None,
    peer_list: bool = False,
) -> bytes:
    req = SyncRouteInfoRequest(my_peer_id=sender, my_session_id=session_id, peer_infos=infos)
    if conn is not None:
        if peer_list:
            req.conn_peer_list = RouteConnPeerList(
                [(PeerIdVersion(p, v), sorted(peers)) for p, (v, peers) in conn.items()]
            )
        else:
            req.conn_bitmap = conn_bitmap({p: (v, frozenset(peers)) for p, (v, peers) in conn.items()})
    return req.encode()


def route_view(core: RouteSync) -> dict[int, tuple[int, int]]:
    return {e.peer_id: (e.next_hop, e.cost) for e in core.routes()}


def line(net: CoreNet, ids: list[int]) -> None:
    for i, peer_id in enumerate(ids):
        net.add(peer_id, f"10.144.144.{i + 1}/24")
    for a, b in itertools.pairwise(ids):
        net.connect(a, b)


def conflicts(net: CoreNet, peer_id: int) -> list[str]:
    return [e.message for e in net.events[peer_id] if isinstance(e, ConflictDetected)]


# ---- convergence ------------------------------------------------------------------------------


def test_line_converges_with_next_hops_and_costs() -> None:
    net = CoreNet()
    a, b, c, d = 4004, 1001, 3003, 2002  # ids deliberately out of line order
    line(net, [a, b, c, d])
    net.settle()
    assert route_view(net.cores[a]) == {b: (b, 1), c: (b, 2), d: (b, 3)}
    assert route_view(net.cores[b]) == {a: (a, 1), c: (c, 1), d: (c, 2)}
    assert route_view(net.cores[d]) == {a: (c, 3), b: (c, 2), c: (c, 1)}
    for peer_id, core in net.cores.items():
        assert core.reachable_peers() == set(net.cores) - {peer_id}
        info = core.peer_info(a)
        assert info is not None and info.hostname == f"host-{a}"
    assert net.cores[a].peer_for_ipv4(IPv4Address("10.144.144.4")) == d
    assert net.cores[d].peer_for_ipv4(IPv4Address("10.144.144.1")) == a
    assert net.cores[a].peer_for_ipv4(IPv4Address("10.144.144.99")) is None
    assert all(isinstance(e, RoutesChanged) for events in net.events.values() for e in events)
    check_wire_rules(net)


def test_quiet_network_sends_only_the_initiators_resync() -> None:
    net = CoreNet()
    line(net, [1, 2, 3])
    net.settle()
    net.exchanges.clear()
    net.advance(9.0)
    assert net.exchanges == []
    net.advance(1.0)
    sent = [(src, dst, r.is_initiator, r.peer_infos, r.conn_bitmap) for src, dst, r in net.requests()]
    # Node 2's neighbours are 1 and 3; it initiates toward the lowest id only.
    assert sorted(sent) == [(1, 2, True, None, None), (2, 1, True, None, None), (3, 2, True, None, None)]
    assert [r.is_initiator for r in net.responses()] == [True, True, False]


def test_initiator_is_exactly_the_lowest_neighbour() -> None:
    net = CoreNet()
    for peer_id in (50, 9, 30, 70):
        net.add(peer_id)
    for other in (9, 30, 70):
        net.connect(50, other)
    core = net.cores[50]
    assert [p for p in (9, 30, 70) if core.is_initiator(p)] == [9]
    net.disconnect(50, 9)
    assert [p for p in (30, 70) if core.is_initiator(p)] == [30]
    net.settle()
    flags = {(src, dst): r.is_initiator for src, dst, r in net.requests() if src == 50}
    assert flags[(50, 30)] is True and flags[(50, 70)] is False


def test_ring_reroutes_when_a_node_leaves_and_partitions_expire() -> None:
    net = CoreNet(timers=SHORT)
    ids = [1, 2, 3, 4, 5, 6]
    line(net, ids)
    net.connect(6, 1)
    net.settle()
    assert route_view(net.cores[1]) == {2: (2, 1), 3: (2, 2), 4: (2, 3), 5: (6, 2), 6: (6, 1)}
    net.remove(4)
    net.settle()
    assert route_view(net.cores[3]) == {2: (2, 1), 1: (2, 2), 6: (2, 3), 5: (2, 4)}
    assert route_view(net.cores[5]) == {6: (6, 1), 1: (6, 2), 2: (6, 3), 3: (6, 4)}
    for core in net.cores.values():
        assert core.next_hop(4) is None
        assert core.peer_for_ipv4(IPv4Address("10.144.144.4")) is None
        assert core.peer_info(4) is not None  # kept until the unreachable timeout
    net.disconnect(1, 2)
    net.settle()
    assert route_view(net.cores[1]) == {5: (6, 2), 6: (6, 1)}
    assert route_view(net.cores[2]) == {3: (3, 1)}
    net.advance(SHORT.unreachable_ttl_s + 1)
    assert net.cores[1].peer_info(2) is None and net.cores[1].peer_info(4) is None
    assert net.cores[2].peer_info(1) is None and net.cores[2].peer_info(5) is None
    # Healing the partition brings everything back, over the only remaining paths.
    net.connect(1, 2)
    net.settle()
    assert route_view(net.cores[3]) == {2: (2, 1), 1: (2, 2), 6: (2, 3), 5: (2, 4)}
    check_wire_rules(net)


def test_entries_survive_long_runs_through_hourly_reversioning() -> None:
    net = CoreNet(timers=SHORT)
    line(net, [1, 2, 3])
    net.settle()
    v1 = net.cores[3].my_version
    net.advance(3 * SHORT.info_ttl_s, step_s=5.0)
    assert net.cores[3].my_version >= v1 + 4
    info = net.cores[1].peer_info(3)
    assert info is not None and info.version == net.cores[3].my_version
    assert set(route_view(net.cores[1])) == {2, 3}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_topologies_converge_to_shortest_paths(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 7))
    ids = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    extra = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=8))
    net = CoreNet(seed=data.draw(st.integers(0, 1000)))
    for peer_id in ids:
        net.add(peer_id)
    edges = {frozenset((ids[i], ids[data.draw(st.integers(0, i - 1))])) for i in range(1, n)}
    edges |= {frozenset((ids[i], ids[j])) for i, j in extra if i != j}
    for edge in edges:
        net.connect(*sorted(edge))
    net.settle()
    adjacency: dict[int, set[int]] = {p: set() for p in ids}
    for edge in edges:
        x, y = tuple(edge)
        adjacency[x].add(y)
        adjacency[y].add(x)
    for src in ids:
        dist = {src: 0}
        queue = [src]
        for node in queue:
            for nxt in adjacency[node]:
                if nxt not in dist:
                    dist[nxt] = dist[node] + 1
                    queue.append(nxt)
        view = route_view(net.cores[src])
        assert {p: cost for p, (_hop, cost) in view.items()} == {p: d for p, d in dist.items() if p != src}
        for dst, (hop, cost) in view.items():
            assert hop in adjacency[src]
            assert cost == 1 or net.cores[hop].table.cost(dst) == cost - 1
    check_wire_rules(net)


# ---- versions, sessions, raw relay --------------------------------------------------------------


def test_older_version_never_overwrites_newer() -> None:
    net = CoreNet()
    core = net.add(1)
    core.peer_connected(99, net.now)
    conn = {99: (1, {1, 7})}
    core.handle_sync_request(99, sync_request(99, 5, [foreign_info(7, 3, "10.144.144.7")], conn), net.now)
    core.handle_sync_request(99, sync_request(99, 5, [foreign_info(7, 2, "10.144.144.8")]), net.now)
    info = core.peer_info(7)
    assert info is not None and info.version == 3 and str(info.ipv4_addr) == "10.144.144.7"
    core.handle_sync_request(99, sync_request(99, 5, [foreign_info(7, 3, "10.144.144.9")]), net.now)
    assert core.peer_for_ipv4(IPv4Address("10.144.144.7")) == 7
    core.handle_sync_request(99, sync_request(99, 5, [foreign_info(7, 4, "10.144.144.9")]), net.now)
    assert core.peer_for_ipv4(IPv4Address("10.144.144.9")) == 7
    assert core.peer_for_ipv4(IPv4Address("10.144.144.7")) is None
    # Older conn info does not overwrite newer either.
    core.handle_sync_request(99, sync_request(99, 5, None, {99: (0, set())}), net.now)
    core.handle_sync_request(99, sync_request(99, 5, None, {99: (1, set())}), net.now)
    assert core.next_hop(7) == 99


def test_version_zero_and_bad_ids_are_ignored() -> None:
    core = CoreNet().add(1)
    core.peer_connected(99, 0)
    core.handle_sync_request(99, sync_request(99, 5, [foreign_info(7, 0), foreign_info(0, 4)]), 0)
    assert core.peer_info(7) is None and core.peer_info(0) is None


def test_relayed_infos_are_byte_identical_and_never_returned_to_their_owner() -> None:
    net = CoreNet()
    line(net, [1, 2, 3])
    net.settle()
    foreign = 77
    original = foreign_info(foreign, 5, "10.144.144.77", UNKNOWN_FIELDS)
    assert original.raw.endswith(UNKNOWN_FIELDS)
    # The foreign node is a direct neighbour of 3 (its requests arrive by hand; it answers nothing).
    net.links.add(frozenset((3, foreign)))
    net.cores[3].peer_connected(foreign, net.now)
    net.cores[3].handle_sync_request(
        foreign, sync_request(foreign, 42, [original], {foreign: (1, {3})}), net.now
    )
    net.step()
    net.settle()
    info_at_1 = net.cores[1].peer_info(foreign)
    assert info_at_1 is not None and info_at_1.raw == original.raw
    assert net.cores[1].next_hop(foreign) == 2
    relayed = [
        info.raw
        for src, dst, req in net.requests()
        for info in req.peer_infos or []
        if info.peer_id == foreign
    ]
    assert relayed and all(raw == original.raw for raw in relayed)
    to_foreign = [req for src, dst, req in net.requests() if dst == foreign]
    assert to_foreign  # 3 did try to sync with it...
    check_wire_rules(net)  # ...and never sent it its own entry


def test_new_session_id_makes_us_resend_everything() -> None:
    net = CoreNet()
    line(net, [1, 2, 3])
    net.settle()
    core = net.cores[1]
    assert core.poll(net.now) == []
    # Node 2 starts over (a new session id in its next request): it may have forgotten everything.
    core.handle_sync_request(2, sync_request(2, 123456789), net.now)
    (out,) = core.poll(net.now)
    req = SyncRouteInfoRequest.decode(out.request)
    assert sorted(i.peer_id for i in req.peer_infos or []) == [1, 3]
    assert req.conn_bitmap is not None


def test_reconnect_uses_a_new_session_and_resyncs() -> None:
    net = CoreNet()
    line(net, [1, 2])
    net.settle()
    session_ids = {r.my_session_id for src, _dst, r in net.requests() if src == 1}
    net.disconnect(1, 2)
    net.exchanges.clear()
    net.connect(1, 2)
    net.settle()
    reqs = [r for src, _dst, r in net.requests() if src == 1]
    assert reqs and {r.my_session_id for r in reqs}.isdisjoint(session_ids)
    assert reqs[0].peer_infos is not None and reqs[0].peer_infos[0].peer_id == 1


def test_peer_list_conn_info_is_understood() -> None:
    core = CoreNet().add(1)
    core.peer_connected(99, 0)
    infos = [foreign_info(99, 1, "10.144.144.99"), foreign_info(7, 1, "10.144.144.7")]
    conn = {99: (3, {1, 7}), 7: (2, {99})}
    core.handle_sync_request(99, sync_request(99, 5, infos, conn, peer_list=True), 0)
    assert route_view(core) == {99: (99, 1), 7: (99, 2)}


def test_sent_conn_bitmap_describes_our_links() -> None:
    net = CoreNet()
    for peer_id in (1, 2, 3, 4):
        net.add(peer_id)
    net.connect(1, 2)
    net.connect(1, 3)
    net.connect(3, 4)
    net.settle()
    first_from_1 = next(r for src, dst, r in net.requests() if src == 1 and dst == 2)
    assert first_from_1.conn_bitmap is not None
    edges = first_from_1.conn_bitmap.edges()
    assert {(1, 2), (1, 3)} <= edges
    versions = {pv.peer_id: pv.version for pv in first_from_1.conn_bitmap.peer_ids}
    assert versions[1] >= 1 and versions[2] == 0  # the destination's own row is never claimed
    check_wire_rules(net)


# ---- conflicts ----------------------------------------------------------------------------------


def test_duplicate_virtual_ipv4_is_reported_once_naming_both() -> None:
    net = CoreNet()
    net.add(1, "10.144.144.1/24", hostname="alpha")
    net.add(2, "10.144.144.2/24", hostname="beta")
    net.add(3, "10.144.144.1/24", hostname="gamma")
    net.connect(1, 2)
    net.connect(2, 3)
    net.settle()
    at_1 = conflicts(net, 1)
    assert len(at_1) == 1
    assert "10.144.144.1" in at_1[0] and "peer 1" in at_1[0] and "peer 3" in at_1[0]
    assert "'alpha'" in at_1[0] and "'gamma'" in at_1[0]
    at_2 = conflicts(net, 2)
    assert len(at_2) == 1 and "'alpha'" in at_2[0] and "'gamma'" in at_2[0]
    # A bystander still routes the address somewhere deterministic; the owner keeps its own.
    assert net.cores[2].peer_for_ipv4(IPv4Address("10.144.144.1")) == 1
    assert net.cores[1].peer_for_ipv4(IPv4Address("10.144.144.1")) is None
    net.advance(30)
    assert len(conflicts(net, 1)) == 1
    # Fixing it and breaking it again reports again.
    net.cores[3].set_my_info(MyInfo(IPv4Interface("10.144.144.3/24"), hostname="gamma"), net.now)
    net.settle()
    net.cores[3].set_my_info(MyInfo(IPv4Interface("10.144.144.1/24"), hostname="gamma"), net.now)
    net.settle()
    assert len(conflicts(net, 1)) == 2


def test_foreign_entry_for_our_own_peer_id_is_refused_and_reported() -> None:
    core = CoreNet().add(1, "10.144.144.1/24")
    core.peer_connected(99, 0)
    impostor = foreign_info(1, 50, "10.144.144.200")
    core.handle_sync_request(99, sync_request(99, 5, [impostor]), 0)
    events = core.pop_events()
    assert any(isinstance(e, ConflictDetected) and "duplicated" in e.message for e in events)
    assert core.peer_info(1) is core.my_route_peer_info()
    assert core.my_version == 1
    (out,) = core.poll(0)
    sent = SyncRouteInfoRequest.decode(out.request).peer_infos or []
    assert [(i.peer_id, i.peer_route_id) for i in sent] == [(1, core.peer_route_id)]


def test_duplicate_peer_id_refusal_is_reported_and_retried() -> None:
    core = CoreNet().add(1)
    core.peer_connected(2, 0)
    (out,) = core.poll(0)
    core.handle_sync_response(2, out.token, SyncRouteInfoResponse(False, 9, error=0).encode(), 0)
    assert any(isinstance(e, ConflictDetected) for e in core.pop_events())
    assert core.next_retry(0) == pytest.approx(0.05)


def test_responses_never_carry_an_error() -> None:
    core = CoreNet().add(1)
    raw = core.handle_sync_request(2, sync_request(2, 5), 0)
    assert SyncRouteInfoResponse.decode(raw).error is None
    assert b"\x18" not in raw[:1]  # field 3 never present


# ---- timers -------------------------------------------------------------------------------------


def test_failed_syncs_back_off_from_50ms_to_5s() -> None:
    net = CoreNet()
    net.add(1)
    net.add(2)
    net.connect(1, 2)
    net.stopped.add(2)
    core = net.cores[1]
    delays = []
    for _ in range(10):
        (out,) = core.poll(net.now)
        core.handle_sync_failure(2, out.token, net.now)
        retry = core.next_retry(net.now)
        assert retry is not None
        delays.append(round(retry - net.now, 3))
        assert core.poll(net.now) == []
        net.now = retry
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    (out,) = core.poll(net.now)
    resp = net.cores[2].handle_sync_request(1, out.request, net.now)
    core.handle_sync_response(2, out.token, resp, net.now)
    assert core.next_retry(net.now) is None


def test_stale_answers_are_ignored() -> None:
    core = CoreNet().add(1)
    core.peer_connected(2, 0)
    (out,) = core.poll(0)
    core.peer_disconnected(2, 0)
    core.peer_connected(2, 0)
    core.handle_sync_response(2, out.token, SyncRouteInfoResponse(False, 9).encode(), 0)
    (again,) = core.poll(0)  # the new session still has everything to send
    assert again.token != out.token


def test_unrefreshed_entry_expires_even_when_reachable() -> None:
    net = CoreNet(timers=SHORT)
    core = net.add(1)
    core.peer_connected(99, net.now)
    infos = [foreign_info(99, 1), foreign_info(7, 1, "10.144.144.7")]
    core.handle_sync_request(99, sync_request(99, 5, infos, {99: (1, {1, 7})}), net.now)
    assert core.next_hop(7) == 99
    core.sweep(net.now + SHORT.info_ttl_s - 1)
    assert core.peer_info(7) is not None
    core.sweep(net.now + SHORT.info_ttl_s)
    assert core.peer_info(7) is None and core.next_hop(7) is None
    assert core.next_hop(99) == 99  # still a direct neighbour


def test_own_version_bumps_on_change_and_on_refresh() -> None:
    core = CoreNet(timers=SHORT).add(1, "10.144.144.1/24", hostname="h")
    assert core.my_version == 1
    same = MyInfo(IPv4Interface("10.144.144.1/24"), (), "h")
    core.set_my_info(same, 10)
    assert core.my_version == 1
    core.set_my_info(MyInfo(IPv4Interface("10.144.144.1/24"), ("192.168.7.0/24",), "h"), 20)
    assert core.my_version == 2
    flags = PeerFeatureFlag(kcp_input=True)
    core.set_my_info(MyInfo(IPv4Interface("10.144.144.1/24"), ("192.168.7.0/24",), "h", flags), 30)
    assert core.my_version == 3
    flags.quic_input = True  # the caller's object is copied, not aliased
    assert core.my_route_peer_info().feature_flag.names() == ["kcp_input"]
    core.poll(30 + SHORT.refresh_s - 1)
    assert core.my_version == 3
    core.poll(30 + SHORT.refresh_s)
    assert core.my_version == 4
    mine = core.my_route_peer_info()
    assert RoutePeerInfo.decode(mine.encode()) == mine
    assert (mine.peer_id, str(mine.ipv4_addr), mine.network_length, mine.hostname) == (
        1,
        "10.144.144.1",
        24,
        "h",
    )
    assert mine.easytier_version.startswith("pytier-")
    assert mine.peer_route_id != 0 and mine.inst_id != bytes(16)
    assert mine.last_update == (1_700_000_000, 500_000_000)
    with pytest.raises(ValueError):
        core.set_my_info(MyInfo(None, ("not-a-cidr",)), 40)


def test_proxy_cidrs_route_outside_our_subnet() -> None:
    net = CoreNet()
    net.add(1, "10.144.144.1/24")
    net.add(2, "10.144.144.2/24", proxy=("192.168.7.0/24", "10.144.144.128/25"))
    net.add(3, "10.144.144.3/24", proxy=("192.168.0.0/16",))
    net.connect(1, 2)
    net.connect(2, 3)
    net.settle()
    core = net.cores[1]
    assert core.peer_for_ipv4(IPv4Address("192.168.7.9")) == 2
    assert core.peer_for_ipv4(IPv4Address("192.168.8.9")) == 3
    assert core.peer_for_ipv4(IPv4Address("10.144.144.200")) is None  # inside our own subnet
    assert core.peer_for_ipv4(IPv4Address("172.16.0.1")) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_sync_request_decoder_only_raises_wire_error(data: bytes) -> None:
    core = CoreNet().add(1)
    core.peer_connected(2, 0)
    try:
        response = core.handle_sync_request(2, data, 0)
    except WireError:
        return
    assert SyncRouteInfoResponse.decode(response).error is None
    core.poll(0)
