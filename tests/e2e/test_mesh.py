"""The virtual network end to end: real pytier-core processes in namespaces A - B - C."""

from __future__ import annotations

import re
import signal
import time

import pytest

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import PytierNode, tcp_transfer, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "s3"]


def line(tb: Testbed) -> tuple[Netns, Netns, Netns]:
    """A - B - C: A and C cannot reach each other's underlay address; only B reaches both."""
    a, b, c = tb.netns("a"), tb.netns("b"), tb.netns("c")
    tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    tb.veth(b, c, "198.18.2.2/24", "198.18.2.3/24")
    return a, b, c


def start_line(tb: Testbed, extra: list[str] | None = None) -> tuple[PytierNode, PytierNode, PytierNode]:
    a, b, c = line(tb)
    more = extra or []
    na = PytierNode(tb, a, [*NET, "--ipv4", "10.144.144.1/24", "--listeners", "udp://0.0.0.0:11010", *more],
                    name="node-a").start()
    nb = PytierNode(tb, b, [*NET, "--ipv4", "10.144.144.2/24", "--listeners", "udp://0.0.0.0:11010",
                            "--peers", "udp://198.18.1.1:11010", *more], name="node-b").start()
    nc = PytierNode(tb, c, [*NET, "--ipv4", "10.144.144.3/24", "--no-listener",
                            "--peers", "udp://198.18.2.2:11010", *more], name="node-c").start()
    return na, nb, nc


def test_line_ping_transfer_and_tables(testbed: Testbed) -> None:
    na, nb, nc = start_line(testbed)
    nc.wait_route("10.144.144.1")
    na.wait_route("10.144.144.3")
    assert ping("10.144.144.1", count=3, interval=0.2, timeout=2, netns=nc.ns).received >= 2

    size = 100 * 1024 * 1024
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, na.ns, nc.ns, "10.144.144.1", size, timeout=180)
    assert sent == size
    assert sha_received == sha_sent

    routes = {r["ipv4"]: r for r in nc.cli("route")}
    assert routes["10.144.144.1"]["cost"] == 2
    assert routes["10.144.144.1"]["next_hop_peer_id"] == nb.cli("node")["peer_id"]
    assert routes["10.144.144.2"]["cost"] == 1
    peers = nc.cli("peer")
    assert [p["ipv4"] for p in peers] == ["10.144.144.2"]
    assert peers[0]["tunnel"] == "udp" and peers[0]["rx_bytes"] > 0 and peers[0]["tx_bytes"] > size
    node = na.cli("node")
    assert node["ipv4"] == "10.144.144.1/24" and node["listeners"] == ["udp://0.0.0.0:11010"]

    table = nc.cli_table("route")
    assert table.startswith("┌") and "10.144.144.1" in table and "node-a" in table
    assert "udp" in nc.cli_table("peer")
    assert "10.144.144.1/24" in na.cli_table("node")
    # The relay forwarded the transfer without opening it.
    assert nb.cli("stats").get("fwd_packets", 0) > size // 1400


def test_wrong_secret_is_refused_and_logged_once(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "--ipv4", "10.144.144.1/24", "--listeners", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, ["--network-name", "demo", "--network-secret", "wrong", "--ipv4",
                                 "10.144.144.2/24", "--no-listener", "--peers", "udp://198.18.1.1:11010"],
                    name="node-b").start()
    # Several reconnect attempts happen in this time; each side says why once at warning level.
    wait_for(lambda: "refused" in nb.log() and "refused" in na.log(), 15, "both sides to log the refusal")
    time.sleep(4)
    assert na.cli("peer") == [] and nb.cli("peer") == []
    assert nb.route_ips() == set()
    for node in (na, nb):
        warnings = [ln for ln in node.log().splitlines() if "WARN" in ln and "secret" in ln]
        assert len(warnings) == 1, warnings
    assert "network secret mismatch" in na.log() and "network secret" in nb.log()


def test_node_leaves_and_rejoins_routes_converge(testbed: Testbed) -> None:
    na, _nb, nc = start_line(testbed, ["--peer-timeout", "4"])
    na.wait_route("10.144.144.3")
    assert nc.stop() == 0
    wait_for(lambda: "10.144.144.3" not in na.route_ips(), 20, "A to drop C's route")
    nc.start()
    na.wait_route("10.144.144.3", timeout=30)
    assert ping("10.144.144.3", count=3, interval=0.2, timeout=2, netns=na.ns).received >= 2


