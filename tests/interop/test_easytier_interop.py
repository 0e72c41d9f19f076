"""pytier against the real EasyTier core (PyPI easytier-pyo3), over UDP and TCP tunnels.

Every node here is a real process in a namespace of its own: pytier-core on one side, the EasyTier
core through the runner on the other. What is asserted is what the two really did with each other:
ICMP that crossed both TUN devices, bytes whose sha256 survived the trip, and the rows each node's
own management view shows.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import EasyTierNode, PytierNode, route_ipv4, tcp_transfer, wait_for
from pytier.testbed.ping import ping

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

SCHEMES = ["udp", "tcp"]
NETWORK, SECRET = "interop", "s3cret"
TRANSFER = 20 * 1024 * 1024
PORT = 11010


def pytier(tb: Testbed, ns: Netns, ip: str, name: str, *, listen: str | None = None,
           peers: tuple[str, ...] = (), secret: str = SECRET) -> PytierNode:
    args = ["--network-name", NETWORK, "--network-secret", secret, "--ipv4", f"{ip}/24"]
    args += ["--listeners", listen] if listen else ["--no-listener"]
    for uri in peers:
        args += ["--peers", uri]
    return PytierNode(tb, ns, args, name=name).start()


def easytier(tb: Testbed, ns: Netns, ip: str, name: str, *, listen: str | None = None,
             peers: tuple[str, ...] = (), secret: str = SECRET) -> EasyTierNode:
    return EasyTierNode(tb, ns, name=name, ipv4=ip, listeners=[listen] if listen else [],
                        peers=list(peers), network_name=NETWORK, network_secret=secret).start()


def pair(tb: Testbed) -> tuple[Netns, Netns]:
    a, b = tb.netns("a"), tb.netns("b")
    tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    return a, b


def line(tb: Testbed) -> tuple[Netns, Netns, Netns]:
    """A - B - C: only B reaches both underlays; A and C meet only through B's relaying."""
    a, b, c = tb.netns("a"), tb.netns("b"), tb.netns("c")
    tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    tb.veth(b, c, "198.18.2.2/24", "198.18.2.3/24")
    return a, b, c


def listen_url(scheme: str) -> str:
    return f"{scheme}://0.0.0.0:{PORT}"


def errors_logged(py: PytierNode) -> list[str]:
    return [ln for ln in py.log().splitlines()
            if re.match(r"\S+ \S+ (ERROR|CRITICAL) ", ln) or "Traceback" in ln]


def set_flags(route: dict[str, Any]) -> set[str]:
    return {name for name, on in (route.get("feature_flag") or {}).items() if on}


def assert_pings(src: Netns, dst_ip: str) -> None:
    result = ping(dst_ip, count=4, interval=0.2, timeout=2, netns=src)
    assert result.received >= 3, f"ping {dst_ip}: {result}"


def assert_transfer(tb: Testbed, server: Netns, client: Netns, server_ip: str) -> None:
    sent, sha_sent, sha_received, _took = tcp_transfer(tb, server, client, server_ip, TRANSFER, timeout=60)
    assert sent == TRANSFER
    assert sha_received == sha_sent


def assert_pytier_seen_by_easytier(et: EasyTierNode, py: PytierNode, ip: str, cost: int) -> None:
    route = et.wait_route(ip, timeout=20)
    node = py.cli("node")
    assert route["peer_id"] == node["peer_id"]
    assert route_ipv4(route) == ip and route["ipv4_addr"]["network_length"] == 24
    assert route["hostname"] == py.name
    assert route["version"] == node["version"]
    assert route["cost"] == cost
    # The flags the real node decoded are exactly the ones pytier advertises, no more, no fewer.
    assert set_flags(route) == set(node["features"])


def pytier_route(py: PytierNode, ip: str) -> dict[str, Any]:
    py.wait_route(ip, timeout=20)
    return next(r for r in py.cli("route") if r["ipv4"] == ip)


def wait_easytier_route(et: EasyTierNode, ip: str, cost: int) -> dict[str, Any]:
    """Routes settle hop by hop: wait for the final cost, not only for the address."""
    return dict(wait_for(lambda: (r := et.route_for(ip)) is not None and r["cost"] == cost and r, 20,
                         f"EasyTier {et.name} to reach {ip} at cost {cost}", interval=0.5))


# ---- one pytier node and one EasyTier node ------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("listener", ["easytier", "pytier"])
def test_pair_ping_transfer_and_routes(testbed: Testbed, scheme: str, listener: str) -> None:
    a, b = pair(testbed)
    if listener == "easytier":
        et = easytier(testbed, a, "10.144.144.1", "et-a", listen=listen_url(scheme))
        py = pytier(testbed, b, "10.144.144.2", "py-b", peers=(f"{scheme}://198.18.1.1:{PORT}",))
    else:
        py = pytier(testbed, b, "10.144.144.2", "py-b", listen=listen_url(scheme))
        et = easytier(testbed, a, "10.144.144.1", "et-a", peers=(f"{scheme}://198.18.1.2:{PORT}",))

    assert_pytier_seen_by_easytier(et, py, "10.144.144.2", cost=1)
    seen = pytier_route(py, "10.144.144.1")
    assert seen["peer_id"] == et.peer_id and seen["cost"] == 1 and seen["hostname"] == "et-a"
    assert {"kcp_input", "quic_input", "support_conn_list_sync"} <= set(seen["features"])

    [peer] = et.query("peers")
    assert peer["peer_id"] == py.cli("node")["peer_id"]
    assert [c["tunnel"]["tunnel_type"] for c in peer["conns"]] == [scheme]
    [conn] = py.cli("peer")
    assert conn["peer_id"] == et.peer_id and conn["tunnel"] == scheme

    assert_pings(b, "10.144.144.1")
    assert_pings(a, "10.144.144.2")
    assert_transfer(testbed, a, b, "10.144.144.1")
    assert_transfer(testbed, b, a, "10.144.144.2")
    assert errors_logged(py) == []
    assert et.query("latest_error") is None


