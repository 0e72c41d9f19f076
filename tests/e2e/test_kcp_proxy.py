"""The KCP proxy end to end: real pytier-core processes in namespaces, real kernel TCP clients."""

from __future__ import annotations

import errno
import subprocess
import sys
import time

from pytier.node import LEGACY_ADVERTISEMENT_ENV
from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import PytierNode, tcp_transfer, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "s3"]
KCP = ["--enable-kcp-proxy"]
MIB = 1024 * 1024


def pair(tb: Testbed, src_extra: list[str], dst_extra: list[str], *, dst_env: dict[str, str] | None = None
         ) -> tuple[PytierNode, PytierNode]:
    """Destination A (10.144.144.1) listening, source B (10.144.144.2) connecting, on a clean veth."""
    a, b = tb.netns("a"), tb.netns("b")
    tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(tb, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010", *dst_extra],
                    name="node-a", env=dst_env).start()
    nb = PytierNode(tb, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p", "udp://198.18.1.1:11010",
                            *src_extra], name="node-b").start()
    nb.wait_route("10.144.144.1")
    return na, nb


def rows(node: PytierNode, transport: str) -> list[dict[str, object]]:
    return [r for r in node.cli("proxy") if r["transport_type"] == transport]


def test_kcp_transfer_clean_link_rows_on_both_sides(testbed: Testbed) -> None:
    na, nb = pair(testbed, KCP, [])
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, na.ns, nb.ns, "10.144.144.1", 50 * MIB)
    assert sent == 50 * MIB and sha_received == sha_sent
    src_rows, dst_rows = rows(nb, "Kcp"), rows(na, "Kcp")
    assert len(src_rows) == 1 and len(dst_rows) == 1
    for row in (src_rows[0], dst_rows[0]):
        assert str(row["src"]).startswith("10.144.144.2:") and row["dst"] == "10.144.144.1:5201"
        assert row["tx_bytes"] == 50 * MIB
    table = nb.cli_table("proxy")
    assert "Kcp" in table and "10.144.144.1:5201" in table and "UTC" in table
    # Rows go shortly after their connection closed.
    wait_for(lambda: nb.cli("proxy") == [] and na.cli("proxy") == [], 15, "closed rows to go")


def test_kcp_with_10_percent_loss_and_delay(testbed: Testbed) -> None:
    link = testbed.linked_pair(delay_ms=10, loss_pct=10, rate_mbit=100, queue_ms=50, seed=3)
    na = PytierNode(testbed, link.a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, link.b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                      f"udp://{link.ip_a}:11010", *KCP], name="node-b").start()
    nb.wait_route("10.144.144.1", timeout=40)
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, na.ns, nb.ns, "10.144.144.1", 50 * MIB,
                                                   timeout=200)
    assert sent == 50 * MIB and sha_received == sha_sent
    assert len(rows(na, "Kcp")) == 1


def test_kcp_through_a_relay(testbed: Testbed) -> None:
    a, b, c = testbed.netns("a"), testbed.netns("b"), testbed.netns("c")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(b, c, "198.18.2.2/24", "198.18.2.3/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "-l", "udp://0.0.0.0:11010", "-p",
                                 "udp://198.18.1.1:11010"], name="node-b").start()
    nc = PytierNode(testbed, c, [*NET, "-i", "10.144.144.3/24", "--no-listener", "-p", "udp://198.18.2.2:11010",
                                 *KCP], name="node-c").start()
    nc.wait_route("10.144.144.1")
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, na.ns, nc.ns, "10.144.144.1", 50 * MIB)
    assert sent == 50 * MIB and sha_received == sha_sent
    assert len(rows(nc, "Kcp")) == 1 and len(rows(na, "Kcp")) == 1
    assert nb.cli("proxy") == []  # the relay only forwarded KCP packets


_MANY = r"""
import hashlib, socket, sys, threading
n, ip, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ok = []
def one(i):
    payload = hashlib.sha256(str(i).encode()).digest() * 64
    s = socket.create_connection((ip, port), timeout=60)
    s.sendall(payload); s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = s.recv(65536)
        if not b: break
        got += b
    ok.append(got == payload[::-1])
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join(90)
print(sum(ok), len(ok))
"""

