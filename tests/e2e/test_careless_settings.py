"""Settings a careless user gives, against real pytier-core nodes: each gets correct behaviour or one
clear line, never a traceback (docs/limits.md has the table)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import BIN, PytierNode, tcp_transfer, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "careless", "--network-secret", "s3"]


@contextmanager
def _pair(tb: Testbed, ip_a: str, ip_b: str, extra: Sequence[str] = (), *,
          ipv6: bool = False) -> Iterator[tuple[Netns, Netns, PytierNode, PytierNode]]:
    """Nodes A and B over a 1500-byte veth, B connected to A, both with `extra` settings."""
    a, b = tb.netns("a", ipv6=ipv6), tb.netns("b", ipv6=ipv6)
    tb.veth(a, b, "198.18.4.1/24", "198.18.4.2/24")
    na = PytierNode(tb, a, [*NET, "-i", ip_a, "-l", "udp://0.0.0.0:11010", *extra], name="node-a").start()
    nb = PytierNode(tb, b, [*NET, "-i", ip_b, "--no-listener", "-p", "udp://198.18.4.1:11010", *extra],
                    name="node-b").start()
    try:
        yield a, b, na, nb
        assert (na.stop(), nb.stop()) == (0, 0)
    finally:
        for node in (na, nb):
            assert "Traceback" not in node.log()


def _ping_ok(ns: Netns, ip: str, size: int = 56) -> bool:
    return ping(ip, count=3, interval=0.1, timeout=2, size=size, netns=ns).received >= 2


def test_mtu_576_carries_small_and_fragmented_packets(testbed: Testbed) -> None:
    with _pair(testbed, "10.144.150.1/24", "10.144.150.2/24", ["--mtu", "576"]) as (a, b, na, _):
        na.wait_route("10.144.150.2")
        assert "mtu 576" in a.run(["ip", "link", "show", "pytier0"]).stdout
        assert _ping_ok(a, "10.144.150.2", size=548)  # a 576-byte packet, the most the TUN takes
        assert _ping_ok(a, "10.144.150.2", size=1400)  # fragmented by the kernel before the TUN
        sent, sha_sent, sha_received, _ = tcp_transfer(testbed, b, a, "10.144.150.2", 1 << 20, timeout=30)
        assert (sent, sha_received) == (1 << 20, sha_sent)


_COUNT_DATAGRAMS = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
s.bind((sys.argv[1], 7000)); s.settimeout(2)
print("ready", flush=True)
n = 0
try:
    while True:
        n += len(s.recv(65535)) == 8000
except TimeoutError:
    print(n, flush=True)
"""

_BURST = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(20):
    s.sendto(bytes(8000), (sys.argv[1], 7000))
