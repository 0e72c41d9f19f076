"""Subnet proxy (--proxy-networks) without any TCP proxy: a LAN host behind B reached from A."""

from __future__ import annotations

import subprocess
import sys

from pytier.testbed.netns import Testbed
from pytier.testbed.nodes import PytierNode, tcp_transfer, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "s3"]
LAN = "198.19.77.0/24"

_PEER_OF_ACCEPT = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, peer = s.accept(); print(peer[0], flush=True); c.close()
"""


def test_lan_behind_a_node_is_reachable_and_forwarding_is_undone(testbed: Testbed) -> None:
    a, b, h = testbed.netns("a"), testbed.netns("b"), testbed.netns("h")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(b, h, "198.19.77.1/24", "198.19.77.2/24")
    forward_before = b.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010",
                                 "--peer-timeout", "4"], name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                 "udp://198.18.1.1:11010", "--proxy-networks", LAN], name="node-b").start()
    na.wait_route("10.144.144.2")
    assert LAN in next(r for r in na.cli("route") if r["ipv4"] == "10.144.144.2")["proxy_cidrs"]
    wait_for(lambda: LAN in a.run(["ip", "route"]).stdout, 10, "A's route to B's LAN")
    assert b.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"

    assert ping("198.19.77.2", count=3, interval=0.2, timeout=2, netns=a).received >= 2
    _, sha_sent, sha_received, _ = tcp_transfer(testbed, h, a, "198.19.77.2", 8 * 1024 * 1024)
    assert sha_received == sha_sent
    # The LAN host sees B's LAN address (masquerade), so it needs no route to the virtual network.
    server = testbed.popen(h, [sys.executable, "-c", _PEER_OF_ACCEPT, "198.19.77.2", "7100"],
                           stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    a.run([sys.executable, "-c", "import socket; socket.create_connection(('198.19.77.2', 7100), 10)"])
    assert server.stdout.readline().strip() == "198.19.77.1"

    assert nb.stop() == 0
    assert "pytier_" not in b.run(["nft", "list", "tables"]).stdout
    assert b.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == forward_before
    wait_for(lambda: LAN not in a.run(["ip", "route"]).stdout, 20, "A to drop the route to B's LAN")
