"""--enable-fec-kcp end to end: two pytier nodes over one UDP tunnel with 20 % random loss each way
(nft on each input hook), the KCP proxy on both. A 50 MiB TCP transfer through the proxy arrives
byte-identical, the KCP lane really sends parity and really rebuilds lost packets, and KCP resends a
smaller share of its segments than the same transfer's first 10 MiB did without FEC."""

from __future__ import annotations

from typing import Any

from pytier.testbed.netns import Testbed, nft_input_loss
from pytier.testbed.nodes import PytierNode, tcp_transfer

NET = ["--network-name", "feckcp", "--network-secret", "feckcp-secret"]
A_IP, B_IP = "10.144.144.1", "10.144.144.2"
MIB = 1024 * 1024
LOSS = 20


def pair(tb: Testbed, tag: str, extra: list[str]) -> tuple[PytierNode, PytierNode]:
    """A (10.144.144.1) listening, B (10.144.144.2) connecting, KCP proxy on both, LOSS % each way."""
    a, b = tb.netns(f"a{tag}"), tb.netns(f"b{tag}")
    link = tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    flags = ["--enable-kcp-proxy", *extra]
    na = PytierNode(tb, a, [*NET, "--ipv4", f"{A_IP}/24", "--listeners", "udp://0.0.0.0:11010", *flags],
                    name=f"node-a{tag}").start()
    nb = PytierNode(tb, b, [*NET, "--ipv4", f"{B_IP}/24", "--no-listener", "--peers",
                            "udp://198.18.1.1:11010", *flags], name=f"node-b{tag}").start()
    na.wait_route(B_IP)
    nb.wait_route(A_IP)
    nft_input_loss(a, link.ifname_a, LOSS)
    nft_input_loss(b, link.ifname_b, LOSS)
    return na, nb


def transfer(tb: Testbed, na: PytierNode, nb: PytierNode, nbytes: int) -> dict[str, Any]:
    """B's client sends `nbytes` to A's sink through B's KCP proxy; B's row (the data's sender)."""
    sent, sha_sent, sha_received, took = tcp_transfer(tb, na.ns, nb.ns, A_IP, nbytes, timeout=120)
    assert sent == nbytes and sha_received == sha_sent
    [row] = [r for r in nb.cli("proxy") if r["transport_type"] == "Kcp"]
    return {**row, "seconds": round(took, 1)}


def peer_row(node: PytierNode) -> dict[str, Any]:
    [row] = node.cli("peer")
    return dict(row)


def test_kcp_through_fec_at_20_percent_loss(testbed: Testbed) -> None:
    na, nb = pair(testbed, "0", [])
    plain = transfer(testbed, na, nb, 10 * MIB)
    assert "fec_kcp_tx_packets" not in nb.cli("stats")
    na.stop()
    nb.stop()

    na, nb = pair(testbed, "1", ["--enable-fec-kcp"])
    protected = transfer(testbed, na, nb, 50 * MIB)
    row_a, row_b = peer_row(na), peer_row(nb)
    stats_a, stats_b = na.cli("stats"), nb.cli("stats")
    print(f"without FEC (10 MiB): {plain}\nwith FEC (50 MiB): {protected}\nB peer: {row_b}\n"
          f"A stats: {stats_a}\nB stats: {stats_b}")
    assert row_b["fec"] != "off" and row_b["fec_tx_parity"] > 0, row_b
    assert stats_b["fec_kcp_tx_parity_frames"] > 0 and stats_b["fec_kcp_tx_packets"] > 0, stats_b
    assert stats_a["fec_kcp_rx_recovered"] > 0 and row_a["fec_recovered"] > 0, (stats_a, row_a)
    assert "fec_kcp_rx_malformed" not in stats_a and "fec_tx_too_big" not in stats_b
    assert "FEC shape off ->" in nb.log()
    # the proxy row says what protected the conversation; without the flag it has no such field
    assert protected["fec"] == row_b["fec_kcp"] != "off" and "fec" not in plain, (protected, plain)
    share_plain = plain["retrans"] / plain["segments_sent"]
    share_fec = protected["retrans"] / protected["segments_sent"]
    assert share_fec < share_plain, (share_fec, share_plain)