"""


def test_mtu_9000_over_a_1500_underlay_fragments_the_tunnel_packets(testbed: Testbed) -> None:
    with _pair(testbed, "10.144.151.1/24", "10.144.151.2/24", ["--mtu", "9000"]) as (a, b, na, _):
        na.wait_route("10.144.151.2")
        assert _ping_ok(a, "10.144.151.2", size=8000)  # one big packet at a time
        # A burst of 8028-byte packets: the tunnel sends them back to back, each one fragmented.
        sink = testbed.popen(b, [sys.executable, "-c", _COUNT_DATAGRAMS, "10.144.151.2"],
                             stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        a.run([sys.executable, "-c", _BURST, "10.144.151.2"])
        assert int(sink.stdout.readline()) >= 18


def test_a_32_reaches_its_peers_through_host_routes(testbed: Testbed) -> None:
    with _pair(testbed, "10.144.152.1/32", "10.144.152.2/32") as (a, b, na, _nb):
        na.wait_route("10.144.152.2")
        wait_for(lambda: "10.144.152.2 dev pytier0" in a.run(["ip", "route"]).stdout, 10, "A's host route")
        wait_for(lambda: "10.144.152.1 dev pytier0" in b.run(["ip", "route"]).stdout, 10, "B's host route")
        assert _ping_ok(a, "10.144.152.2")
        assert "route 10.144.152.2/32 via pytier0 added (a peer's address)" in na.log()
        # The kernel-mode TCP proxy needs room for its hairpin address: one clear line.
        refused = a.run([str(BIN / "pytier-core"), *NET, "-i", "10.144.152.9/32", "--no-listener",
                         "--enable-kcp-proxy", "--dev-name", "ptkcp32", "--rpc-portal", "127.0.0.1:15998",
                         "--instance-name", "kcp32"],
                        check=False, timeout=20)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.splitlines()[-1] == (
            "pytier-core: error: --ipv4 10.144.152.9/32: the TCP proxy intercepts through a NAT hairpin "
            "that needs a virtual network of at least 4 addresses (/30 or wider); widen the prefix, or add "
            "--use-smoltcp")


def test_a_8_works(testbed: Testbed) -> None:
    with _pair(testbed, "10.0.0.1/8", "10.200.0.2/8") as (a, _, na, _nb):
        na.wait_route("10.200.0.2")
        assert "10.0.0.0/8 dev pytier0" in a.run(["ip", "route"]).stdout
        assert _ping_ok(a, "10.200.0.2")


def test_a_peer_url_naming_the_node_itself_is_skipped_with_one_warning(testbed: Testbed) -> None:
    a = testbed.netns("a")
    testbed.veth(a, testbed.netns("x"), "198.18.4.1/24", "198.18.4.2/24")
    node = PytierNode(testbed, a, [*NET, "-i", "10.144.153.1/24", "-l", "udp://0.0.0.0:11010",
                                   "-l", "tcp://0.0.0.0:11011", "-p", "udp://198.18.4.1:11010",
                                   "-p", "tcp://127.0.0.1:11011", "-p", "udp://198.18.4.1:11099"],
                      name="node-a").start()
    time.sleep(2)
    log = node.log()
    for url in ("udp://198.18.4.1:11010", "tcp://127.0.0.1:11011"):
        assert log.count(f"peer {url} is this node's own listener: not connecting to it") == 1
    assert "peer id conflict" not in log  # no handshake with itself was tried
    assert "udp://198.18.4.1:11099" in log  # an unused port of ours is an ordinary peer URL
    assert node.stop() == 0
    assert "Traceback" not in node.log()


def test_two_nodes_with_one_virtual_ip_are_reported_once(testbed: Testbed) -> None:
    with _pair(testbed, "10.144.154.1/24", "10.144.154.1/24") as (_, _b, na, nb):
        wait_for(lambda: "is claimed by more than one node" in na.log() + nb.log(), 15, "the conflict")
        time.sleep(2)  # route syncs go on: the report must not repeat
        for node in (na, nb):
            lines = [line for line in node.log().splitlines() if "claimed by more than one node" in line]
            assert len(lines) == 1, lines
            claim = " ERROR pytier.node: virtual IPv4 10.144.154.1 is claimed by more than one node: "
            assert claim in lines[0]
            assert "(this node, hostname" in lines[0]
            assert node.cli("stats")["ipv4_conflicts"] == 1


_SEND_V6 = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for _ in range(200):
    s.sendto(b"x" * 100, ("fd00:144::2", 9))
"""


def test_ipv6_packets_on_the_tun_are_dropped_and_counted_quietly(testbed: Testbed) -> None:
    with _pair(testbed, "10.144.155.1/24", "10.144.155.2/24", ipv6=True) as (a, _, na, _nb):
        na.wait_route("10.144.155.2")
        a.run(["ip", "-6", "addr", "add", "fd00:144::1/64", "dev", "pytier0", "nodad"])
        lines_before = len(na.log().splitlines())
        a.run([sys.executable, "-c", _SEND_V6])
        wait_for(lambda: na.cli("stats").get("tun_dropped_not_ipv4", 0) >= 200, 10, "the drops counted")
        assert len(na.log().splitlines()) - lines_before < 5
        assert _ping_ok(a, "10.144.155.2")  # IPv4 carries on


def test_help_and_errors_of_careless_flags_are_one_line() -> None:
    for args, message in (
        (["--mtu", "575"], "argument --mtu: MTU 575 is out of range (576..9000)"),
        (["--mtu", "9001"], "argument --mtu: MTU 9001 is out of range (576..9000)"),
        (["-i", "10.144.0.0/16"], "is the network address of 10.144.0.0/16"),
        (["-i", "10.144.0.1/0"], "prefix length must be 1..32"),
    ):
        result = subprocess.run([str(BIN / "pytier-core"), *args, "--check-config"], capture_output=True,
                                text=True, timeout=20)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr
