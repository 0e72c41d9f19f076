"""RouteService over PeerRpc: nodes wired in process, packets forwarded hop by hop by each node's routes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytier.peers.route import RouteService, RouteTimers
from pytier.peers.route_sync import OSPF_ROUTE_SERVICE
from pytier.peers.rpc import RPC_REQ, PeerRpc, RpcCallError, RpcCore
from pytier.wire.messages import (
    RpcErrorKind,
    RpcPacket,
    RpcRequest,
    RpcResponse,
    SyncRouteInfoRequest,
    SyncRouteInfoResponse,
)

NET = "pytier-route-test"
FAST = RouteTimers(
    tick_s=0.05,
    initiator_resync_s=0.5,
    rpc_timeout_s=0.5,
    retry_min_s=0.01,
    retry_max_s=0.2,
    refresh_s=60.0,
    info_ttl_s=120.0,
    unreachable_ttl_s=0.5,
    sweep_s=0.1,
    known_version_ttl_s=5.0,
)
MAX_FORWARD = 8


@dataclass
class Node:
    rpc: PeerRpc
    route: RouteService
    changes: int = 0
    conflicts: list[str] = field(default_factory=list)


class Mesh:
    """Direct links between nodes; a packet to a non-neighbour follows each hop's own next_hop()."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.links: set[frozenset[int]] = set()
        self.sent: list[tuple[int, int, int, bytes]] = []  # (origin, destination, packet type, payload)
        self.dropped = 0

    def add(self, peer_id: int, ipv4: str, hostname: str = "") -> Node:
        rpc = PeerRpc(peer_id, NET, self._sender(peer_id))
        route = RouteService(
            my_peer_id=peer_id,
            rpc=rpc,
            ipv4=IPv4Interface(ipv4),
            hostname=hostname or f"node-{peer_id}",
            timers=FAST,
        )
        node = Node(rpc, route)
        route.on_change = lambda: setattr(node, "changes", node.changes + 1)
        route.on_conflict = node.conflicts.append
        self.nodes[peer_id] = node
        return node

    def connect(self, a: int, b: int) -> None:
        self.links.add(frozenset((a, b)))
        self.nodes[a].route.peer_connected(b)
        self.nodes[b].route.peer_connected(a)

    def disconnect(self, a: int, b: int) -> None:
        self.links.discard(frozenset((a, b)))
        for x, y in ((a, b), (b, a)):
            if x in self.nodes:
                self.nodes[x].route.peer_disconnected(y)

    async def remove(self, peer_id: int) -> None:
        node = self.nodes.pop(peer_id)
        for link in [lk for lk in self.links if peer_id in lk]:
            (other,) = link - {peer_id}
            self.disconnect(peer_id, other)
        await node.route.close()
        node.rpc.close()

    def _hop(self, at: int, to: int) -> int | None:
        if frozenset((at, to)) in self.links:
            return to
        node = self.nodes.get(at)
        hop = node.route.next_hop(to) if node is not None else None
        return hop if hop is not None and frozenset((at, hop)) in self.links else None

    def _sender(self, origin: int) -> Callable[[int, int, bytes], bool]:
        def send(to_peer: int, packet_type: int, payload: bytes) -> bool:
            hop = self._hop(origin, to_peer)
            if hop is None:
                return False
            self.sent.append((origin, to_peer, packet_type, payload))
            asyncio.get_running_loop().call_soon(self._arrive, hop, origin, to_peer, packet_type, payload, 1)
            return True

        return send

    def _arrive(self, at: int, origin: int, to: int, packet_type: int, payload: bytes, hops: int) -> None:
        if at not in self.nodes:
            self.dropped += 1
            return
        if at == to:
            self.nodes[at].rpc.on_packet(origin, packet_type, payload)
            return
        nxt = self._hop(at, to)
        if nxt is None or hops >= MAX_FORWARD:
            self.dropped += 1
            return
        asyncio.get_running_loop().call_soon(self._arrive, nxt, origin, to, packet_type, payload, hops + 1)

    async def start(self) -> None:
        for node in self.nodes.values():
            await node.route.start()

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.route.close()
            node.rpc.close()

    def sync_requests(self) -> list[tuple[int, int, SyncRouteInfoRequest]]:
        """Every SyncRouteInfo request that was sent, reassembled from its pieces and decoded."""
        pieces: dict[tuple[int, int], dict[int, RpcPacket]] = {}
        order: list[tuple[int, int]] = []
        for origin, _to, packet_type, payload in self.sent:
            pkt = RpcPacket.decode(payload)
            if packet_type != RPC_REQ or pkt.descriptor is None:
                continue
            if pkt.descriptor.service_name != OSPF_ROUTE_SERVICE:
                continue
            key = (origin, pkt.transaction_id)
            if key not in pieces:
                order.append(key)
            pieces.setdefault(key, {})[pkt.piece_idx] = pkt
        out = []
        for key in order:
            got = pieces[key]
            first = got[0]
            body = b"".join(got[i].body for i in range(first.total_pieces))
            req = SyncRouteInfoRequest.decode(RpcRequest.decode(body).request)
            out.append((key[0], first.to_peer, req))
        return out


