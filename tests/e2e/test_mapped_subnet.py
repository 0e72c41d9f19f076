"""A subnet exported under another prefix (--proxy-networks 192.168.77.0/24->10.177.0.0/24): peers
reach the LAN host 192.168.77.2 as 10.177.0.2, by plain packets and through the KCP proxy, and the
owner's nft rules go when it stops."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import PytierNode, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "s3"]
REAL, MAPPED = "192.168.77.0/24", "10.177.0.0/24"
HOST, HOST_MAPPED = "192.168.77.2", "10.177.0.2"
MIB = 1024 * 1024

# The sink listens on the real address, the source connects to the mapped one: tcp_transfer uses one
# address for both.
_SINK = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30); print("listening", flush=True)
c, peer = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while b := c.recv(1 << 16):
    h.update(b); n += len(b)
c.sendall(b"ok"); c.close(); print(peer[0], n, h.hexdigest(), flush=True)
"""

_SOURCE = r"""
import hashlib, random, socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), 30); c.settimeout(30)
data = random.Random(7).randbytes(int(sys.argv[3])); c.sendall(data); c.shutdown(socket.SHUT_WR)
assert c.recv(2) == b"ok"; print(hashlib.sha256(data).hexdigest(), flush=True)
"""


def sha256_of(nbytes: int) -> str:
    return hashlib.sha256(random.Random(7).randbytes(nbytes)).hexdigest()


def transfer(tb: Testbed, server: Netns, client: Netns, port: int, nbytes: int) -> tuple[str, int, str, str]:
    """(peer address the LAN host saw, bytes it received, their sha256, sha256 of what was sent)."""
    sink = tb.popen(server, [sys.executable, "-c", _SINK, HOST, str(port)], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
    sent = client.run([sys.executable, "-c", _SOURCE, HOST_MAPPED, str(port), str(nbytes)], timeout=60).stdout
    peer, n, sha = sink.stdout.readline().split()
    sink.wait(10)
    return peer, int(n), sha, str(sent).strip()


def test_mapped_subnet_plain_and_kcp(testbed: Testbed) -> None:
    a, b, c, h = testbed.netns("a"), testbed.netns("b"), testbed.netns("c"), testbed.netns("h")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(a, c, "198.18.2.1/24", "198.18.2.2/24")
    lan = testbed.veth(a, h, None, None)
    a.run(["ip", "addr", "add", "192.168.77.1/24", "dev", lan.ifname_a])
    h.run(["ip", "addr", "add", f"{HOST}/24", "dev", lan.ifname_b])
    h.run(["ip", "route", "add", "10.144.144.0/24", "via", "192.168.77.1"])

    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010",
                                 "--proxy-networks", f"{REAL} -> {MAPPED}"], name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                 "udp://198.18.1.1:11010"], name="node-b").start()
    nc = PytierNode(testbed, c, [*NET, "-i", "10.144.144.3/24", "--no-listener", "-p",
                                 "udp://198.18.2.1:11010", "--enable-kcp-proxy"], name="node-c").start()
    nb.wait_route("10.144.144.1")
    nc.wait_route("10.144.144.1")
    # Peers see only the mapped prefix, as an EasyTier node with mapped_cidr advertises it.
    assert next(r for r in nb.cli("route") if r["ipv4"] == "10.144.144.1")["proxy_cidrs"] == [MAPPED]
    assert na.cli("node")["proxy_networks"] == [f"{REAL}->{MAPPED}"]
    for ns in (b, c):
        wait_for(lambda ns=ns: MAPPED in ns.run(["ip", "route"]).stdout, 10, f"{ns} route to {MAPPED}")
        assert "192.168.77." not in ns.run(["ip", "route"]).stdout

    assert ping(HOST_MAPPED, count=3, interval=0.2, timeout=2, netns=b).received >= 2
    # A connection the LAN opens into the virtual network leaves with its mapped address.
    assert ping("10.144.144.2", count=3, interval=0.2, timeout=2, netns=h).received >= 2

    # The LAN host sees A's LAN address (masquerade) either way, as with an unmapped subnet.
    sha = sha256_of(8 * MIB)
    assert transfer(testbed, h, b, 5201, 8 * MIB) == ("192.168.77.1", 8 * MIB, sha, sha)
    assert transfer(testbed, h, c, 5202, 8 * MIB) == ("192.168.77.1", 8 * MIB, sha, sha)
    # Node C carried the second over KCP; node A opened the real connection.
    for node in (nc, na):
        kcp = [r for r in node.cli("proxy") if r["transport_type"] == "Kcp"]
        assert [(r["dst"], r["tx_bytes"]) for r in kcp] == [(f"{HOST_MAPPED}:5202", 8 * MIB)], node.name

    assert na.stop() == 0
    assert "pytier_" not in a.run(["nft", "list", "tables"]).stdout
