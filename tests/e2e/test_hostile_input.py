"""Replayed, forged, truncated and garbage datagrams on a real link: dropped, counted, harmless.

The hostile frames are real ones captured on B's veth (AF_PACKET) and sent again from there, so
they carry B's own addresses and port and reach the tunnel that A keyed to B.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import time

from pytier.testbed.hostile import (
    Pinger,
    capture_data_frame,
    capture_frames,
    closed_by_peer,
    forged,
    garbage_datagram,
    handshake_cut,
    open_fds,
    open_sniffer,
    rss_kib,
    truncated,
    udp_rcvbuf_errors,
    udp_tunnel_open,
)
from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import BIN, PytierNode, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "s3"]


def test_replayed_forged_truncated_and_garbage_datagrams(testbed: Testbed) -> None:
    a, b = testbed.netns("a"), testbed.netns("b")
    veth = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                 "udp://198.18.1.1:11010"], name="node-b").start()
    nb.wait_route("10.144.144.1")
    sniffer = open_sniffer(b, veth.ifname_b)
    with b.enter():
        garbage = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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


# ---- floods at the listeners ---------------------------------------------------------------------

GARBAGE_DATAGRAMS = 50_000
UDP_FRAME_COPIES = 500  # of each captured-frame variant sent again from B


def test_udp_listener_under_flood(testbed: Testbed) -> None:
    """Garbage, unknown connections, replays, truncations, broken handshakes and silent or garbage
    tunnels at A's UDP listener while B pings through it: each counted once, B's traffic flows."""
    a, b, c = testbed.netns("a"), testbed.netns("b"), testbed.netns("c")
    ab = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(a, c, "198.18.2.1/24", "198.18.2.2/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    sniffer = open_sniffer(b, ab.ifname_b)
    with c.enter():
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tunnels = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    target = ("198.18.2.1", 11010)
    rng = random.Random(7)
    try:
        nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                     "udp://198.18.1.1:11010"], name="node-b").start()
        nb.wait_route("10.144.144.1")
        assert ping("10.144.144.1", count=1, timeout=2, netns=b).received == 1
        frames = capture_frames(sniffer, 11010, time.monotonic() + 5)
        assert na.proc is not None
        rss_before, drops_before, before = rss_kib(na.proc.pid), udp_rcvbuf_errors(a), na.cli("stats")
        pinger = Pinger(b, "10.144.144.1", 120)
        pinger.start()
        # Tunnels from C that never handshake, and tunnels whose first packet is garbage.
        for n, sock in enumerate(tunnels):
            udp_tunnel_open(sock, target, 0x5000 + n)
        for n, sock in enumerate(tunnels[4:]):
            body = struct.pack("<IIBBBBI", 1, 0, 1, 0, 1, 0, 24) + os.urandom(24)  # a peer Data packet
            sock.sendto(struct.pack("<IBBH", 0x5004 + n, 3, 0, len(body)) + body, target)
        for n in range(GARBAGE_DATAGRAMS):
            flood.sendto(garbage_datagram(rng), target)
            if n % 500 == 499:
                time.sleep(0.02)  # at most 25,000 a second: what the node reads, not the kernel's queue
        for _ in range(1000):
            flood.sendto(struct.pack("<IBBH", rng.getrandbits(32), 3, 0, 40) + rng.randbytes(40), target)
        variants = [frames["data"], truncated(frames["data"], 20, keep_tunnel_length_consistent=False),
                    truncated(frames["data"], 20, keep_tunnel_length_consistent=True),
                    handshake_cut(frames["handshake"], 10), frames["handshake"], frames["syn"]]
        for n in range(UDP_FRAME_COPIES):
            for frame in variants:
                sniffer.send(frame)
            if n % 50 == 49:
                time.sleep(0.01)
        received = pinger.received()
        # The silent tunnels end at the 5 s handshake deadline.
        wait_for(lambda: na.cli("stats").get("handshake_failed_timeout", 0)
                 - before.get("handshake_failed_timeout", 0) >= 4, 10, "A to time out the silent tunnels")
        after = na.cli("stats")
        rss_after, kernel_drops = rss_kib(na.proc.pid), udp_rcvbuf_errors(a) - drops_before
    finally:
        sniffer.close()
        flood.close()
        for sock in tunnels:
            sock.close()

    def grew(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    sent_from_c = GARBAGE_DATAGRAMS + 1000
    # What the kernel dropped for a full receive buffer never reached the node; the rest is counted.
    assert kernel_drops < sent_from_c // 2
    assert grew("rx_dropped_udp_garbage") + grew("rx_dropped_udp_unknown_conn") + kernel_drops >= sent_from_c
    if kernel_drops == 0:
        assert grew("rx_dropped_udp_garbage") == GARBAGE_DATAGRAMS
        assert grew("rx_dropped_udp_unknown_conn") == 1000
        assert grew("rx_replayed") == UDP_FRAME_COPIES
        assert grew("rx_dropped_udp_bad_length") == UDP_FRAME_COPIES
        assert grew("rx_decrypt_failed") == UDP_FRAME_COPIES
        assert grew("rx_dropped_bad_handshake") == UDP_FRAME_COPIES
    assert (grew("handshake_failed_timeout"), grew("handshake_failed_not_handshake")) == (4, 4)
    assert received <= grew("rx_data_packets") <= 120  # only B's pings reached TUN
    assert received >= 110, f"B's pings during the flood: {received} of 120"
    assert rss_after - rss_before < 20 * 1024, f"RSS {rss_before} -> {rss_after} KiB"
    assert ping("10.144.144.1", count=3, interval=0.2, timeout=2, netns=b).received >= 2
    assert na.proc.poll() is None
    # One line per source and reason, not one per packet.
    dropped_lines = [line for line in na.log().splitlines() if "dropped a datagram from" in line]
    assert 1 <= len(dropped_lines) <= 4, dropped_lines
    assert len([line for line in na.log().splitlines() if "refused" in line and " WARN " in line]) <= 2


TCP_ATTEMPTS = 2000
HANDSHAKE_OUTCOMES = ("tunnels_refused_half_open_per_source", "tunnels_refused_half_open_total",
                      "handshake_failed_closed", "handshake_failed_not_handshake", "handshake_failed_timeout",
                      "handshake_failed_malformed")


def test_tcp_listener_under_connection_flood(testbed: Testbed) -> None:
    """2,000 connection attempts from C (closed at once, garbage, silent) while B's TCP tunnel carries
    pings: every connection is closed by A and accounted for once, sockets and memory come back."""
    a, b, c = testbed.netns("a"), testbed.netns("b"), testbed.netns("c")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(a, c, "198.18.2.1/24", "198.18.2.2/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "tcp://0.0.0.0:11010"],
                    name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                 "tcp://198.18.1.1:11010"], name="node-b").start()
    nb.wait_route("10.144.144.1")
    assert na.proc is not None
    target = ("198.18.2.1", 11010)

    def connect() -> socket.socket:
        with c.enter():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(target)
        return sock

    before = na.cli("stats")
    # One at a time first, so that each is admitted to its handshake: a bad frame length, and a
    # well-framed packet that is not a handshake. A closes both at once.
    for first in (b"\xff\xff\xff\xff" + os.urandom(60),
                  struct.pack("<I", 40) + struct.pack("<IIBBBBI", 1, 0, 1, 0, 1, 0, 24) + os.urandom(24)):
        for _ in range(3):
            sock = connect()
            sock.sendall(first)
            assert closed_by_peer(sock, 5)
            sock.close()
    mid = na.cli("stats")
    rss_before, fds_before = rss_kib(na.proc.pid), open_fds(na.proc.pid)
    pinger = Pinger(b, "10.144.144.1", 100)
    pinger.start()
    silent: list[socket.socket] = []
    rng = random.Random(3)
    for n in range(TCP_ATTEMPTS):
        sock = connect()
        kind = n % 3
        if kind == 0:
            sock.close()
            continue
        if kind == 1:
            with contextlib.suppress(OSError):
                sock.sendall(rng.randbytes(rng.randrange(1, 200)))
        silent.append(sock)  # garbage senders and silent ones wait to be closed by A
    try:
        deadline = time.monotonic() + 15
        still_open = [s for s in silent if not closed_by_peer(s, max(0.01, deadline - time.monotonic()))]
    finally:
        for sock in silent:
            sock.close()
    received = pinger.received()
    wait_for(lambda: sum(int(na.cli("stats").get(k, 0)) - int(mid.get(k, 0)) for k in HANDSHAKE_OUTCOMES)
             >= TCP_ATTEMPTS, 10, "A to account for every connection")
    after = na.cli("stats")

    def grew(key: str, since: dict[str, int] = mid) -> int:
        return int(after.get(key, 0)) - int(since.get(key, 0))

    assert not still_open, f"{len(still_open)} connections still open after the handshake deadline"
    assert grew("rx_dropped_tcp_bad_frame", before) >= 3
    assert grew("handshake_failed_not_handshake", before) >= 3
    # Every accepted connection ends exactly once: refused over the bound, or failed in its handshake.
    assert sum(grew(k) for k in HANDSHAKE_OUTCOMES) == TCP_ATTEMPTS
    assert grew("tunnels_refused_half_open_per_source") > 0
    assert received >= 90, f"B's pings during the flood: {received} of 100"
    assert rss_kib(na.proc.pid) - rss_before < 20 * 1024
    wait_for(lambda: open_fds(na.proc.pid) <= fds_before, 10, "A's sockets to be closed")
    assert na.proc.poll() is None
    refusals = [line for line in na.log().splitlines() if "refused" in line and " WARN " in line]
    assert 1 <= len(refusals) <= len(HANDSHAKE_OUTCOMES), refusals


# ---- the management portal ----------------------------------------------------------------------

def test_portal_whitelist_refuses_other_sources(testbed: Testbed) -> None:
    """A portal bound to every address answers only its whitelist: the default (loopback) on B, an
    explicit list on A; a flood of refused connections leaves A answering the rest."""
    a, b, c = testbed.netns("a"), testbed.netns("b"), testbed.netns("c")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(a, c, "198.18.2.1/24", "198.18.2.2/24")
    na = PytierNode(testbed, a, [*NET, "--no-tun", "--no-listener", "-r", "0.0.0.0:15888",
                                 "--rpc-portal-whitelist", "198.18.1.2,127.0.0.1"], name="node-a").start()
    nb = PytierNode(testbed, b, [*NET, "--no-tun", "--no-listener", "-r", "0.0.0.0:15888"],
                    name="node-b").start()

    def cli(ns: Netns, portal: str) -> subprocess.CompletedProcess[str]:
        return ns.run([str(BIN / "pytier-cli"), "-p", portal, "-o", "json", "node"], check=False)

    assert na.cli("node")["hostname"] == "node-a"  # loopback, listed
    assert nb.cli("node")["hostname"] == "node-b"  # loopback, the default whitelist
    assert json.loads(cli(b, "198.18.1.1:15888").stdout)["hostname"] == "node-a"
    refused = cli(c, "198.18.2.1:15888")
    assert refused.returncode != 0
    assert "198.18.2.2 is not in the rpc portal whitelist (--rpc-portal-whitelist)" in refused.stderr
    refused = cli(a, "198.18.1.2:15888")
    assert refused.returncode != 0
    assert "198.18.1.1 is not in the rpc portal whitelist" in refused.stderr

    with c.enter():
        flood = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(300)]
    try:
        for sock in flood:
            sock.settimeout(5)
            sock.connect(("198.18.2.1", 15888))
            with contextlib.suppress(OSError):
                sock.sendall(os.urandom(512))
        assert json.loads(cli(b, "198.18.1.1:15888").stdout)["hostname"] == "node-a"
        for sock in flood:
            assert closed_by_peer(sock, 5)
    finally:
        for sock in flood:
            sock.close()
    stats = na.cli("stats")
    assert stats["mgmt_refused_not_whitelisted"] == 1 + len(flood)
    assert nb.cli("stats")["mgmt_refused_not_whitelisted"] == 1
    lines = [line for line in na.log().splitlines() if "management API: refused" in line]
    assert len(lines) == 1, lines
    assert "answers clients from 198.18.1.2/32, 127.0.0.1/32" in na.log()
    assert "answers loopback clients only" in nb.log()
