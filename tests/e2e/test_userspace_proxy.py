"""--use-smoltcp end to end: the user-space TCP stack intercepts, also for a LAN host behind the node.

Topology: H (LAN host, default route via A) - A (pytier, router) - lossy link - B (pytier) - S (a
host in B's proxied subnet). Both routers advertise their LAN (--proxy-networks), as subnet-to-subnet
routing needs. Addresses of the LAN segments come from 198.19.0.0/16.
"""

from __future__ import annotations

import sys

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import PytierNode, tcp_transfer, wait_for

NET = ["--network-name", "demo", "--network-secret", "s3"]
KCP_US = ["--enable-kcp-proxy", "--use-smoltcp"]
SUBNET = "198.19.20.0/24"
LAN_A = "198.19.10.0/24"
MIB = 1024 * 1024


def build(tb: Testbed, a_extra: list[str], *, loss: float = 0.0
          ) -> tuple[PytierNode, PytierNode, Netns, Netns]:
    link = tb.linked_pair(delay_ms=10 if loss else 0, loss_pct=loss, rate_mbit=100 if loss else None,
                          queue_ms=50 if loss else None, seed=5)
    h, s = tb.netns("h"), tb.netns("s")
    tb.veth(link.a, h, "198.19.10.1/24", "198.19.10.2/24")
    tb.veth(link.b, s, "198.19.20.1/24", "198.19.20.2/24")
    h.run(["ip", "route", "add", "default", "via", "198.19.10.1"])
    s.run(["ip", "route", "add", "default", "via", "198.19.20.1"])
    link.a.run(["sysctl", "-w", "net.ipv4.ip_forward=1"])
    # Subnet to subnet: each router advertises its own LAN, so answers find their way back.
    na = PytierNode(tb, link.a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010",
                                 "--proxy-networks", LAN_A, *a_extra], name="node-a").start()
    nb = PytierNode(tb, link.b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                 f"udp://{link.ip_a}:11010", "--proxy-networks", SUBNET],
                    name="node-b").start()
    na.wait_route("10.144.144.2", timeout=40)
    wait_for(lambda: SUBNET in link.a.run(["ip", "route"]).stdout, 15, "A's route to B's subnet")
    wait_for(lambda: LAN_A in link.b.run(["ip", "route"]).stdout, 15, "B's route to A's LAN")
    return na, nb, h, s


def kcp_rows(node: PytierNode) -> list[dict[str, object]]:
    return [r for r in node.cli("proxy") if r["transport_type"] == "Kcp"]


def test_lan_host_to_proxied_subnet_over_kcp_with_10_percent_loss(testbed: Testbed) -> None:
    na, nb, h, s = build(testbed, KCP_US, loss=10)
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, s, h, "198.19.20.2", 50 * MIB, timeout=240)
    assert sent == 50 * MIB and sha_received == sha_sent
    rows = kcp_rows(na)
    assert len(rows) == 1 and str(rows[0]["src"]).startswith("198.19.10.2:")  # H's own address
    assert rows[0]["dst"] == "198.19.20.2:5201"
    assert len(kcp_rows(nb)) == 1


def test_without_use_smoltcp_lan_traffic_goes_plain(testbed: Testbed) -> None:
    na, _nb, h, s = build(testbed, ["--enable-kcp-proxy"])
    _, sha_sent, sha_received, _ = tcp_transfer(testbed, s, h, "198.19.20.2", 4 * MIB)
    assert sha_received == sha_sent
    assert kcp_rows(na) == []
    # The node's own connections are still proxied in kernel mode.
    _, sha_sent, sha_received, _ = tcp_transfer(testbed, s, na.ns, "198.19.20.2", 4 * MIB, port=5202)
    assert sha_received == sha_sent
    assert len(kcp_rows(na)) == 1


_CONNECT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)
    c.sendall(b"ping"); c.shutdown(socket.SHUT_WR); print(c.recv(16).decode() or "eof")
except OSError as e:
    print("error", e.errno)
"""

_ECHO = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(c.recv(16)); c.close()
"""


def test_user_space_stack_works_where_a_firewall_blocks_the_kernel_hairpin(testbed: Testbed) -> None:
    import subprocess

    for mode, expect_ok in ((["--enable-kcp-proxy"], False), (KCP_US, True)):
        with Testbed(prefix=testbed.prefix + ("k" if not expect_ok else "u")) as tb:
            na, _nb, _h, s = build(tb, mode)
            # A host firewall that takes no new connections in from the virtual network: the kernel
            # hairpin is exactly such a connection (the rewritten SYN comes in on the TUN device),
            # while the user-space stack's answers belong to A's own outgoing connection.
            na.ns.run(["nft", "-f", "-"], input="table ip fw {\n chain in {\n"
                      " type filter hook input priority 0;\n iifname \"pytier0\" ct state new drop\n"
                      " }\n}\n")
            echo = tb.popen(s, [sys.executable, "-c", _ECHO, "198.19.20.2", "7200"], stdout=subprocess.PIPE,
                            text=True)
            assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
            out = na.ns.run([sys.executable, "-c", _CONNECT, "198.19.20.2", "7200"],
                            timeout=30).stdout.strip()
            if expect_ok:
                assert out == "ping", out
            else:
                assert out.startswith("error"), out
