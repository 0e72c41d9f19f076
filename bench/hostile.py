"""Hostile input at full size: a million bad datagrams and thousands of bad connections at one node.

    sudo .venv/bin/python bench/hostile.py [--datagrams 1000000] [--rate 50000] [--tcp-attempts 10000]

Namespaces A (the node under attack, udp and tcp listeners on 11010), B (a real peer over a UDP
tunnel, pinging A's virtual IP every 50 ms throughout) and C (the attacker, its own address).
Phases, one after the other: garbage datagrams from C, paced at --rate; B's own captured frames
sent again from B (replays, truncations with a broken and with a consistent length, handshakes cut
short), 10,000 of each; --tcp-attempts connections from C, a third each closed at once, sending
garbage, or silent. Per phase: what was sent, what A counted (by counter), what A's kernel dropped
for a full socket buffer before A read it, A's RSS and open fds before and after, and B's pings
during the phase (received/sent, median and worst round trip).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pytier.testbed.hostile import (
    capture_frames,
    closed_by_peer,
    garbage_datagram,
    handshake_cut,
    open_fds,
    open_sniffer,
    rss_kib,
    truncated,
    udp_rcvbuf_errors,
)
from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import PytierNode, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "bench", "--network-secret", "bench-secret"]
FRAME_COPIES = 10_000


class ContinuousPing(threading.Thread):
    """B's traffic: pings every 50 ms, in rounds of 20, until stopped."""

    def __init__(self, ns: Netns, dst: str) -> None:
        super().__init__(daemon=True)
        self.ns, self.dst = ns, dst
        self.stop_event = threading.Event()
        self.sent = 0
        self.rtts_ms: list[float] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            result = ping(self.dst, count=20, interval=0.05, timeout=2, netns=self.ns)
            self.sent += result.sent
            self.rtts_ms += result.rtts_ms

    def stop(self) -> str:
        self.stop_event.set()
        self.join(10)
        if not self.rtts_ms:
            return f"0/{self.sent}"
        return (f"{len(self.rtts_ms)}/{self.sent}, {statistics.median(self.rtts_ms):.1f}/"
                f"{max(self.rtts_ms):.0f} ms")


@dataclass
class Phase:
    name: str
    sent: int
    counted: dict[str, int] = field(default_factory=dict)
    kernel_drops: int = 0
    rss_kib: tuple[int, int] = (0, 0)
    fds: tuple[int, int] = (0, 0)
    pings: str = ""


class Target:
    """Node A as the phases see it: its counters, its kernel's drops, its memory and sockets."""

    def __init__(self, node: PytierNode, ns: Netns, pinger_ns: Netns) -> None:
        self.node, self.ns, self.pinger_ns = node, ns, pinger_ns
        assert node.proc is not None
        self.pid = node.proc.pid

    def measure(self, name: str, send: Callable[[], int], counters: tuple[str, ...]) -> Phase:
        """Run ``send`` while B pings, then wait until ``counters`` plus the kernel's drops account for
        everything sent."""
        before, drops = self.node.cli("stats"), udp_rcvbuf_errors(self.ns)
        rss, fds = rss_kib(self.pid), open_fds(self.pid)
        pinger = ContinuousPing(self.pinger_ns, "10.144.144.1")
        pinger.start()
        sent = send()

        def settled() -> bool:
            grew = self._grew(before)
            return sum(grew.get(k, 0) for k in counters) + udp_rcvbuf_errors(self.ns) - drops >= sent

        with contextlib.suppress(TimeoutError):  # the table shows what is missing
            wait_for(settled, 30, f"A to account for the {name}", interval=0.5)
        pings = pinger.stop()
        grew = self._grew(before)
        counted = {k: v for k, v in grew.items() if v and k in counters}
        return Phase(name, sent, counted, udp_rcvbuf_errors(self.ns) - drops, (rss, rss_kib(self.pid)),
                     (fds, open_fds(self.pid)), pings)

    def _grew(self, before: dict[str, int]) -> dict[str, int]:
        after = self.node.cli("stats")
        return {k: int(v) - int(before.get(k, 0)) for k, v in after.items()}


def flood_garbage(c: Netns, count: int, rate: int) -> int:
    with c.enter():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rng = random.Random(1)
    burst = 500
    t0 = time.monotonic()
    try:
        for n in range(0, count, burst):
            for _ in range(min(burst, count - n)):
                sock.sendto(garbage_datagram(rng), ("198.18.2.1", 11010))
            ahead = (n + burst) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sock.close()
    return count


def resend_frames(sniffer: socket.socket, frames: dict[str, bytes], copies: int) -> int:
    variants = [frames["data"], truncated(frames["data"], 20, keep_tunnel_length_consistent=False),
                truncated(frames["data"], 20, keep_tunnel_length_consistent=True),
                handshake_cut(frames["handshake"], 10)]
    for n in range(copies):
        for frame in variants:
            sniffer.send(frame)
        if n % 50 == 49:
            time.sleep(0.01)
    return copies * len(variants)


