"""ICMP echo ("ping") for tests: this machine has no ping binary, and a library call gives exact numbers.

    python -m pytier.testbed.ping -c 100 -i 0.01 -W 1 198.18.0.2

Needs a raw ICMP socket (root or CAP_NET_RAW). `ping(..., netns=ns)` opens that socket inside a
testbed namespace and runs the exchange from the calling thread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Protocol

__all__ = ["PingResult", "icmp_checksum", "main", "ping"]

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
_ICMP_HDR = struct.Struct("!BBHHH")
MAX_COUNT = 0xFFFF  # bound on one call; also keeps sequence numbers unique


class _HasEnter(Protocol):
    def enter(self) -> AbstractContextManager[None]: ...


@dataclass
class PingResult:
    sent: int = 0
    received: int = 0
    rtts_ms: list[float] = field(default_factory=list)

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.sent - self.received) / self.sent if self.sent else 0.0

    @property
    def min_ms(self) -> float:
        return min(self.rtts_ms) if self.rtts_ms else float("nan")

    @property
    def avg_ms(self) -> float:
        return sum(self.rtts_ms) / len(self.rtts_ms) if self.rtts_ms else float("nan")

    @property
    def max_ms(self) -> float:
        return max(self.rtts_ms) if self.rtts_ms else float("nan")

    def summary(self) -> str:
        return (
            f"{self.sent} packets transmitted, {self.received} received, {self.loss_pct:.1f}% packet loss\n"
            f"rtt min/avg/max = {self.min_ms:.3f}/{self.avg_ms:.3f}/{self.max_ms:.3f} ms"
        )


def icmp_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    total = sum(struct.unpack(f"!{len(raw) // 2}H", raw))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = _ICMP_HDR.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return _ICMP_HDR.pack(ICMP_ECHO_REQUEST, 0, icmp_checksum(header + payload), ident, seq) + payload


def ping(
    dst: str | IPv4Address,
    *,
    count: int = 1,
    interval: float = 1.0,
    timeout: float = 1.0,
    size: int = 56,
    netns: _HasEnter | None = None,
) -> PingResult:
    """Send `count` echo requests `interval` s apart; a reply counts if it comes within `timeout` s."""
    if not 0 < count <= MAX_COUNT:
        raise ValueError(f"count {count} must be within 1..{MAX_COUNT}")
    target = str(IPv4Address(str(dst)))
    with netns.enter() if netns is not None else nullcontext():
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        return _exchange(sock, target, count, interval, timeout, size)


def _exchange(
    sock: socket.socket, target: str, count: int, interval: float, timeout: float, size: int
) -> PingResult:
    sock.setblocking(False)
    ident = (os.getpid() ^ id(sock)) & 0xFFFF
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    result = PingResult()
    sent_at: dict[int, float] = {}
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if result.sent < count and now >= next_send:
            seq = result.sent & 0xFFFF
            # Unreachable or no buffer space: the request is lost, and counted so, as ping does.
            with contextlib.suppress(OSError):
                sock.sendto(_echo_request(ident, seq, payload), (target, 0))
            sent_at[seq] = now
            result.sent += 1
            next_send += interval
        last_deadline = max(sent_at.values()) + timeout if sent_at else now
        if result.sent >= count and (now >= last_deadline or not sent_at):
            return result
        wait_until = next_send if result.sent < count else last_deadline
        ready, _, _ = select.select([sock], [], [], max(0.0, wait_until - time.monotonic()))
        if ready:
            _receive(sock, ident, target, sent_at, timeout, result)


def _receive(
    sock: socket.socket,
    ident: int,
    target: str,
    sent_at: dict[int, float],
    timeout: float,
    result: PingResult,
) -> None:
    while True:
        try:
            data, (src, _) = sock.recvfrom(65535)
        except BlockingIOError:
            return
        arrived = time.monotonic()
        ihl = (data[0] & 0x0F) * 4 if data else 0
        if src != target or len(data) < ihl + _ICMP_HDR.size:
            continue
        kind, _, _, rid, seq = _ICMP_HDR.unpack_from(data, ihl)
        if kind != ICMP_ECHO_REPLY or rid != ident or seq not in sent_at:
            continue
        rtt = arrived - sent_at.pop(seq)
        if rtt <= timeout:
            result.received += 1
            result.rtts_ms.append(rtt * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pytier.testbed.ping", description="ICMP echo for tests")
    p.add_argument("dst")
    p.add_argument("-c", "--count", type=int, default=4)
    p.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between requests")
    p.add_argument("-W", "--timeout", type=float, default=1.0, help="seconds to wait for each reply")
    p.add_argument("-s", "--size", type=int, default=56, help="payload bytes")
    args = p.parse_args(argv)
    result = ping(args.dst, count=args.count, interval=args.interval, timeout=args.timeout, size=args.size)
    print(result.summary(), flush=True)
    return 0 if result.received else 1


if __name__ == "__main__":
    sys.exit(main())
