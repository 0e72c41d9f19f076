"""RouteTable: least-hop paths over advertised connections, and the address lookups built on them."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

from pytier.peers.route_table import RouteTable
from pytier.wire.messages import RoutePeerInfo

ME = 1


def info(
    peer_id: int, ipv4: str | None = None, cidrs: tuple[str, ...] = (), version: int = 1
) -> RoutePeerInfo:
    return RoutePeerInfo(
        peer_id=peer_id,
        ipv4_addr=IPv4Address(ipv4) if ipv4 else None,
        proxy_cidrs=list(cidrs),
        version=version,
    )


def table(
    neighbours: set[int],
    infos: list[RoutePeerInfo],
    conns: dict[int, set[int]],
    mine: str | None = "10.144.144.1/24",
) -> RouteTable:
    return RouteTable(
        ME, IPv4Interface(mine) if mine else None, neighbours, {i.peer_id: i for i in infos}, conns
    )


def test_paths_use_each_peers_own_connection_info() -> None:
    infos = [info(2), info(3), info(4), info(5)]
    # 2 says it reaches 3; 3 says it reaches 4. 5 claims a link to 4, but nobody says they reach 5.
    t = table({2}, infos, {2: {1, 3}, 3: {2, 4}, 5: {4}})
    assert {e.peer_id: (e.next_hop, e.cost) for e in t.routes()} == {2: (2, 1), 3: (2, 2), 4: (2, 3)}
    assert t.next_hop(5) is None
    assert t.reachable_peers() == {2, 3, 4}


def test_peer_without_info_is_no_transit_but_a_neighbour_always_is() -> None:
    t = table({2}, [info(4)], {2: {3}, 3: {4}})
    assert t.next_hop(2) == 2  # direct neighbour, info not yet received
    assert t.next_hop(3) is None and t.next_hop(4) is None
    assert t.routes() == []


def test_equal_cost_paths_pick_the_lowest_first_hop() -> None:
    infos = [info(p) for p in (2, 3, 9)]
    t = table({3, 2}, infos, {2: {9}, 3: {9}})
    assert t.next_hop(9) == 2 and t.cost(9) == 2


def test_exact_address_then_longest_proxied_prefix() -> None:
    infos = [
        info(2, "10.144.144.2", ("192.168.0.0/16", "0.0.0.0/0")),
        info(3, "10.144.144.3", ("192.168.7.0/24", "fd00::/64", "garbage")),
        info(4, "192.168.7.9"),
    ]
    t = table({2, 3, 4}, infos, {})
    assert t.peer_for_ipv4(IPv4Address("192.168.7.9")) == 4
    assert t.peer_for_ipv4(IPv4Address("192.168.7.10")) == 3
    assert t.peer_for_ipv4(IPv4Address("192.168.8.1")) == 2
    assert t.peer_for_ipv4(IPv4Address("8.8.8.8")) == 2
    assert t.peer_for_ipv4(IPv4Address("10.144.144.3")) == 3
    assert t.peer_for_ipv4(IPv4Address("10.144.144.77")) is None  # our subnet: exact only
    assert t.peer_for_ipv4(IPv4Address("10.144.144.1")) is None  # ourselves
    no_ip = table({2, 3, 4}, infos, {}, mine=None)
    assert no_ip.peer_for_ipv4(IPv4Address("10.144.144.77")) == 2


def test_same_prefix_goes_to_the_closer_then_lower_peer() -> None:
    infos = [
        info(2, cidrs=("172.16.0.0/12",)),
        info(3, cidrs=("172.16.0.0/12",)),
        info(4, cidrs=("172.16.0.0/12",)),
    ]
    t = table({3, 4}, infos, {3: {2}})
    assert t.peer_for_ipv4(IPv4Address("172.20.0.1")) == 3


def test_unreachable_peers_are_not_addressable() -> None:
    t = table({2}, [info(2, "10.144.144.2"), info(5, "10.144.144.5", ("192.168.5.0/24",))], {})
    assert t.peer_for_ipv4(IPv4Address("10.144.144.5")) is None
    assert t.peer_for_ipv4(IPv4Address("192.168.5.1")) is None


def test_duplicates_and_signature() -> None:
    infos = [info(2, "10.144.144.1"), info(3, "10.144.144.3"), info(4, "10.144.144.3")]
    t = table({2, 3, 4}, infos, {})
    assert t.duplicate_ipv4() == {
        IPv4Address("10.144.144.1"): (1, 2),
        IPv4Address("10.144.144.3"): (3, 4),
    }
    assert t.peer_for_ipv4(IPv4Address("10.144.144.3")) == 3
    bumped = table({2, 3, 4}, [*infos[:2], info(4, "10.144.144.3", version=2)], {})
    assert bumped.signature() != t.signature()
    assert table({2, 3, 4}, infos, {}).signature() == t.signature()
