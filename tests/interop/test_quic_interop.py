"""The QUIC proxy between pytier and the real EasyTier core (easytier-pyo3), in both directions.

What crosses is EasyTier's null-crypto QUIC (QuicSrc/QuicDst peer packets, SeaHash tags, raw transport
parameters in CRYPTO frames, u16-length KcpConnData stream header): 20 MiB whose sha256 must survive,
and the Quic row the pytier side shows for the connection.
"""

from __future__ import annotations

import pytest

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import EasyTierNode, PytierNode, tcp_transfer, wait_for

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

NET = ["--network-name", "mixed", "--network-secret", "mixed-secret"]
MIB = 1024 * 1024


def two(tb: Testbed) -> tuple[Netns, Netns]:
    a, b = tb.netns("a"), tb.netns("b")
    tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    return a, b


def quic_rows(node: PytierNode) -> list[dict[str, object]]:
    return [r for r in node.cli("proxy") if r["transport_type"] == "Quic"]


def test_pytier_source_to_easytier_destination(testbed: Testbed) -> None:
    a, b = two(testbed)
    et = EasyTierNode(testbed, a, name="et-a", ipv4="10.144.144.1/24", listeners=["udp://0.0.0.0:11010"],
                      peers=[], network_name="mixed", network_secret="mixed-secret").start()
    py = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p", "udp://198.18.1.1:11010",
                                 "--enable-quic-proxy"], name="py-b").start()
    py.wait_route("10.144.144.1", timeout=30)
    assert "quic_input" in next(r for r in py.cli("route") if r["ipv4"] == "10.144.144.1")["features"]
    wait_for(lambda: b.run(["ip", "route", "get", "10.144.144.1"], check=False).returncode == 0, 10, "route")
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, a, b, "10.144.144.1", 20 * MIB, timeout=120,
                                                   half_close=False)
    assert sent == 20 * MIB and sha_received == sha_sent
    rows = quic_rows(py)
    assert len(rows) == 1 and rows[0]["dst"] == "10.144.144.1:5201" and rows[0]["tx_bytes"] == 20 * MIB
    assert "Traceback" not in py.log()
    et.stop()


def test_easytier_source_to_pytier_destination(testbed: Testbed) -> None:
    a, b = two(testbed)
    py = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="py-a").start()
    et = EasyTierNode(testbed, b, name="et-b", ipv4="10.144.144.2/24", listeners=[],
                      peers=["udp://198.18.1.1:11010"], network_name="mixed", network_secret="mixed-secret",
                      flags={"enable_quic_proxy": True}).start()
    et.wait_route("10.144.144.1", timeout=30)
    assert et.route_for("10.144.144.1")["feature_flag"].get("quic_input") is True  # type: ignore[index]
    wait_for(lambda: b.run(["ip", "route", "get", "10.144.144.1"], check=False).returncode == 0, 10, "route")
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, a, b, "10.144.144.1", 20 * MIB, timeout=120,
                                                   half_close=False)
    assert sent == 20 * MIB and sha_received == sha_sent
    rows = quic_rows(py)
    assert len(rows) == 1 and rows[0]["dst"] == "10.144.144.1:5201" and rows[0]["tx_bytes"] == 20 * MIB
    assert "Traceback" not in py.log()
    et.stop()