# ---- three nodes in a line, mixed -------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_line_pytier_easytier_pytier(testbed: Testbed, scheme: str) -> None:
    a, b, c = line(testbed)
    # A connects out to B; B connects out to C: both admission directions on the same relay.
    pc = pytier(testbed, c, "10.144.144.3", "py-c", listen=listen_url(scheme))
    et = easytier(testbed, b, "10.144.144.2", "et-b", listen=listen_url(scheme),
                  peers=(f"{scheme}://198.18.2.3:{PORT}",))
    pa = pytier(testbed, a, "10.144.144.1", "py-a", peers=(f"{scheme}://198.18.1.2:{PORT}",))

    wait_for(lambda: pytier_route(pa, "10.144.144.3")["cost"] == 2, 10, "A's route to C at cost 2")
    far_a, far_c = pytier_route(pa, "10.144.144.3"), pytier_route(pc, "10.144.144.1")
    assert far_a["cost"] == 2 and far_a["next_hop_peer_id"] == et.peer_id
    assert far_c["cost"] == 2 and far_c["next_hop_peer_id"] == et.peer_id
    assert_pytier_seen_by_easytier(et, pa, "10.144.144.1", cost=1)
    assert_pytier_seen_by_easytier(et, pc, "10.144.144.3", cost=1)

    assert_pings(a, "10.144.144.3")
    assert_pings(c, "10.144.144.1")
    assert_transfer(testbed, c, a, "10.144.144.3")
    assert et.query("latest_error") is None
    assert {p["peer_id"] for p in et.query("peers")} == {pa.cli("node")["peer_id"], pc.cli("node")["peer_id"]}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_line_easytier_pytier_easytier(testbed: Testbed, scheme: str) -> None:
    a, b, c = line(testbed)
    ec = easytier(testbed, c, "10.144.144.3", "et-c", listen=listen_url(scheme))
    pb = pytier(testbed, b, "10.144.144.2", "py-b", listen=listen_url(scheme),
                peers=(f"{scheme}://198.18.2.3:{PORT}",))
    ea = easytier(testbed, a, "10.144.144.1", "et-a", peers=(f"{scheme}://198.18.1.2:{PORT}",))

    far_a = wait_easytier_route(ea, "10.144.144.3", cost=2)
    far_c = wait_easytier_route(ec, "10.144.144.1", cost=2)
    py_id = pb.cli("node")["peer_id"]
    assert far_a["peer_id"] == ec.peer_id and far_a["next_hop_peer_id"] == py_id
    assert far_c["peer_id"] == ea.peer_id and far_c["next_hop_peer_id"] == py_id
    assert far_a["hostname"] == "et-c" and far_c["hostname"] == "et-a"
    assert_pytier_seen_by_easytier(ea, pb, "10.144.144.2", cost=1)
    assert_pytier_seen_by_easytier(ec, pb, "10.144.144.2", cost=1)

    assert_pings(a, "10.144.144.3")
    assert_pings(c, "10.144.144.1")
    assert_transfer(testbed, c, a, "10.144.144.3")
    assert pb.cli("stats").get("fwd_packets", 0) > TRANSFER // 1400
    for et in (ea, ec):
        assert et.query("latest_error") is None
        assert [p["peer_id"] for p in et.query("peers")] == [py_id]


# ---- refusal ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_secret_is_refused_both_ways(testbed: Testbed, scheme: str) -> None:
    a, b = pair(testbed)
    # Each side both listens and connects to the other: one link per admission direction.
    py = pytier(testbed, b, "10.144.144.2", "py-b", listen=listen_url(scheme),
                peers=(f"{scheme}://198.18.1.1:{PORT}",), secret="not-the-secret")
    et = easytier(testbed, a, "10.144.144.1", "et-a", listen=listen_url(scheme),
                  peers=(f"{scheme}://198.18.1.2:{PORT}",))

    # As client pytier learns it from the all-zero digest the real listener sends back; as listener
    # it compares the real client's digest with its own.
    wait_for(lambda: "refused our network secret" in py.log() and "network secret mismatch (the peer's"
             in py.log(), 20, "pytier to log both refusals")
    wait_for(lambda: any("network identity not match" in e for e in et.query("management_events")), 10,
             "EasyTier to refuse pytier's connection")
    time.sleep(3)
    assert py.cli("peer") == [] and py.route_ips() == set()
    assert et.routes() == []
    # A real client takes the all-zero digest a listener sends on a mismatch as "compare names
    # only" and keeps a dead link until its pings fail; a real listener does exactly the same to a
    # real client. What pytier must not do is send anything past that one handshake reply.
    for peer in et.query("peers"):
        for conn in peer["conns"]:
            assert conn["is_client"] and int(conn["stats"]["rx_packets"]) <= 1, conn
    # Said once per direction, although the reconnect loops keep trying.
    refusals = [ln for ln in py.log().splitlines() if " WARN " in ln and "secret" in ln]
    assert len(refusals) == 2, refusals
