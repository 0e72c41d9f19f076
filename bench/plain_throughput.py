"""Plain TCP throughput through two nodes on a clean veth link, and the CPU each node used.

Rows measured in the same run: kernel TCP over the bare veth, pytier (UDP tunnel and TCP tunnel),
and EasyTier 2.6.4 (easytier-pyo3) as the anchor. The TCP inside the tunnel uses cubic.

    sudo .venv/bin/python bench/plain_throughput.py [--seconds 10] [--profile]

--profile runs the receiving pytier node under cProfile and prints where its time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pytier.testbed.netns import Netns, Testbed, iperf3
from pytier.testbed.nodes import EasyTierNode, PytierNode, wait_for

NET = ["--network-name", "bench", "--network-secret", "bench-secret"]


@dataclass
class Row:
    name: str
    mbit: float
    cpu_a: float | None = None
    cpu_b: float | None = None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_tree_cpu(root: int) -> float:
    """CPU of a process and its children (``ip netns exec`` execs, so the root is the node)."""
    total = 0.0
    for task in Path("/proc").iterdir():
        if not task.name.isdigit():
            continue
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if int(task.name) == root or ppid == root:
            with contextlib.suppress(OSError, IndexError):
                total += cpu_seconds(int(task.name))
    return total


def measure(client: Netns, server: Netns, ip: str, seconds: int) -> float:
    report = iperf3(client, server, ip, ["-C", "cubic", "-t", str(seconds)], timeout=seconds + 30)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def pair(tb: Testbed) -> tuple[Netns, Netns]:
    a, b = tb.netns("a"), tb.netns("b")
    tb.veth(a, b, "198.18.0.1/24", "198.18.0.2/24")
    return a, b


def bench_kernel(seconds: int) -> Row:
    with Testbed() as tb:
        a, b = pair(tb)
        return Row("kernel TCP, bare veth", measure(b, a, "198.18.0.1", seconds))


def bench_pytier(seconds: int, scheme: str, profile: Path | None) -> Row:
    with Testbed() as tb:
        a, b = pair(tb)
        extra_a: list[str] = []
        na = PytierNode(tb, a, [*NET, "-i", "10.144.144.1/24", "-l", f"{scheme}://0.0.0.0:11010", *extra_a],
                        name="bench-a")
        if profile is not None:
            na.wrap = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "pytier.cli.core"]
        na.start()
        nb = PytierNode(tb, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p",
                                f"{scheme}://198.18.0.1:11010"], name="bench-b").start()
        nb.wait_route("10.144.144.1")
        assert na.proc is not None and nb.proc is not None
        ca, cb = process_tree_cpu(na.proc.pid), process_tree_cpu(nb.proc.pid)
        mbit = measure(b, a, "10.144.144.1", seconds)
        row = Row(f"pytier plain, {scheme} tunnel", mbit, process_tree_cpu(na.proc.pid) - ca,
                  process_tree_cpu(nb.proc.pid) - cb)
        if profile is not None:
            na.stop()
        return row


def bench_easytier(seconds: int, scheme: str) -> Row:
    with Testbed() as tb:
        a, b = pair(tb)
        ea = EasyTierNode(tb, a, name="et-a", ipv4="10.144.144.1/24", listeners=[f"{scheme}://0.0.0.0:11010"],
                          peers=[], network_name="bench", network_secret="bench-secret").start()
        eb = EasyTierNode(tb, b, name="et-b", ipv4="10.144.144.2/24", listeners=[],
                          peers=[f"{scheme}://198.18.0.1:11010"], network_name="bench",
                          network_secret="bench-secret").start()
        eb.wait_route("10.144.144.1")
        wait_for(lambda: b.run(["ip", "route", "get", "10.144.144.1"], check=False).returncode == 0, 10,
                 "EasyTier TUN route")
        assert ea.proc is not None and eb.proc is not None
        ca, cb = process_tree_cpu(ea.proc.pid), process_tree_cpu(eb.proc.pid)
        mbit = measure(b, a, "10.144.144.1", seconds)
        row = Row(f"EasyTier 2.6.4 plain, {scheme} tunnel", mbit, process_tree_cpu(ea.proc.pid) - ca,
                  process_tree_cpu(eb.proc.pid) - cb)
        ea.stop()
        eb.stop()
        return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="profile the receiving pytier node")
    args = parser.parse_args()
    profile = Path(tempfile.mkdtemp()) / "node-a.prof" if args.profile else None
    rows = [
        bench_kernel(args.seconds),
        bench_pytier(args.seconds, "udp", profile),
        bench_pytier(args.seconds, "tcp", None),
        bench_easytier(args.seconds, "udp"),
        bench_easytier(args.seconds, "tcp"),
    ]
    print(f"\n$ {' '.join(sys.argv)}   ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores)")
    print(f"iperf3 -C cubic -t {args.seconds}, client in B, server in A, one flow")
    print(f"{'setup':38} {'Mbit/s':>9} {'CPU s node A':>13} {'CPU s node B':>13}")
    for r in rows:
        ca = f"{r.cpu_a:.2f}" if r.cpu_a is not None else "-"
        cb = f"{r.cpu_b:.2f}" if r.cpu_b is not None else "-"
        print(f"{r.name:38} {r.mbit:9.1f} {ca:>13} {cb:>13}")
    if profile is not None and profile.exists():
        print("\nWhere node A (receiver, UDP tunnel) spends its time (cProfile, top 25 by own time):")
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
