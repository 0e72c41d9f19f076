"""Replayed, forged, truncated and garbage datagrams on a real link: dropped, counted, harmless.

The hostile frames are real ones captured on B's veth (AF_PACKET) and sent again from there, so
they carry B's own addresses and port and reach the tunnel that A keyed to B.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from pytier.testbed.netns import Testbed
from pytier.testbed.nodes import PytierNode, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "s3"]
ETH_P_ALL = 0x0003
ETH, IP, UDP = 14, 20, 8


def capture_data_frame(sniffer: socket.socket, dst_port: int, deadline: float) -> bytes:
    """The first IPv4/UDP frame toward ``dst_port`` that carries a sealed peer Data packet."""
    while time.monotonic() < deadline:
        frame = sniffer.recv(4096)
        if len(frame) < 120 or frame[12:14] != b"\x08\x00" or frame[ETH + 9] != 17:
            continue
        if struct.unpack_from("!H", frame, ETH + IP + 2)[0] != dst_port:
            continue
        body = frame[ETH + IP + UDP:]
        if body[4] == 3 and body[8 + 8] == 1:  # UDP-tunnel Data carrying peer packet type Data
            return frame
    raise TimeoutError("no Data frame captured")


def ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def truncated(frame: bytes, cut: int, *, keep_tunnel_length_consistent: bool) -> bytes:
    f = bytearray(frame[:-cut])
    ip_len = len(f) - ETH
    struct.pack_into("!H", f, ETH + 2, ip_len)
    struct.pack_into("!H", f, ETH + 10, 0)
    struct.pack_into("!H", f, ETH + 10, ip_checksum(bytes(f[ETH:ETH + IP])))
    struct.pack_into("!HH", f, ETH + IP + 4, ip_len - IP, 0)  # UDP length, checksum 0 (none)
    if keep_tunnel_length_consistent:
        struct.pack_into("<H", f, ETH + IP + UDP + 6, ip_len - IP - UDP - 8)
    return bytes(f)


def forged(frame: bytes) -> bytes:
    f = bytearray(frame)
    f[ETH + IP + UDP + 8 + 16 + 10] ^= 0x5A  # a byte of the ciphertext
    struct.pack_into("!H", f, ETH + IP + 6, 0)
    return bytes(f)


def test_replayed_forged_truncated_and_garbage_datagrams(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    veth = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                 "udp://198.18.1.1:11010"], name="node-b").start()
    nb.wait_route("10.144.144.1")
    with b.enter():
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sniffer.bind((veth.ifname_b, 0))
        garbage = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sniffer.settimeout(1)
    try:
        assert ping("10.144.144.1", count=1, timeout=2, netns=b).received == 1
        frame = capture_data_frame(sniffer, 11010, time.monotonic() + 5)
        before = na.cli("stats")
        for _ in range(5):
            sniffer.send(frame)
        sniffer.send(forged(frame))
        sniffer.send(truncated(frame, 20, keep_tunnel_length_consistent=False))
        sniffer.send(truncated(frame, 20, keep_tunnel_length_consistent=True))
        for n in (0, 1, 7, 8, 24, 100, 1400):
            garbage.sendto(os.urandom(n), ("198.18.1.1", 11010))
        wait_for(lambda: na.cli("stats").get("rx_replayed", 0) - before.get("rx_replayed", 0) >= 5, 5,
                 "A to count the replays")
        after = na.cli("stats")
    finally:
        sniffer.close()
        garbage.close()

    def grew(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    assert grew("rx_replayed") == 5
    assert grew("rx_decrypt_failed") == 2  # the forged byte and the consistent truncation
    assert grew("rx_malformed_datagrams") >= 1  # the truncation that broke the tunnel's length field
    assert grew("rx_data_packets") == 0  # nothing of it reached TUN
    # The node and the link are unharmed.
    assert ping("10.144.144.1", count=3, interval=0.2, timeout=2, netns=b).received >= 2
    assert na.proc is not None and na.proc.poll() is None
