"""/metrics end to end: two real nodes in namespaces, a real TCP connection through the KCP proxy held
open while both nodes are scraped over HTTP, the text read with prometheus_client's parser."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import BIN, PytierNode, wait_for

NET = ["--network-name", "demo", "--network-secret", "s3"]
METRICS = ["--metrics-listen", "127.0.0.1:9110"]
MIB = 1024 * 1024
SENT = 4 * MIB

_FETCH = r"""
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.status); print(r.headers["Content-Type"]); sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
"""

_SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(30); n = 0
while b := c.recv(65536):
    n += len(b)
print(n, flush=True)
"""

# Sends its bytes, then holds the connection open until told (a line on stdin) or 30 s pass.
_SOURCE = r"""
import select, socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(b"x" * int(sys.argv[3])); print("sent", flush=True)
select.select([sys.stdin], [], [], 30); c.close()
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(ns: Netns, path: str = "/metrics") -> tuple[int, str, str]:
    out = ns.run([sys.executable, "-c", _FETCH, f"http://127.0.0.1:9110{path}"]).stdout
    status, _, rest = out.partition("\n")
    content_type, _, body = rest.partition("\n")
    return int(status), content_type, body


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metrics(ns: Netns) -> Samples:
    status, content_type, body = scrape(ns)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), (status, content_type)
    return parse(body)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def test_metrics_while_a_kcp_connection_is_open(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010", *METRICS],
               name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p", "udp://198.18.1.1:11010",
                                 "--enable-kcp-proxy", *METRICS], name="node-b").start()
    nb.wait_route("10.144.144.1")
    before = metrics(b)
    tx_before = total(before, "pytier_peer_tx_bytes_total", tunnel="udp")

    sink = testbed.popen(a, [sys.executable, "-c", _SINK, "10.144.144.1", "7001"], stdout=subprocess.PIPE,
                         text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
    source = testbed.popen(b, [sys.executable, "-c", _SOURCE, "10.144.144.1", "7001", str(SENT)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert source.stdout is not None and source.stdout.readline().strip() == "sent"

    # The bytes left the client's socket; wait for them to be carried, then read both nodes mid-connection.
    def carried() -> Samples | None:
        now = metrics(b)
        kcp_tx = total(now, "pytier_proxy_bytes_total", transport="Kcp", direction="tx")
        return now if kcp_tx >= SENT else None

    during = wait_for(carried, 15, "the KCP connection's bytes in node-b's metrics")
    assert total(during, "pytier_proxy_connections", transport="Kcp", state="Connected") == 1
    assert total(during, "pytier_proxy_connections_total", transport="Kcp") == 1
    assert total(during, "pytier_proxy_connections_total", transport="Tcp") == 0
    peer_b = {"hostname": "node-a", "tunnel": "udp", "ipv4": "10.144.144.1"}
    assert total(during, "pytier_peer_tx_bytes_total", **peer_b) - tx_before >= SENT
    assert total(during, "pytier_peer_tx_packets_total", **peer_b) >= SENT // 1400
    assert total(during, "pytier_peer_rx_packets_total", **peer_b) > 0
    assert total(during, "pytier_peer_tunnels") == 1
    assert 0 <= total(during, "pytier_peer_loss_ratio", **peer_b) <= 1
    at_a = metrics(a)
    assert total(at_a, "pytier_proxy_connections", transport="Kcp", state="Connected") == 1
    assert total(at_a, "pytier_peer_rx_bytes_total", hostname="node-b") >= SENT

    assert source.stdin is not None
    source.stdin.write("done\n")
    source.stdin.close()
    source.wait(15)
    assert int(sink.communicate(timeout=15)[0].strip()) == SENT

    # The same text through the management API, as `pytier-cli stats prometheus` prints it; every
    # counter of `pytier-cli stats` is in it (counters only appear, so the earlier call's are a subset).
    stats = nb.cli("stats")
    from_cli = parse(nb.ns.run([str(BIN / "pytier-cli"), "stats", "prometheus"]).stdout)
    assert {n for n, _ in from_cli} == {n for n, _ in metrics(b)}
    assert total(from_cli, "pytier_node_info", hostname="node-b") == 1
    events = {dict(labels)["name"]: v for (n, labels), v in from_cli.items()
              if n == "pytier_node_events_total"}
    assert stats and set(stats) <= set(events)
    assert all(events[k] >= v for k, v in stats.items())
    assert scrape(b, "/")[0] == 404
