"""--latency-first end to end: A's traffic to C leaves a 30 %-loss direct link for the clean two hops
through B, and comes back once the direct link is clean; C, without the flag, stays on the direct link
as EasyTier's default does. Real pytier-core processes in namespaces, loss by nft on A's ingress."""

from __future__ import annotations

from typing import Any

from pytier.testbed.netns import Testbed, nft_clear_loss, nft_input_loss
from pytier.testbed.nodes import PytierNode, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "lossy", "--network-secret", "s3"]
A_IP, B_IP, C_IP = "10.144.144.1", "10.144.144.2", "10.144.144.3"
PINGS = 30


def route_to(node: PytierNode, ipv4: str) -> dict[str, Any] | None:
    return next((r for r in node.cli("route") if r.get("ipv4") == ipv4), None)


def next_hop(node: PytierNode, ipv4: str) -> int | None:
    route = route_to(node, ipv4)
    return None if route is None else int(route["next_hop_peer_id"])


def forwarded(node: PytierNode) -> int:
    return int(node.cli("stats").get("fwd_packets", 0))


def test_traffic_leaves_a_lossy_direct_link_and_returns(testbed: Testbed) -> None:
    a, b, c = testbed.netns("a"), testbed.netns("b"), testbed.netns("c")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(b, c, "198.18.2.2/24", "198.18.2.3/24")
    direct = testbed.veth(a, c, "198.18.3.1/24", "198.18.3.3/24")
    udp = ["--listeners", "udp://0.0.0.0:11010"]
    na = PytierNode(testbed, a, [*NET, "--ipv4", f"{A_IP}/24", *udp, "--latency-first"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "--ipv4", f"{B_IP}/24", *udp, "--peers", "udp://198.18.1.1:11010"],
                    name="node-b").start()
    nc = PytierNode(testbed, c, [*NET, "--ipv4", f"{C_IP}/24", "--no-listener", "--peers",
                                 "udp://198.18.3.1:11010", "--peers", "udp://198.18.2.2:11010"],
                    name="node-c").start()
    b_id, c_id, a_id = (n.cli("node")["peer_id"] for n in (nb, nc, na))
    wait_for(lambda: next_hop(na, C_IP) == c_id and next_hop(nc, A_IP) == a_id and route_to(na, B_IP),
             20, "A and C to route to each other directly")

    nft_input_loss(a, direct.ifname_a, 30)
    wait_for(lambda: next_hop(na, C_IP) == b_id, 30, "A to send its traffic to C through B")
    route = route_to(na, C_IP)
    assert route is not None and route["cost"] == 2
    assert "traffic to peer" in na.log() and "now goes via" in na.log()
    # C has no --latency-first: least hops, so its own traffic to A keeps the lossy direct link.
    assert next_hop(nc, A_IP) == a_id

    before = forwarded(nb)
    result = ping(C_IP, count=PINGS, interval=0.05, timeout=1, netns=a)
    relayed = forwarded(nb) - before
    # Every request crossed B (A's link to B loses nothing); the replies came straight from C, so
    # some of them fell to the 30 % loss on A's side of the direct link.
    assert PINGS <= relayed < PINGS + PINGS // 2, relayed
    assert result.received > 0

    nft_clear_loss(a, direct.ifname_a)
    wait_for(lambda: next_hop(na, C_IP) == c_id, 30, "A to go back to the direct link to C")
    before = forwarded(nb)
    result = ping(C_IP, count=PINGS, interval=0.05, timeout=1, netns=a)
    assert forwarded(nb) - before < PINGS // 3
    assert result.received == PINGS
