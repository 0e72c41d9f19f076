"""50 MiB through the KCP and the QUIC proxy on the named real-path scenarios, byte for byte.

Two pytier-core processes on each side of the link emulator, set as bench/path_scenarios.py sets it
(pytier.testbed.scenarios); a kernel TCP client on the source node sends 50 MiB of seeded random
bytes to a sink on the destination's virtual address, and both ends hash what crossed. While the
transfer runs, the source's proxy table must show it carried by the transport under test.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_kcp_proxy import NET, rows  # tests/e2e is on sys.path (pytest's prepend import mode)

from pytier.testbed.netns import EmulatedLink, Testbed
from pytier.testbed.nodes import PytierNode, tcp_transfer, wait_for
from pytier.testbed.scenarios import SCENARIOS

MIB = 1024 * 1024
SIZE = 50 * MIB
TIMEOUT_S = 120.0
FLAGS = {"Kcp": ["--enable-kcp-proxy"], "Quic": ["--enable-quic-proxy"]}
PHASE_AT_S = (2.0, 5.0)  # after the transfer starts, for the scenario with phases


def nodes(tb: Testbed, link: EmulatedLink, transport: str) -> tuple[PytierNode, PytierNode]:
    """Destination A (10.144.144.1) listening, source B (10.144.144.2) proxying through `transport`."""
    na = PytierNode(
        tb, link.a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"], name="node-a"
    ).start()
    nb = PytierNode(
        tb,
        link.b,
        [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p", f"udp://{link.ip_a}:11010", *FLAGS[transport]],
        name="node-b",
    ).start()
    nb.wait_route("10.144.144.1", timeout=40)
    return na, nb


CASES = [(t, s) for t in FLAGS for s in ("policed", "bursty", "long", "reorder", "loss-change")]


@pytest.mark.parametrize(("transport", "scenario"), CASES, ids=[f"{t.lower()}-{s}" for t, s in CASES])
def test_50_mib_arrives_intact(testbed: Testbed, transport: str, scenario: str) -> None:
    link = testbed.linked_pair(params=SCENARIOS[scenario].emulator, seed=CASES.index((transport, scenario)))
    na, nb = nodes(testbed, link, transport)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        transfer = pool.submit(tcp_transfer, testbed, na.ns, nb.ns, "10.144.144.1", SIZE, timeout=TIMEOUT_S)
        row = wait_for(lambda: next(iter(rows(nb, transport)), None), 20, f"a {transport} row on the source")
        assert row["dst"] == "10.144.144.1:5201"
        assert transport in nb.cli_table("proxy")
        for at in PHASE_AT_S if link.params.phases else ():
            time.sleep(max(0.0, started + at - time.monotonic()))
            assert not transfer.done(), "the transfer ended before the path changed"
            link.next_phase()
        sent, sha_sent, sha_received, took = transfer.result(TIMEOUT_S + 30)
    print(f"{transport} {scenario}: {SIZE / MIB:.0f} MiB in {took:.1f} s")
    assert sent == SIZE and sha_received == sha_sent
