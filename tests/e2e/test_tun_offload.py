"""TUN offload end to end: pytier hands the kernel coalesced 64 KB TCP super-segments (and, with
--tun-offload tso, takes the kernel's own and cuts them), and a 100 MiB transfer arrives byte for
byte in every mode."""

from __future__ import annotations

import logging
import select
import threading
import time
from ipaddress import IPv4Interface
from typing import Any

import pytest

from pytier.testbed.netns import Testbed
from pytier.testbed.nodes import PytierNode, tcp_transfer
from pytier.testbed.ping import icmp_checksum, ping
from pytier.tun.device import OFFLOADS, TunDevice
from pytier.tun.netlink import LinkConfig

NET = ["--network-name", "offload", "--network-secret", "s3"]
SIZE = 100 * 1024 * 1024


def stats(node: PytierNode) -> dict[str, Any]:
    return dict(node.cli("stats"))


@pytest.mark.parametrize("mode", ["coalesce", "tso", "off"])
def test_100mib_transfer_is_byte_identical(testbed: Testbed, mode: str) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.0.1/24", "198.18.0.2/24")
    extra = [] if mode == "coalesce" else ["--tun-offload", mode]
    na = PytierNode(testbed, a, [*NET, "--ipv4", "10.144.144.1/24", "--listeners", "udp://0.0.0.0:11010",
                                 *extra], name="off-a").start()
    nb = PytierNode(testbed, b, [*NET, "--ipv4", "10.144.144.2/24", "--no-listener",
                                 "--peers", "udp://198.18.0.1:11010", *extra], name="off-b").start()
    nb.wait_route("10.144.144.1")
    assert ping("10.144.144.1", count=2, interval=0.2, timeout=2, netns=b).received >= 1

    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, a, b, "10.144.144.1", SIZE, timeout=120)
    assert sent == SIZE
    assert sha_received == sha_sent

    want = {"coalesce": ["coalesce"], "tso": ["coalesce", "csum", "tso4", "tso_ecn"], "off": []}[mode]
    assert na.cli("node")["tun_offload"] == want
    assert nb.cli("node")["tun_offload"] == want
    sender, receiver = stats(nb), stats(na)
    if mode != "off":
        # The receiver wrote runs of the segments it got back to its kernel as super-segments.
        assert receiver.get("tun_tx_super_segments", 0) > 0
        assert receiver["tun_tx_merged_packets"] > 2 * receiver["tun_tx_super_segments"]
    if mode == "tso":
        # The sender's kernel handed over super-segments, cut here into wire-sized packets.
        assert sender.get("tun_rx_super_segments", 0) > 0
        assert sender["tun_rx_split_packets"] > 2 * sender["tun_rx_super_segments"]
    else:
        assert "tun_rx_super_segments" not in sender
    if mode == "off":
        assert "tun_tx_super_segments" not in receiver
    for counters in (sender, receiver):
        assert "tun_rx_offload_errors" not in counters
        assert "tun_write_drops" not in counters


def test_refused_offload_falls_back_to_plain_packets(testbed: Testbed,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An offload the kernel does not know is refused with EINVAL, as an old kernel refuses TSO: the
    device comes up plain, says so in one line, and carries packets without a virtio header."""
    ns = testbed.netns("t")
    unknown = 1 << 30
    with ns.enter(), caplog.at_level(logging.WARNING, logger="pytier.tun"):
        tun = TunDevice.open(testbed.name("tun"), offload=OFFLOADS | unknown)
    with tun, LinkConfig(tun.name, netns=ns.name) as link:
        assert tun.offload == 0
        assert tun.name == testbed.name("tun")
        refusals = [r.getMessage() for r in caplog.records if "offload" in r.getMessage()]
        assert len(refusals) == 1
        assert "refused" in refusals[0] and "plain packets" in refusals[0]
        link.set_up(1400)
        link.add_address(IPv4Interface("10.144.0.1/24"))
        ping("10.144.0.9", count=1, interval=0.2, timeout=1, netns=ns)  # nobody answers: it stays in the TUN
        packets = list(iter(tun.read, None))
        assert packets and all(p[0] == 0x45 for p in packets)  # an IPv4 header first, no virtio header
        link.cleanup()


def echo_reply(request: bytes) -> bytes | None:
    if len(request) < 28 or request[9] != 1 or request[20] != 8:
        return None
    ip = bytearray(request[:20])
    ip[12:16], ip[16:20] = request[16:20], request[12:16]
    ip[10:12] = b"\0\0"
    ip[10:12] = icmp_checksum(ip).to_bytes(2, "big")
    icmp = bytearray(request[20:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = icmp_checksum(icmp).to_bytes(2, "big")
    return bytes(ip + icmp)


def test_virtio_header_device_carries_whole_packets(testbed: Testbed) -> None:
    """With a virtio header but no read offloads, reads come back as the bare packet and writes
    (alone or in a batch) are taken: a ping through the device is answered."""
    ns = testbed.netns("t")
    with ns.enter():
        tun = TunDevice.open(testbed.name("tun"), offload=0)
    with tun, LinkConfig(tun.name, netns=ns.name) as link:
        assert tun.vnet_hdr and tun.offload == 0
        with pytest.raises(RuntimeError, match="virtio header"):
            tun.read_into(bytearray(100))
        link.set_up(1400)
        link.add_address(IPv4Interface("10.144.0.1/24"))
        answered = 0
        result: list[int] = []
        pinger = threading.Thread(target=lambda: result.append(
            ping("10.144.0.9", count=4, interval=0.1, timeout=2, netns=ns).received))
        pinger.start()
        deadline = time.monotonic() + 10
        while pinger.is_alive() and time.monotonic() < deadline:
            if not select.select([tun.fd], [], [], 0.1)[0]:
                continue
            replies = [r for p in iter(tun.read, None) if (r := echo_reply(p)) is not None]
            answered += len(replies)
            if answered % 2:
                assert all(tun.write(r) for r in replies)
            else:
                assert tun.write_batch(replies) == 0
        pinger.join(5)
        assert result == [4] and answered == 4
        assert tun.write_drops == 0
        link.cleanup()
