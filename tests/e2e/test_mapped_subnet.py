"""A subnet exported under another prefix (--proxy-networks 192.168.77.0/24->10.177.0.0/24): peers
reach the LAN host 192.168.77.2 as 10.177.0.2, by plain packets and through the KCP and QUIC proxies,
real EasyTier nodes as well, and the owner's nft rules go when it stops."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys

import pytest

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import EasyTierNode, PytierNode, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "s3"]
REAL, MAPPED = "192.168.77.0/24", "10.177.0.0/24"
HOST, HOST_MAPPED = "192.168.77.2", "10.177.0.2"
ROUTER = "192.168.77.1"  # node A's LAN address
MIB = 1024 * 1024

# The sink listens on the real address, the source connects to the mapped one (tcp_transfer uses one
# address for both). The sink stops after the expected count: EasyTier's proxies carry no half-close.
_SINK = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30); print("listening", flush=True)
c, peer = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0; want = int(sys.argv[3])
while n < want and (b := c.recv(min(1 << 16, want - n))):
    h.update(b); n += len(b)
c.sendall(b"ok"); c.close(); print(peer[0], n, h.hexdigest(), flush=True)
"""

_SOURCE = r"""
import hashlib, random, socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), 30); c.settimeout(30)
data = random.Random(7).randbytes(int(sys.argv[3])); c.sendall(data)
assert c.recv(2) == b"ok"; print(hashlib.sha256(data).hexdigest(), flush=True)
"""


def sha256_of(nbytes: int) -> str:
    return hashlib.sha256(random.Random(7).randbytes(nbytes)).hexdigest()


def transfer(tb: Testbed, server: Netns, client: Netns, port: int, nbytes: int) -> tuple[str, int, str, str]:
    """(peer address the LAN host saw, bytes it received, their sha256, sha256 of what was sent)."""
    sink = tb.popen(server, [sys.executable, "-c", _SINK, HOST, str(port), str(nbytes)],
                    stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
    sent = client.run([sys.executable, "-c", _SOURCE, HOST_MAPPED, str(port), str(nbytes)], timeout=60).stdout
    peer, n, sha = sink.stdout.readline().split()
    sink.wait(10)
    return peer, int(n), sha, str(sent).strip()


def owner(tb: Testbed) -> tuple[Netns, Netns, PytierNode]:
    """Node A (10.144.144.1, listening on 198.18.1.1) with the LAN host h behind it, exported mapped."""
    a, h = tb.netns("a"), tb.netns("h")
    lan = tb.veth(a, h, None, None)
    a.run(["ip", "addr", "add", f"{ROUTER}/24", "dev", lan.ifname_a])
    h.run(["ip", "addr", "add", f"{HOST}/24", "dev", lan.ifname_b])
    h.run(["ip", "route", "add", "10.144.144.0/24", "via", ROUTER])
    na = PytierNode(tb, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010",
                            "--proxy-networks", f"{REAL} -> {MAPPED}"], name="node-a")
    return a, h, na


def test_mapped_subnet_plain_kcp_quic(testbed: Testbed) -> None:
    a, h, na = owner(testbed)
    b, c, d = testbed.netns("b"), testbed.netns("c"), testbed.netns("d")
    sources: list[tuple[Netns, list[str]]] = [
        (b, []), (c, ["--enable-kcp-proxy"]), (d, ["--enable-quic-proxy", "--use-smoltcp"])]
    for n, (ns, _) in enumerate(sources, start=1):
        testbed.veth(a, ns, f"198.18.{n}.1/24", f"198.18.{n}.2/24")
    na.start()
    nodes = [PytierNode(testbed, ns, [*NET, "-i", f"10.144.144.{n}/24", "--no-listener", "-p",
                                      f"udp://198.18.{n - 1}.1:11010", *extra], name=f"node-{ns.name[-1]}")
             for n, (ns, extra) in enumerate(sources, start=2)]
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_route("10.144.144.1")
    nb, nc, nd = nodes
    # Peers see only the mapped prefix, as an EasyTier node with mapped_cidr advertises it.
    assert next(r for r in nb.cli("route") if r["ipv4"] == "10.144.144.1")["proxy_cidrs"] == [MAPPED]
    assert na.cli("node")["proxy_networks"] == [f"{REAL}->{MAPPED}"]
    for ns, _ in sources:
        wait_for(lambda ns=ns: MAPPED in ns.run(["ip", "route"]).stdout, 10, f"{ns} route to {MAPPED}")
        assert "192.168.77." not in ns.run(["ip", "route"]).stdout

    assert ping(HOST_MAPPED, count=3, interval=0.2, timeout=2, netns=b).received >= 2
    # The LAN's own packets into the virtual network leave with the mapped source (node B has no
    # route to 192.168.77.0/24, so its answers come back only to 10.177.0.2).
    assert ping("10.144.144.2", count=3, interval=0.2, timeout=2, netns=h).received >= 2

    # The LAN host sees A's LAN address (masquerade, or A's own socket), as with an unmapped subnet.
    sha = sha256_of(8 * MIB)
    for port, ns in ((5201, b), (5202, c), (5203, d)):
        assert transfer(testbed, h, ns, port, 8 * MIB) == (ROUTER, 8 * MIB, sha, sha), ns
    # C carried its transfer over KCP, D over QUIC; A opened both real connections.
    for node, kind, port in ((nc, "Kcp", 5202), (nd, "Quic", 5203)):
        for side in (node, na):
            rows = [(r["dst"], r["tx_bytes"]) for r in side.cli("proxy") if r["transport_type"] == kind]
            assert rows == [(f"{HOST_MAPPED}:{port}", 8 * MIB)], (side.name, kind)

    assert na.stop(signal.SIGINT) == 0
    assert "pytier_" not in a.run(["nft", "list", "tables"]).stdout


@pytest.mark.interop
def test_easytier_reaches_a_pytier_mapped_subnet(testbed: Testbed) -> None:
    a, h, na = owner(testbed)
    b = testbed.netns("b")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na.start()
    et = EasyTierNode(testbed, b, name="et-b", ipv4="10.144.144.2/24", listeners=[],
                      peers=["udp://198.18.1.1:11010"], network_name="demo", network_secret="s3",
                      flags={"enable_kcp_proxy": True}).start()
    assert et.wait_route("10.144.144.1")["proxy_cidrs"] == [MAPPED]
    wait_for(lambda: b.run(["ip", "route", "get", HOST_MAPPED], check=False).returncode == 0, 10,
             f"EasyTier's route to {MAPPED}")
    assert ping(HOST_MAPPED, count=3, interval=0.2, timeout=2, netns=b).received >= 2
    sha = sha256_of(4 * MIB)
    assert transfer(testbed, h, b, 5201, 4 * MIB) == (ROUTER, 4 * MIB, sha, sha)
    assert [(r["dst"], r["tx_bytes"]) for r in na.cli("proxy") if r["transport_type"] == "Kcp"] == [
        (f"{HOST_MAPPED}:5201", 4 * MIB)]
    et.stop()
    assert na.stop() == 0
    assert "pytier_" not in a.run(["nft", "list", "tables"]).stdout
