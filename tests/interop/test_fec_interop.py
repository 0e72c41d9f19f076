"""FEC in a mixed network: two pytier nodes with --enable-fec-udp and --enable-fec-kcp (and the KCP
proxy) and the real EasyTier 2.6.4 core (KCP proxy too), each connected to the other two over UDP.
The pytier nodes advertise FEC in a field EasyTier skips and send FEC frames only to each other: the
lossy UDP stream between them recovers, a TCP transfer between them goes through the KCP lane, the
EasyTier node decodes their route info with exactly the flags it knows, keeps ping and KCP-proxied
TCP with both (it gets plain KcpSrc/KcpDst), and reports no error; neither pytier node holds any FEC
state toward it."""

from __future__ import annotations

import pytest

from pytier.testbed.netns import Testbed, nft_clear_loss, nft_input_loss
from pytier.testbed.nodes import EasyTierNode, PytierNode, route_ipv4, tcp_transfer
from pytier.testbed.ping import ping
from pytier.testbed.udp_stream import result, start_receiver, start_sender

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

NET = ["--network-name", "fecmix", "--network-secret", "fecmix-secret"]
FEC = ["--enable-fec-udp", "--enable-kcp-proxy", "--enable-fec-kcp"]
A_IP, B_IP, E_IP = "10.144.144.1", "10.144.144.2", "10.144.144.3"
WARMUP, MEASURED, RATE = 1000, 1500, 500


def test_mixed_network_with_fec_keeps_easytier_whole(testbed: Testbed) -> None:
    a, b, e = testbed.netns("a"), testbed.netns("b"), testbed.netns("e")
    ab = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(a, e, "198.18.2.1/24", "198.18.2.3/24")
    testbed.veth(b, e, "198.18.3.2/24", "198.18.3.3/24")
    et = EasyTierNode(testbed, e, name="et-e", ipv4=E_IP, listeners=["udp://0.0.0.0:11010"], peers=[],
                      network_name="fecmix", network_secret="fecmix-secret",
                      flags={"enable_kcp_proxy": True}).start()
    na = PytierNode(testbed, a, [*NET, "--ipv4", f"{A_IP}/24", "--listeners", "udp://0.0.0.0:11010",
                                 "--peers", "udp://198.18.2.3:11010", *FEC],
                    name="py-a").start()
    nb = PytierNode(testbed, b, [*NET, "--ipv4", f"{B_IP}/24", "--no-listener", *FEC,
                                 "--peers", "udp://198.18.1.1:11010", "--peers", "udp://198.18.3.3:11010"],
                    name="py-b").start()
    for node, ip in ((na, B_IP), (na, E_IP), (nb, A_IP), (nb, E_IP)):
        node.wait_route(ip)
    for node, ip in ((na, A_IP), (nb, B_IP)):
        route = et.wait_route(ip, timeout=20)
        # EasyTier decoded the pytier nodes' flags, skipping the FEC field it does not know.
        decoded = {n for n, on in (route.get("feature_flag") or {}).items() if on}
        assert decoded == set(node.cli("node")["features"])

    nft_input_loss(a, ab.ifname_a, 10)
    nft_input_loss(b, ab.ifname_b, 10)
    rx = start_receiver(testbed, b, 5001, WARMUP, MEASURED)
    tx = start_sender(testbed, a, B_IP, 5001, WARMUP + MEASURED, RATE, 1200)
    assert tx.wait(timeout=30) == 0
    got = result(rx)["received"]
    assert got >= 0.99 * MEASURED, got
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, a, b, A_IP, 4 << 20, timeout=30)
    assert sent == 4 << 20 and sha_received == sha_sent
    assert nb.cli("stats")["fec_kcp_tx_packets"] > 0
    # clean from here, so that conversation's last packets are through before E's transfers
    nft_clear_loss(a, ab.ifname_a)
    nft_clear_loss(b, ab.ifname_b)

    e_id, a_id = et.peer_id, na.cli("node")["peer_id"]
    rows_b = {r["peer_id"]: r for r in nb.cli("peer")}
    assert rows_b[a_id]["fec_recovered"] > 0, rows_b[a_id]
    for node in (na, nb):
        [toward_e] = [r for r in node.cli("peer") if r["peer_id"] == e_id]
        assert toward_e["fec"] is None and "fec_tx_data" not in toward_e, toward_e

    for src, ip in ((e, A_IP), (e, B_IP), (a, E_IP), (b, E_IP)):
        r = ping(ip, count=4, interval=0.2, timeout=2, netns=src)
        assert r.received >= 3, f"ping {ip}: {r}"
    kcp_before = na.cli("stats").get("fec_kcp_tx_packets", 0), nb.cli("stats")["fec_kcp_tx_packets"]
    for server, client, ip, node in ((a, e, A_IP, na), (e, b, E_IP, nb)):
        # EasyTier's KCP proxy carries no half-close: the sink answers after the bytes
        sent, sha_sent, sha_received, _ = tcp_transfer(testbed, server, client, ip, 2 << 20, timeout=30,
                                                       half_close=False)
        assert sent == 2 << 20 and sha_received == sha_sent
        assert any(r["transport_type"] == "Kcp" for r in node.cli("proxy")), node.cli("proxy")
    # the KCP conversations with EasyTier went plain: the KCP lane carried nothing more
    kcp_after = na.cli("stats").get("fec_kcp_tx_packets", 0), nb.cli("stats")["fec_kcp_tx_packets"]
    assert kcp_after == kcp_before, (kcp_before, kcp_after)
    assert et.query("latest_error") is None
    assert {p["peer_id"] for p in et.query("peers")} == {a_id, nb.cli("node")["peer_id"]}
    assert {route_ipv4(r) for r in et.routes()} == {A_IP, B_IP}