_REVERSER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(512); print("listening", flush=True)
def serve(c):
    data = b""
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
    c.sendall(data[::-1]); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def start_reverser(tb: Testbed, ns: Netns, ip: str, port: int) -> None:
    proc = tb.popen(ns, [sys.executable, "-c", _REVERSER, ip, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"


def test_200_concurrent_connections(testbed: Testbed) -> None:
    na, nb = pair(testbed, KCP, [])
    start_reverser(testbed, na.ns, "10.144.144.1", 7000)
    out = nb.ns.run([sys.executable, "-c", _MANY, "200", "10.144.144.1", "7000"], timeout=120).stdout
    assert out.split() == ["200", "200"]
    wait_for(lambda: len(rows(na, "Kcp")) >= 200, 10, "200 Kcp rows on the destination")


def test_disable_kcp_input_falls_back_to_plain_tcp(testbed: Testbed) -> None:
    na, nb = pair(testbed, KCP, ["--disable-kcp-input"])
    assert "kcp_input" not in next(r for r in nb.cli("route") if r["ipv4"] == "10.144.144.1")["features"]
    _, sha_sent, sha_received, _ = tcp_transfer(testbed, na.ns, nb.ns, "10.144.144.1", 5 * MIB)
    assert sha_received == sha_sent
    assert len(rows(nb, "Tcp")) == 1 and rows(nb, "Kcp") == []
    assert na.cli("proxy") == []


def test_node_without_feature_flags_gets_plain_tcp(testbed: Testbed) -> None:
    na, nb = pair(testbed, KCP, [], dst_env={LEGACY_ADVERTISEMENT_ENV: "1"})
    assert next(r for r in nb.cli("route") if r["ipv4"] == "10.144.144.1")["features"] == []
    _, sha_sent, sha_received, _ = tcp_transfer(testbed, na.ns, nb.ns, "10.144.144.1", 5 * MIB)
    assert sha_received == sha_sent
    assert len(rows(nb, "Tcp")) == 1 and rows(nb, "Kcp") == []


_CONNECT = r"""
import socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    print("connected")
except OSError as e:
    print(e.errno, round(time.monotonic() - t, 2))
"""


def test_refused_destination_reaches_the_client_as_refused(testbed: Testbed) -> None:
    na, nb = pair(testbed, KCP, [])
    out = nb.ns.run([sys.executable, "-c", _CONNECT, "10.144.144.1", "7999"], timeout=30).stdout.split()
    assert out[0] == str(errno.ECONNREFUSED), out
    assert float(out[1]) < 5
    wait_for(lambda: "cannot connect" in na.log(), 5, "the destination to log why")


def test_icmp_and_own_address_not_intercepted(testbed: Testbed) -> None:
    na, nb = pair(testbed, KCP, [])
    assert ping("10.144.144.1", count=3, interval=0.2, timeout=2, netns=nb.ns).received >= 2
    # TCP to the node's own virtual address stays local.
    _, sha_sent, sha_received, _ = tcp_transfer(testbed, nb.ns, nb.ns, "10.144.144.2", MIB, port=7002)
    assert sha_received == sha_sent
    time.sleep(0.5)
    assert nb.cli("proxy") == [] and na.cli("proxy") == []


_HOLD = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(b"hello"); print("open", flush=True)
t = time.monotonic()
try:
    print("eof" if c.recv(10) == b"" else "data", round(time.monotonic() - t, 2), flush=True)
except OSError as e:
    print("error", round(time.monotonic() - t, 2), flush=True)
"""


def test_node_going_away_closes_streams_on_the_other_side(testbed: Testbed) -> None:
    na, nb = pair(testbed, KCP, [])
    start_reverser(testbed, na.ns, "10.144.144.1", 7003)
    client = testbed.popen(nb.ns, [sys.executable, "-c", _HOLD, "10.144.144.1", "7003"],
                           stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None and client.stdout.readline().strip() == "open"
    wait_for(lambda: [r["state"] for r in rows(na, "Kcp")] == ["Connected"], 10, "a live Kcp row on A")
    assert nb.stop() == 0
    started = time.monotonic()
    wait_for(lambda: [r["state"] for r in rows(na, "Kcp")] in ([], ["Closed"]), 10, "A to close the stream")
    assert time.monotonic() - started < 5
    # The local client on the node that went away was told too (reset before its TUN went).
    client.wait(10)
    assert client.stdout.read().split()[0] in ("error", "eof")