def check_wire_rules(mesh: Mesh) -> int:
    requests = mesh.sync_requests()
    for src, dst, req in requests:
        assert req.my_peer_id == src
        for info in req.peer_infos or []:
            assert info.peer_id != dst, f"{src} sent {dst} its own RoutePeerInfo"
            assert info.version >= 1
        if req.conn_bitmap is not None:
            n = len(req.conn_bitmap.peer_ids)
            assert len(req.conn_bitmap.bitmap) == math.ceil(n * n / 8)
    return len(requests)


async def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def views(mesh: Mesh) -> dict[int, dict[int, tuple[int, int]]]:
    return {p: {e.peer_id: (e.next_hop, e.cost) for e in n.route.routes()} for p, n in mesh.nodes.items()}


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


def test_line_of_four_converges_and_carries_rpc_across_relays() -> None:
    async def main() -> None:
        mesh = Mesh()
        a, b, c, d = 41, 12, 33, 24
        for i, peer_id in enumerate((a, b, c, d)):
            mesh.add(peer_id, f"10.144.144.{i + 1}/24")
        await mesh.start()
        mesh.connect(a, b)
        mesh.connect(b, c)
        mesh.connect(c, d)
        expected = {
            a: {b: (b, 1), c: (b, 2), d: (b, 3)},
            b: {a: (a, 1), c: (c, 1), d: (c, 2)},
            c: {a: (b, 2), b: (b, 1), d: (d, 1)},
            d: {a: (c, 3), b: (c, 2), c: (c, 1)},
        }
        await wait_until(lambda: views(mesh) == expected, "line convergence")
        assert mesh.nodes[a].route.peer_for_ipv4(IPv4Address("10.144.144.4")) == d
        info = mesh.nodes[a].route.peer_info(d)
        assert info is not None and info.hostname == f"node-{d}"
        assert all(node.changes > 0 for node in mesh.nodes.values())
        # An RPC from A to D travels A -> B -> C -> D and back by the learned routes.
        assert await mesh.nodes[a].rpc.call(d, "PeerCenterRpc", 1, b"") == b""
        assert check_wire_rules(mesh) > 0
        await mesh.close()

    run(main())


def test_ring_reconverges_after_link_loss_and_node_departure() -> None:
    async def main() -> None:
        mesh = Mesh()
        ids = [1, 2, 3, 4, 5]
        for peer_id in ids:
            mesh.add(peer_id, f"10.144.144.{peer_id}/24")
        await mesh.start()
        for x, y in zip(ids, ids[1:] + ids[:1], strict=True):
            mesh.connect(x, y)
        await wait_until(
            lambda: views(mesh)[1] == {2: (2, 1), 3: (2, 2), 4: (5, 2), 5: (5, 1)}, "ring convergence"
        )
        mesh.disconnect(1, 2)
        await wait_until(
            lambda: views(mesh)[1] == {5: (5, 1), 4: (5, 2), 3: (5, 3), 2: (5, 4)}, "detour around 1-2"
        )
        await wait_until(lambda: views(mesh)[2][1] == (3, 4), "reverse detour")
        await mesh.remove(4)
        await wait_until(lambda: views(mesh)[1] == {5: (5, 1)}, "routes through 4 gone at 1")
        await wait_until(lambda: views(mesh)[3] == {2: (2, 1)}, "routes through 4 gone at 3")
        for node in mesh.nodes.values():
            assert node.route.next_hop(4) is None
        # Unreachable entries expire after the (shrunken) 90 s.
        await wait_until(lambda: mesh.nodes[1].route.peer_info(3) is None, "expiry of unreachable 3 at 1")
        assert mesh.nodes[1].route.peer_info(4) is None
        mesh.connect(1, 3)
        await wait_until(lambda: views(mesh)[5] == {1: (1, 1), 3: (1, 2), 2: (1, 3)}, "healed partition at 5")
        check_wire_rules(mesh)
        await mesh.close()

    run(main())


