"""--proxy-transport auto end to end: two pytier nodes over one UDP tunnel, auto on the source B (with
--latency-first, whose pings every 0.1 s fill the 32-ping window in about 5 s). On the clean veth a
new connection goes as plain TCP once the window has proven the path (before that, a bulk one goes
over QUIC); after 10 % random loss on both input hooks shows in B's measurement, the next bulk
connection goes over QUIC and one to the ssh port over KCP. Every transfer arrives byte-identical,
and B's rows (JSON and table) say what was measured and why."""

from __future__ import annotations

import time
from typing import Any

from pytier.testbed.netns import Testbed, nft_input_loss
from pytier.testbed.nodes import PytierNode, tcp_transfer, wait_for

NET = ["--network-name", "auto", "--network-secret", "auto-secret"]
A_IP, B_IP = "10.144.144.1", "10.144.144.2"
MIB = 1024 * 1024


def send(tb: Testbed, na: PytierNode, nb: PytierNode, port: int, nbytes: int) -> dict[str, Any]:
    """B sends `nbytes` to a sink on A at `port`; B's row of that connection."""
    sent, sha_sent, sha_received, _ = tcp_transfer(tb, na.ns, nb.ns, A_IP, nbytes, port=port, timeout=60)
    assert sent == nbytes and sha_received == sha_sent
    [row] = [r for r in nb.cli("proxy") if r["dst"] == f"{A_IP}:{port}" and r["src"].startswith(B_IP)]
    return dict(row)


def test_auto_goes_plain_on_a_clean_link_and_quic_or_kcp_under_loss(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    link = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "--ipv4", f"{A_IP}/24", "--listeners", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "--ipv4", f"{B_IP}/24", "--no-listener", "--peers",
                                 "udp://198.18.1.1:11010", "--proxy-transport", "auto", "--latency-first"],
                    name="node-b").start()
    nb.wait_route(A_IP)
    na.wait_route(B_IP)

    # Until the window is full the path is unproven and goes through a proxy: QUIC for bulk.
    rows = []
    for port in range(5300, 5320):
        rows.append(send(testbed, na, nb, port, 256 * 1024))
        if rows[-1]["transport_type"] == "Tcp":
            break
        assert rows[-1]["transport_type"] == "Quic" and "quic (not measured yet" in rows[-1]["why"], rows[-1]
        time.sleep(0.5)
    clean = send(testbed, na, nb, 5320, 4 * MIB)
    print(f"before: {rows}\nclean: {clean}")
    assert clean["transport_type"] == "Tcp", clean
    assert clean["why"].startswith("auto: 0.0% loss, ") and clean["why"].endswith(": tcp (clean short path)")
    table = nb.cli_table("proxy")
    assert "why" in table and "tcp (clean short path)" in table

    nft_input_loss(a, link.ifname_a, 10)
    nft_input_loss(b, link.ifname_b, 10)
    wait_for(lambda: any(p.get("loss_rate", 0) > 0 for p in nb.cli("peer")), 20, "B to see the loss")
    bulk = send(testbed, na, nb, 5321, 4 * MIB)
    ssh = send(testbed, na, nb, 22, 256 * 1024)
    print(f"lossy: {bulk}\n{ssh}")
    assert bulk["transport_type"] == "Quic", bulk
    assert bulk["why"].endswith(": quic (lossy path; bulk)"), bulk
    assert ssh["transport_type"] == "Kcp", ssh
    assert ssh["why"].endswith(": kcp (lossy path; interactive port 22)"), ssh
    assert not bulk["why"].startswith("auto: 0.0% loss")