def connection_flood(c: Netns, attempts: int) -> int:
    rng = random.Random(2)
    held: list[socket.socket] = []
    for n in range(attempts):
        with c.enter():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(("198.18.2.1", 11010))
        if n % 3 == 0:
            sock.close()
            continue
        if n % 3 == 1:
            with contextlib.suppress(OSError):
                sock.sendall(rng.randbytes(rng.randrange(1, 200)))
        held.append(sock)
        if len(held) >= 500:  # our own fds: wait for A to close the oldest
            for s in held[:250]:
                closed_by_peer(s, 10)
                s.close()
            del held[:250]
    for s in held:
        closed_by_peer(s, 10)
        s.close()
    return attempts


HANDSHAKE_OUTCOMES = ("tunnels_refused_half_open_per_source", "tunnels_refused_half_open_total",
                      "handshake_failed_closed", "handshake_failed_not_handshake", "handshake_failed_timeout",
                      "handshake_failed_malformed")


def print_table(phases: list[Phase], command: str, started: str, load: float, wall_s: float) -> None:
    revision = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always",
                               "--dirty"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"\n$ {command}")
    print(f"({started}, {os.cpu_count()} cores, load before {load:.2f}, pytier {revision}, "
          f"wall time {wall_s / 60:.1f} min)")
    print(f"{'phase':<34} {'sent':>9} {'counted':>9} {'kernel drop':>11} {'RSS MiB':>13} {'fds':>9}  "
          "B's pings (recv/sent, p50/max)")
    for p in phases:
        rss = f"{p.rss_kib[0] / 1024:.1f}->{p.rss_kib[1] / 1024:.1f}"
        fds = f"{p.fds[0]}->{p.fds[1]}"
        print(f"{p.name:<34} {p.sent:>9} {sum(p.counted.values()):>9} {p.kernel_drops:>11} {rss:>13} "
              f"{fds:>9}  {p.pings}")
        for key, value in sorted(p.counted.items()):
            print(f"    {key:<44} {value:>9}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=1_000_000,
                        help="garbage datagrams (default 1000000)")
    parser.add_argument("--rate", type=int, default=50_000, help="garbage datagrams a second (default 50000)")
    parser.add_argument("--tcp-attempts", type=int, default=10_000, help="TCP connections (default 10000)")
    args = parser.parse_args()
    command = " ".join(["sudo", ".venv/bin/python", *sys.argv] if os.getuid() == 0 else sys.argv)
    started, t0, load = time.strftime("%Y-%m-%d %H:%M"), time.monotonic(), os.getloadavg()[0]
    phases: list[Phase] = []
    with Testbed() as tb:
        a, b, c = tb.netns("a"), tb.netns("b"), tb.netns("c")
        ab = tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
        tb.veth(a, c, "198.18.2.1/24", "198.18.2.2/24")
        na = PytierNode(tb, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010",
                                "-l", "tcp://0.0.0.0:11010"], name="node-a").start()
        sniffer = open_sniffer(b, ab.ifname_b)
        try:
            nb = PytierNode(tb, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                    "udp://198.18.1.1:11010"], name="node-b").start()
            nb.wait_route("10.144.144.1")
            ping("10.144.144.1", count=1, timeout=2, netns=b)
            frames = capture_frames(sniffer, 11010, time.monotonic() + 5)
            target = Target(na, a, b)
            phases.append(target.measure(f"udp garbage from C, {args.rate}/s",
                                         lambda: flood_garbage(c, args.datagrams, args.rate),
                                         ("rx_dropped_udp_garbage",)))
            phases.append(target.measure("udp B's frames: replay/cut/handshake",
                                         lambda: resend_frames(sniffer, frames, FRAME_COPIES),
                                         ("rx_replayed", "rx_dropped_udp_bad_length", "rx_decrypt_failed",
                                          "rx_dropped_bad_handshake")))
            phases.append(target.measure("tcp connections from C",
                                         lambda: connection_flood(c, args.tcp_attempts), HANDSHAKE_OUTCOMES))
            alive = na.proc is not None and na.proc.poll() is None
        finally:
            sniffer.close()
        log = na.log()
    print_table(phases, command, started, load, time.monotonic() - t0)
    # The node runs at debug level; a user's default (info) shows only the lines that are not debug.
    shown = [line for line in log.splitlines() if " DEBUG " not in line]
    about = [line for line in shown if "dropped a datagram" in line or "refused" in line]
    print(f"node A {'still up' if alive else 'DIED'}; at log level info its log has {len(shown)} lines, "
          f"{len(about)} of them about dropped or refused input")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
