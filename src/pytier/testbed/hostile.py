"""Hostile input for tests and benchmarks: garbage datagrams, and real frames captured on a veth
(AF_PACKET) made into replays, truncations and broken handshakes; what a node process holds.

Frames are Ethernet + IPv4 + UDP + the UDP tunnel's 8-byte header + the 16-byte peer header.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

from pytier.testbed.netns import Netns
from pytier.testbed.ping import PingResult, ping

ETH_P_ALL = 0x0003
ETH, IP, UDP = 14, 20, 8


def open_sniffer(ns: Netns, ifname: str) -> socket.socket:
    """A raw socket on ``ifname`` in ``ns``: reads every frame crossing it, sends frames as given."""
    with ns.enter():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    sock.settimeout(1)
    return sock


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
