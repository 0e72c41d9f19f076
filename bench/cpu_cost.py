"""What a byte costs: Mbit/s and CPU seconds per GB through two nodes, pytier beside EasyTier 2.6.4.

One iperf3 -C cubic flow, client in B, server in A, per row and path. Rows, measured in the same
run on the same testbed:

    pytier-plain      two pytier-core nodes, UDP tunnel, no proxy
    pytier-plain-tcp  the same over a TCP tunnel
    pytier-kcp        UDP tunnel, --enable-kcp-proxy on B
    pytier-quic       UDP tunnel, --enable-quic-proxy on B
    easytier-plain, easytier-plain-tcp, easytier-kcp, easytier-quic: EasyTier 2.6.4 (easytier-pyo3)
                      set up the same way

Paths:

    veth  a bare veth pair with the offloads a real NIC has (checksum, segmentation, GRO), no
          emulator: CPU is the only ceiling
    loss  the emulated 100 Mbit/s link of bench/proxy_goodput.py, 20 ms one way, 10 % random loss
          each way (bench/README.md says how the emulator works)

CPU is that of each node's process during the iperf3 run; per GB means per 10^9 bytes that
iperf3's receiver counted.

    sudo .venv/bin/python bench/cpu_cost.py [--seconds 10] [--rows pytier-plain,...] [--paths veth,loss]
        [--profile [ROW]]

--profile [ROW] runs the receiving node A of that pytier row (default pytier-plain) on the bare
veth under cProfile and prints where its time goes.
"""

from __future__ import annotations

import argparse
import pstats
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import proxy_goodput as pg

from pytier.testbed.netns import Netns, Testbed

ROWS = {
    "pytier-plain": "pytier plain, udp",
    "pytier-plain-tcp": "pytier plain, tcp",
    "pytier-kcp": "pytier KCP proxy",
    "pytier-quic": "pytier QUIC proxy",
    "easytier-plain": "EasyTier plain, udp",
    "easytier-plain-tcp": "EasyTier plain, tcp",
    "easytier-kcp": "EasyTier KCP proxy",
    "easytier-quic": "EasyTier QUIC proxy",
}
PATHS = {"veth": "bare veth, offloads on", "loss": "100 Mbit/s, 20 ms, 10% loss"}
LOSS_PCT = 10.0


@dataclass
class VethLink:
    """A bare veth pair between A and B, with the attributes the rows of proxy_goodput need."""

    a: Netns
    b: Netns
    if_a: str
    if_b: str
    addr_a: IPv4Interface

    @property
    def ip_a(self) -> IPv4Address:
        return self.addr_a.ip


def setup(row: str, tb: Testbed, link: pg.Link, profile: Path | None) -> pg.RowSetup:
    scheme = "tcp" if row.endswith("-tcp") else "udp"
    kcp, quic = row.endswith("-kcp"), row.endswith("-quic")
    if row.startswith("easytier"):
        return pg.setup_easytier(tb, link, kcp=kcp, quic=quic, scheme=scheme)
    return pg.setup_pytier(tb, link, kcp=kcp, quic=quic, scheme=scheme, profile_a=profile)


def measure(row: str, tb: Testbed, link: pg.Link, args: argparse.Namespace, logdir: Path, path: str,
            profile: Path | None) -> pg.Cell:
    cell = pg.Cell()
    via: pg.RowSetup | None = None
    try:
        via = setup(row, tb, link, profile)
        pg.run_iperf(link, via, cell, args.seconds)
        if profile is not None:
            via.procs["A"].terminate()
            via.procs["A"].wait(30)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        cell.notes.append(f"FAILED: {type(exc).__name__}: {first[:200]}")
    finally:
        if via is not None:
            pg.scan_logs(via, cell, logdir / f"{row}-{path}")
        pg.clear_row(link)
    return cell


def per_gb(cpu: float, cell: pg.Cell, seconds: int) -> float:
    assert cell.mbit is not None
    return cpu / (cell.mbit * 1e6 * seconds / 8 / 1e9)


