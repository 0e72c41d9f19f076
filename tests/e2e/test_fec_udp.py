"""--enable-fec-udp end to end: two pytier nodes over one UDP tunnel with 10 % random loss each way
(nft on each input hook). A has the flag, B does not, so in one run A's stream to B is protected and
B's stream to A is not: the first arrives >= 99.5 %, the second near 90 %. Once the loss is gone,
A's controller turns FEC off and no more parity goes out."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from pytier.testbed.netns import Netns, Testbed, nft_clear_loss, nft_input_loss
from pytier.testbed.nodes import PytierNode, wait_for
from pytier.testbed.udp_stream import result, start_receiver, start_sender

NET = ["--network-name", "fec", "--network-secret", "fec-secret"]
A_IP, B_IP = "10.144.144.1", "10.144.144.2"
RATE = 500
WARMUP = 1000  # 2 s for the controller to measure the loss and pick a shape
MEASURED = 2000
SIZE = 1200


def receiver(tb: Testbed, ns: Netns, port: int, first: int, count: int) -> subprocess.Popen[str]:
    return start_receiver(tb, ns, port, first, count)


def sender(tb: Testbed, ns: Netns, ip: str, port: int, count: int) -> subprocess.Popen[str]:
    return start_sender(tb, ns, ip, port, count, RATE, SIZE)


def peer_row(node: PytierNode) -> dict[str, Any]:
    [row] = node.cli("peer")
    return dict(row)


def test_fec_recovers_udp_under_random_loss_and_turns_off_when_clean(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    link = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "--ipv4", f"{A_IP}/24", "--listeners", "udp://0.0.0.0:11010",
                                 "--enable-fec-udp"], name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "--ipv4", f"{B_IP}/24", "--no-listener",
                                 "--peers", "udp://198.18.1.1:11010"], name="node-b").start()
    na.wait_route(B_IP)
    nb.wait_route(A_IP)
    assert peer_row(na)["fec"] == "off"

    nft_input_loss(a, link.ifname_a, 10)
    nft_input_loss(b, link.ifname_b, 10)
    to_b = receiver(testbed, b, 5001, WARMUP, MEASURED)
    to_a = receiver(testbed, a, 5002, WARMUP, MEASURED)
    senders = [sender(testbed, a, B_IP, 5001, WARMUP + MEASURED),
               sender(testbed, b, A_IP, 5002, WARMUP + MEASURED)]
    for proc in senders:
        assert proc.wait(timeout=30) == 0
    protected, plain = result(to_b)["received"], result(to_a)["received"]
    assert protected >= 0.995 * MEASURED, (protected, plain)
    assert plain <= 0.95 * MEASURED, (protected, plain)

    row_a, row_b = peer_row(na), peer_row(nb)
    assert row_a["fec"] != "off" and row_a["fec_tx_parity"] > 0, row_a
    assert row_b["fec_recovered"] > 0, row_b
    # B never had the flag: its stream to A went as plain Data, with no FEC state toward A.
    assert row_b["fec"] == "off" and "fec_tx_parity" not in row_b, row_b
    stats = na.cli("stats")
    assert stats["fec_tx_parity_frames"] == row_a["fec_tx_parity"]
    assert "FEC shape off ->" in na.log()

    nft_clear_loss(a, link.ifname_a)
    nft_clear_loss(b, link.ifname_b)
    clean = sender(testbed, a, B_IP, 5003, 30 * RATE)
    try:
        wait_for(lambda: peer_row(na)["fec"] == "off", 20, "A's controller to turn FEC off on the clean path")
        settled = peer_row(na)["fec_tx_parity"]
        time.sleep(1.5)
        assert clean.poll() is None, "the clean stream ended before the check"
        assert peer_row(na)["fec_tx_parity"] == settled
    finally:
        clean.kill()
        clean.wait(timeout=5)
    assert "-> off" in na.log()