def test_changed_info_propagates_and_duplicates_are_reported() -> None:
    async def main() -> None:
        mesh = Mesh()
        mesh.add(1, "10.144.144.1/24", hostname="alpha")
        mesh.add(2, "10.144.144.2/24", hostname="beta")
        mesh.add(3, "10.144.144.3/24", hostname="gamma")
        await mesh.start()
        mesh.connect(1, 2)
        mesh.connect(2, 3)
        await wait_until(
            lambda: mesh.nodes[1].route.peer_for_ipv4(IPv4Address("10.144.144.3")) == 3, "ip map"
        )
        mesh.nodes[3].route.set_my_info(proxy_cidrs=["192.168.50.0/24"])
        await wait_until(
            lambda: mesh.nodes[1].route.peer_for_ipv4(IPv4Address("192.168.50.7")) == 3, "proxied cidr"
        )
        mesh.nodes[3].route.set_my_info(ipv4=IPv4Interface("10.144.144.1/24"))
        await wait_until(lambda: bool(mesh.nodes[1].conflicts), "conflict at the address owner")
        await wait_until(lambda: bool(mesh.nodes[2].conflicts), "conflict at a bystander")
        message = mesh.nodes[1].conflicts[0]
        assert "10.144.144.1" in message and "peer 1" in message and "peer 3" in message
        assert "alpha" in message and "gamma" in message
        assert mesh.nodes[1].route.peer_for_ipv4(IPv4Address("10.144.144.3")) is None
        check_wire_rules(mesh)
        await mesh.close()

    run(main())


def test_neighbour_without_route_service_is_tolerated() -> None:
    async def main() -> None:
        mesh = Mesh()
        node = mesh.add(1, "10.144.144.1/24")
        bare = mesh.add(2, "10.144.144.2/24")
        await node.route.start()
        await bare.route.close()  # 2 answers every SyncRouteInfo with invalid_service
        mesh.connect(1, 2)
        await asyncio.sleep(0.5)
        assert node.route.next_hop(2) == 2
        assert node.route.routes() == []
        with pytest.raises(RpcCallError) as info:
            await node.rpc.call(2, OSPF_ROUTE_SERVICE, 1, b"")
        assert info.value.kind == RpcErrorKind.INVALID_SERVICE
        # Failures back off instead of hammering: far fewer calls than ticks x retries.
        assert len(mesh.sync_requests()) < 40
        await mesh.close()

    run(main())


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300))
def test_garbage_sync_requests_get_an_answer_and_never_raise(body: bytes) -> None:
    answers: list[bytes] = []
    rpc = PeerRpc(2, NET, lambda _to, _type, payload: answers.append(payload))
    RouteService(my_peer_id=2, rpc=rpc, ipv4=IPv4Interface("10.144.144.2/24"), timers=FAST)
    client = RpcCore(1, NET)
    _tx, packets = client.request(2, OSPF_ROUTE_SERVICE, 1, body, timeout_s=3, now=0)
    for out in packets:
        rpc.on_packet(1, out.packet_type, out.payload)
    assert len(answers) == 1
    resp = RpcResponse.decode(RpcPacket.decode(answers[0]).body)
    if resp.error is None:
        assert SyncRouteInfoResponse.decode(resp.response).error is None
    else:
        assert resp.error.kind == RpcErrorKind.PROST_DECODE_ERROR