def print_table(cells: dict[tuple[str, str], pg.Cell], rows: list[str], paths: list[str],
                seconds: int) -> None:
    for path in paths:
        print(f"\n{PATHS[path]}")
        print(f"{'row':22} {'Mbit/s':>8} {'CPU s A':>8} {'CPU s B':>8} {'s/GB A':>7} {'s/GB B':>7} "
              f"{'s/GB A+B':>9}")
        for row in rows:
            cell = cells[(row, path)]
            if cell.mbit is None or len(cell.cpu) != 2:
                print(f"{ROWS[row]:22} {'fail':>8}")
                continue
            a, b = cell.cpu["A"], cell.cpu["B"]
            print(f"{ROWS[row]:22} {cell.mbit:8.1f} {a:8.2f} {b:8.2f} {per_gb(a, cell, seconds):7.1f} "
                  f"{per_gb(b, cell, seconds):7.1f} {per_gb(a + b, cell, seconds):9.1f}")
    pairs = [("pytier-plain", "easytier-plain"), ("pytier-plain-tcp", "easytier-plain-tcp"),
             ("pytier-kcp", "easytier-kcp"), ("pytier-quic", "easytier-quic")]
    print("\npytier / EasyTier, same path: Mbit/s ratio, CPU s per GB ratio (A+B)")
    for path in paths:
        for ours, theirs in pairs:
            c1, c2 = cells.get((ours, path)), cells.get((theirs, path))
            if c1 is None or c2 is None or not c1.mbit or not c2.mbit or len(c1.cpu) != 2 or len(c2.cpu) != 2:
                continue
            g1 = per_gb(sum(c1.cpu.values()), c1, seconds)
            g2 = per_gb(sum(c2.cpu.values()), c2, seconds)
            print(f"  {path:5} {ROWS[ours]:22} {c1.mbit / c2.mbit:5.2f}x speed  {g1 / g2:5.2f}x CPU per GB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 -t (default 10)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    parser.add_argument("--profile", nargs="?", const="pytier-plain", metavar="ROW",
                        help="profile node A of this pytier row (default pytier-plain) on the bare veth")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [r for r in rows if r not in ROWS] + [p for p in paths if p not in PATHS]
    if bad:
        parser.error(f"unknown rows or paths {bad}")
    run = pg.BenchRun.begin("cpu_cost")
    profile = run.logdir / "node-a.prof" if args.profile else None
    cells: dict[tuple[str, str], pg.Cell] = {}
    for path in paths:
        with Testbed() as tb:
            link: pg.Link
            if path == "veth":
                a, b = tb.netns("a"), tb.netns("b")
                v = tb.veth(a, b, "198.18.0.1/24", "198.18.0.2/24", offloads=True)
                link = VethLink(a, b, v.ifname_a, v.ifname_b, IPv4Interface("198.18.0.1/24"))
            else:
                link = tb.linked_pair(pg.DELAY_MS, LOSS_PCT, pg.RATE_MBIT, queue_ms=pg.QUEUE_MS,
                                      seed=pg.seed_for(LOSS_PCT))
            for row in rows:
                wanted = profile if path == "veth" and row == args.profile else None
                cells[(row, path)] = measure(row, tb, link, args, run.logdir, path, wanted)
                print(f"{path} {row}: {cells[(row, path)].mbit}", file=sys.stderr, flush=True)
    run.print_header()
    print(f"iperf3 -C cubic -t {args.seconds}, one flow B -> A; logs in {run.logdir}")
    print_table(cells, rows, paths, args.seconds)
    for (row, path), cell in cells.items():
        for note in cell.notes:
            print(f"  note {path} {row}: {note}")
    if profile is not None and profile.exists():
        print(f"\nWhere node A (receiver, {ROWS[args.profile]}, bare veth) spends its time "
              "(cProfile, own time):")
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