def test_link_with_30_percent_loss_stays_up(testbed: Testbed) -> None:
    link = testbed.linked_pair(delay_ms=5, loss_pct=30, seed=7)
    na = PytierNode(testbed, link.a, [*NET, "--ipv4", "10.144.144.1/24", "--listeners", "udp://0.0.0.0:11010",
                                      "--peer-timeout", "10"], name="node-a").start()
    nb = PytierNode(testbed, link.b, [*NET, "--ipv4", "10.144.144.2/24", "--no-listener", "--peers",
                                      f"udp://{link.ip_a}:11010", "--peer-timeout", "10"],
                    name="node-b").start()
    nb.wait_route("10.144.144.1", timeout=40)
    connected_at = time.monotonic()
    # Long enough for many liveness rounds at this loss rate, with a timeout shorter than the watch.
    result = ping("10.144.144.1", count=100, interval=0.2, timeout=1, netns=nb.ns)
    assert time.monotonic() - connected_at >= 20
    assert 0 < result.received < 100
    for node in (na, nb):
        assert "is down" not in node.log()
        assert len(node.cli("peer")) == 1
    loss = nb.cli("peer")[0]["loss_rate"]
    assert 0.2 < loss < 0.8, loss


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_tun_and_routes(testbed: Testbed, sig: int) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "--ipv4", "10.144.144.1/24", "--listeners", "udp://0.0.0.0:11010",
                                 "--dev-name", "ptun0"], name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "--ipv4", "10.144.144.2/24", "--no-listener", "--peers",
                                 "udp://198.18.1.1:11010", "--proxy-networks", "192.168.77.0/24"],
                    name="node-b").start()
    na.wait_route("10.144.144.2")
    wait_for(lambda: "192.168.77.0/24" in a.run(["ip", "route"]).stdout, 10, "A's route to B's subnet")
    assert "ptun0" in a.run(["ip", "link"]).stdout
    assert na.stop(sig) == 0
    links = a.run(["ip", "link"]).stdout
    routes = a.run(["ip", "route"]).stdout
    assert "ptun0" not in links
    assert "10.144.144.0/24" not in routes and "192.168.77.0/24" not in routes
    assert re.search(r"TUN device \S+ removed", na.log())
    assert nb.stop() == 0


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "chacha20", "xor"])
def test_other_encryption_algorithms(testbed: Testbed, algorithm: str) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    algo = ["--encryption-algorithm", algorithm]
    na = PytierNode(testbed, a, [*NET, *algo, "-i", "10.144.144.1/24", "-l", "tcp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, *algo, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                 "tcp://198.18.1.1:11010"], name="node-b").start()
    nb.wait_route("10.144.144.1")
    _, sha_sent, sha_received, _ = tcp_transfer(testbed, na.ns, nb.ns, "10.144.144.1", 4 * 1024 * 1024)
    assert sha_received == sha_sent


def test_duplicate_virtual_ip_is_reported(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.1/24", "--no-listener", "-p",
                                 "udp://198.18.1.1:11010"], name="node-b").start()
    for node in (na, nb):
        wait_for(lambda n=node: "10.144.144.1" in n.log() and "ERROR" in n.log(), 20,
                 f"{node.name} to report the conflict")
        line = next(ln for ln in node.log().splitlines() if "ERROR" in ln)
        assert "10.144.144.1" in line and "node-a" in line and "node-b" in line, line


def test_connector_reconnects_after_listener_restart(testbed: Testbed) -> None:
    na, nb, _nc = start_line(testbed, ["--peer-timeout", "4"])
    nb.wait_route("10.144.144.1")
    assert na.stop() == 0
    wait_for(lambda: "10.144.144.1" not in nb.route_ips(), 20, "B to drop A")
    na.start()
    # Nobody restarts B: its reconnect loop (with back-off) must find A again by itself.
    nb.wait_route("10.144.144.1", timeout=40)
    assert ping("10.144.144.1", count=3, interval=0.2, timeout=2, netns=nb.ns).received >= 2


def test_send_errors_from_a_local_firewall_do_not_drop_the_peer(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "--ipv4", "10.144.144.1/24", "--listeners", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "--ipv4", "10.144.144.2/24", "--no-listener", "--peers",
                                 "udp://198.18.1.1:11010", "--peer-timeout", "8"], name="node-b").start()
    nb.wait_route("10.144.144.1")
    # A drop on B's own output hook: every sendto() of B's tunnel socket fails with EPERM.
    b.run(["nft", "-f", "-"], input="table ip fw {\n chain out {\n type filter hook output priority 0;\n"
          " udp dport 11010 drop\n }\n}\n")
    try:
        result = ping("10.144.144.1", count=10, interval=0.3, timeout=0.5, netns=b)
        assert result.received == 0
        assert len(nb.cli("peer")) == 1
        assert nb.cli("stats").get("tx_send_errors", 0) >= 10  # counted as lost packets
    finally:
        b.run(["nft", "delete", "table", "ip", "fw"])
    assert ping("10.144.144.1", count=3, interval=0.2, timeout=2, netns=b).received >= 2
    assert "is down" not in nb.log()
    assert na.proc is not None and nb.proc is not None
    assert na.proc.poll() is None and nb.proc.poll() is None
