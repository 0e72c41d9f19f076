"""Connection churn and a dying destination, through the KCP and QUIC proxies: real pytier-core nodes in
namespaces, every byte checked by pytier.testbed.tcpload (sha256 of what arrived against what should)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import PytierNode, wait_for

NET = ["--network-name", "churn", "--network-secret", "s3"]
VIP_A = "10.144.144.1"
PORT = 7100
CHURN = 500
# A connection whose destination node died must end (RST or EOF) within this; an upper bound on
# hanging, not a speed target: KCP's dead-link and idle timers, QUIC's idle timeout and the peer
# timeout all fire well before it.
HANG_BOUND_S = 90.0


def pair(tb: Testbed, proxy: str, *src_extra: str) -> tuple[PytierNode, PytierNode]:
    a, b = tb.netns("a"), tb.netns("b")
    tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(tb, a, [*NET, "-i", f"{VIP_A}/24", "-l", "udp://0.0.0.0:11010"], name="node-a").start()
    nb = PytierNode(tb, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p", "udp://198.18.1.1:11010",
                            f"--enable-{proxy}-proxy", *src_extra], name="node-b").start()
    nb.wait_route(VIP_A)
    return na, nb


def start_server(tb: Testbed, ns: Netns) -> None:
    proc = tb.popen(ns, [sys.executable, "-m", "pytier.testbed.tcpload", "server", "--bind", VIP_A,
                         "--port", str(PORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"


def load(ns: Netns, *args: str, timeout: float) -> list[dict[str, object]]:
    argv = [sys.executable, "-m", "pytier.testbed.tcpload", "client", "--host", VIP_A, "--port", str(PORT)]
    out = ns.run([*argv, *args], timeout=timeout).stdout
    return [json.loads(line) for line in str(out).splitlines() if line.strip()]


def fds(node: PytierNode) -> int:
    assert node.proc is not None
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


@pytest.mark.parametrize("proxy", ["kcp", "quic"])
def test_sequential_connections_leave_nothing_behind(testbed: Testbed, proxy: str) -> None:
    na, nb = pair(testbed, proxy)
    start_server(testbed, na.ns)
    assert load(nb.ns, "--count", "10", timeout=60)[-1]["summary"] == {"complete": 10}
    wait_for(lambda: na.cli("proxy") == [] and nb.cli("proxy") == [], 20, "warm-up rows to go")
    fds_start = fds(na), fds(nb)
    result = load(nb.ns, "--count", str(CHURN), "--first-id", "100", timeout=240)[-1]
    assert result["summary"] == {"complete": CHURN}
    wait_for(lambda: na.cli("proxy") == [] and nb.cli("proxy") == [], 20, "every row to go")
    assert (fds(na), fds(nb)) == fds_start


def test_destination_node_killed_mid_transfer(testbed: Testbed) -> None:
    # KCP here; bench/soak.py does this (and more) to both proxies a hundred times. A short peer
    # timeout keeps the test short; without it the transports' own timers end the connections.
    na, nb = pair(testbed, "kcp", "--peer-timeout", "5")
    start_server(testbed, na.ns)
    client = testbed.popen(nb.ns, [sys.executable, "-m", "pytier.testbed.tcpload", "client", "--host", VIP_A,
                                   "--port", str(PORT), "--count", "4", "--concurrency", "4", "--up",
                                   str(200 << 20), "--down", str(200 << 20), "--per-conn", "--timeout",
                                   str(HANG_BOUND_S + 60)], stdout=subprocess.PIPE, text=True)
    def moving() -> bool:
        return sum(1 for r in nb.cli("proxy") if r["state"] == "Connected" and int(r["rx_bytes"]) > 0) == 4

    wait_for(moving, 30, "four connections moving data")
    killed_at = time.monotonic()
    na.stop(signal.SIGKILL)
    out, _ = client.communicate(timeout=HANG_BOUND_S + 90)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    conns = [line for line in lines if "outcome" in line]
    assert len(conns) == 4
    for conn in conns:
        # Ended by the failure (not complete: 200 MiB cannot have crossed), and what did arrive is
        # exactly the start of what was sent.
        assert conn["outcome"] in ("reset", "eof"), conn
        assert conn["prefix_ok"] is True and int(conn["received"]) > 0, conn
    assert time.monotonic() - killed_at < HANG_BOUND_S + 5
    wait_for(lambda: nb.cli("proxy") == [], 20, "the source's rows to go")


def test_stopping_the_source_node_with_connections_open_logs_no_traceback(testbed: Testbed) -> None:
    na, nb = pair(testbed, "kcp")
    start_server(testbed, na.ns)
    client = testbed.popen(nb.ns, [sys.executable, "-m", "pytier.testbed.tcpload", "client", "--host", VIP_A,
                                   "--port", str(PORT), "--count", "20", "--concurrency", "20", "--hold"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None and client.stdin is not None
    assert json.loads(client.stdout.readline()) == {"held": 20, "failed": 0}
    assert nb.stop() == 0
    client.stdin.write("\n")
    client.stdin.flush()
    client.communicate(timeout=30)
    assert "Traceback" not in nb.log()
