"""Routes computed from what OSPF route sync learned: least-hop paths and address lookups.

A `RouteTable` is an immutable snapshot. As in EasyTier (§5.6), only peers we hold a RoutePeerInfo
for (plus our direct neighbours) are graph nodes; a peer's edges come from its own connection info;
virtual IPv4 addresses and proxied CIDRs map to reachable peers only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pytier.wire.messages import RoutePeerInfo


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """A reachable peer we have a RoutePeerInfo for; cost is the hop count."""

    peer_id: int
    info: RoutePeerInfo
    next_hop: int
    cost: int


class RouteTable:
    def __init__(
        self,
        my_peer_id: int,
        my_ipv4: IPv4Interface | None,
        neighbours: Iterable[int],
        infos: Mapping[int, RoutePeerInfo],
        conns: Mapping[int, Collection[int]],
    ) -> None:
        """`conns[p]` is the set of peers p says it is directly connected to."""
        self.my_peer_id = my_peer_id
        self.my_ipv4 = my_ipv4
        self._infos = dict(infos)
        self._neighbours = set(neighbours)
        self._conns = conns
        self._hops_from: dict[int, dict[int, int]] = {}
        hops, costs = _least_hop_paths(my_peer_id, self._neighbours, self._infos, conns)
        self._next_hop = hops
        self._cost = costs
        self._routes = [
            RouteEntry(peer_id, self._infos[peer_id], hops[peer_id], costs[peer_id])
            for peer_id in sorted(hops)
            if peer_id in self._infos
        ]
        self._claims = self._ipv4_claims()
        self._by_ipv4 = {
            addr: min(peers, key=lambda p: (costs[p], p))
            for addr, peers in self._claims.items()
            if my_peer_id not in peers
        }
        self._cidrs = self._cidr_index()

    # ---- queries --------------------------------------------------------------------------------

    def next_hop(self, peer_id: int) -> int | None:
        return self._next_hop.get(peer_id)

    def cost(self, peer_id: int) -> int | None:
        return self._cost.get(peer_id)

    def reachable_peers(self) -> set[int]:
        return set(self._next_hop)

    def hops_from(self, source: int) -> dict[int, int]:
        """Least-hop distance from `source` to every node it reaches in this graph (itself: 0)."""
        found = self._hops_from.get(source)
        if found is None:
            found = _hop_counts(source, self.my_peer_id, self._neighbours, self._infos, self._conns)
            self._hops_from[source] = found
        return found

    def routes(self) -> list[RouteEntry]:
        return list(self._routes)

    def peer_for_ipv4(self, addr: IPv4Address) -> int | None:
        """The peer owning `addr`, else (outside our own subnet) the longest proxied CIDR holding it."""
        peer = self._by_ipv4.get(addr)
        if peer is not None:
            return peer
        mine = self.my_ipv4
        if mine is not None and (addr == mine.ip or addr in mine.network):
            return None
        value = int(addr)
        for prefixlen, nets in self._cidrs:
            peer = nets.get(value >> (32 - prefixlen) if prefixlen else 0)
            if peer is not None:
                return peer
        return None

    def duplicate_ipv4(self) -> dict[IPv4Address, tuple[int, ...]]:
        """Addresses claimed by more than one reachable node (our own id included when we are one)."""
        return {addr: peers for addr, peers in self._claims.items() if len(peers) > 1}

    def signature(self) -> tuple[tuple[int, int, int, int], ...]:
        """Changes whenever a route, a hop count or a reachable peer's info version changes."""
        return tuple(
            (p, self._next_hop[p], self._cost[p], self._infos[p].version if p in self._infos else 0)
            for p in sorted(self._next_hop)
        )

    # ---- construction ---------------------------------------------------------------------------

    def _ipv4_claims(self) -> dict[IPv4Address, tuple[int, ...]]:
        claims: dict[IPv4Address, list[int]] = {}
        if self.my_ipv4 is not None:
            claims[self.my_ipv4.ip] = [self.my_peer_id]
        for entry in self._routes:
            addr = entry.info.ipv4_addr
            if addr is not None and not addr.is_unspecified:
                claims.setdefault(addr, []).append(entry.peer_id)
        return {addr: tuple(sorted(peers)) for addr, peers in claims.items()}

    def _cidr_index(self) -> list[tuple[int, dict[int, int]]]:
        """(prefix length, {network bits: peer}) from the longest prefix down."""
        best: dict[tuple[int, int], tuple[int, int]] = {}
        for entry in self._routes:
            for text in entry.info.proxy_cidrs:
                try:
                    net = IPv4Network(text, strict=False)
                except ValueError:
                    continue  # IPv6 or garbage from a peer: nothing to route here
                key = (
                    net.prefixlen,
                    int(net.network_address) >> (32 - net.prefixlen) if net.prefixlen else 0,
                )
                rank = (entry.cost, entry.peer_id)
                if key not in best or rank < best[key]:
                    best[key] = rank
        index: dict[int, dict[int, int]] = {}
        for (prefixlen, bits), (_cost, peer) in best.items():
            index.setdefault(prefixlen, {})[bits] = peer
        return sorted(index.items(), reverse=True)


def _least_hop_paths(
    me: int,
    neighbours: set[int],
    infos: Mapping[int, RoutePeerInfo],
    conns: Mapping[int, Collection[int]],
) -> tuple[dict[int, int], dict[int, int]]:
    """Breadth-first search from `me`: (next hop, hop count) per reachable peer.

    Among equally short paths the one through the lowest-id first hop wins, so every run agrees.
    """
    known = neighbours | set(infos)
    next_hop = {n: n for n in neighbours if n != me}
    cost = dict.fromkeys(next_hop, 1)
    frontier = sorted(next_hop)
    depth = 1
    while frontier:
        depth += 1
        reached: dict[int, int] = {}
        for node in frontier:
            hop = next_hop[node]
            for peer in conns.get(node, ()):
                if peer == me or peer in next_hop or peer not in known:
                    continue
                if peer not in reached or hop < reached[peer]:
                    reached[peer] = hop
        for peer, hop in reached.items():
            next_hop[peer] = hop
            cost[peer] = depth
        frontier = sorted(reached)
    return next_hop, cost


def _hop_counts(
    source: int,
    me: int,
    neighbours: set[int],
    infos: Mapping[int, RoutePeerInfo],
    conns: Mapping[int, Collection[int]],
) -> dict[int, int]:
    """Breadth-first hop counts from `source` over the same graph `_least_hop_paths` walks."""
    known = neighbours | set(infos) | {me}
    hops = {source: 0}
    frontier = [source]
    while frontier:
        reached = []
        for node in frontier:
            for peer in neighbours if node == me else conns.get(node, ()):
                if peer not in hops and peer in known:
                    hops[peer] = hops[node] + 1
                    reached.append(peer)
        frontier = reached
    return hops
