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
import threading
import time
from pathlib import Path

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import BIN, PytierNode, wait_for
from pytier.testbed.ping import PingResult, ping

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


# ---- floods at the listeners ---------------------------------------------------------------------

GARBAGE_DATAGRAMS = 50_000
UDP_FRAME_COPIES = 500  # of each captured-frame variant sent again from B


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def udp_rcvbuf_errors(ns: Netns) -> int:
    """Datagrams the kernel dropped in ``ns`` because a socket's receive buffer was full."""
    lines = [line.split() for line in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RcvbufErrors")])


def garbage_datagram(rng: random.Random) -> bytes:
    """Random bytes that are no tunnel message and no STUN: message type 0xEE, a wrong length field."""
    n = rng.randrange(0, 1200)
    d = bytearray(rng.randbytes(n))
    if n > 4:
        d[4] = 0xEE
    if n >= 8:
        struct.pack_into("<H", d, 6, (n - 8 + 1) & 0xFFFF)
    return bytes(d)


class Pinger(threading.Thread):
    """Pings through the tunnel for the whole flood: the real peer's traffic."""

    def __init__(self, ns: Netns, dst: str, count: int) -> None:
        super().__init__(daemon=True)
        self.ns, self.dst, self.count = ns, dst, count
        self.result: PingResult | None = None

    def run(self) -> None:
        self.result = ping(self.dst, count=self.count, interval=0.05, timeout=2, netns=self.ns)

    def received(self) -> int:
        self.join(self.count * 0.05 + 10)
        assert self.result is not None
        return self.result.received


def capture_frames(sniffer: socket.socket, dst_port: int, deadline: float) -> dict[str, bytes]:
    """B's UDP Syn, its peer HandShake and a sealed peer Data packet toward ``dst_port``."""
    found: dict[str, bytes] = {}
    kinds = {(1, None): "syn", (3, 2): "handshake", (3, 1): "data"}
    while time.monotonic() < deadline and len(found) < len(kinds):
        frame = sniffer.recv(4096)
        if len(frame) < ETH + IP + UDP + 16 or frame[12:14] != b"\x08\x00" or frame[ETH + 9] != 17:
            continue
        if struct.unpack_from("!H", frame, ETH + IP + 2)[0] != dst_port:
            continue
        body = frame[ETH + IP + UDP:]
        key = (body[4], None) if body[4] == 1 else (body[4], body[8 + 8] if len(body) > 24 else -1)
        if key in kinds:
            found.setdefault(kinds[key], frame)
    if len(found) < len(kinds):
        raise TimeoutError(f"captured only {sorted(found)}")
    return found


def handshake_cut(frame: bytes, cut: int) -> bytes:
    """The captured HandShake with its protobuf cut short inside the digest, lengths kept consistent:
    it arrives on A's tunnel for B as a handshake that no longer decodes."""
    f = bytearray(truncated(frame, cut, keep_tunnel_length_consistent=True))
    struct.pack_into("<I", f, ETH + IP + UDP + 8 + 12, len(f) - ETH - IP - UDP - 8 - 16)  # peer header len
    return bytes(f)


def udp_tunnel_open(sock: socket.socket, dst: tuple[str, int], conn_id: int) -> None:
    """A Syn and its Sack: A now holds a half-open tunnel for this socket."""
    sock.sendto(struct.pack("<IBBH", conn_id, 1, 0, 8) + os.urandom(8), dst)
    sock.settimeout(3)
    assert sock.recv(64)[4] == 2  # Sack


def test_udp_listener_under_flood(testbed: Testbed) -> None:
    """Garbage, unknown connections, replays, truncations, broken handshakes and silent or garbage
    tunnels at A's UDP listener while B pings through it: each counted once, B's traffic flows."""
    a, b, c = testbed.netns("a"), testbed.netns("b"), testbed.netns("c")
    ab = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(a, c, "198.18.2.1/24", "198.18.2.2/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="node-a").start()
    with b.enter():
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sniffer.bind((ab.ifname_b, 0))
    with c.enter():
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tunnels = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    sniffer.settimeout(1)
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
                time.sleep(0.01)  # about 50,000 a second: what the node reads, not the kernel's queue
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
    assert kernel_drops < sent_from_c // 4
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


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the other side has closed (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


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
