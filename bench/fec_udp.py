"""UDP delivery with and without --enable-fec-udp on emulated lossy paths, and what FEC costs TCP.

A - link emulator - B (20 ms one way, 100 Mbit/s, 50 ms queue), two pytier-core nodes over a UDP
tunnel; "on" rows run both nodes with --enable-fec-udp. Per path and row: a constant-rate UDP
stream from B to A (pytier.testbed.udp_stream, 1200-byte datagrams with sequence numbers, 5 Mbit/s),
first WARMUP seconds for the controller to measure the path (not counted), then --seconds counted.
Paths: random 10 % each way, the "bursty" scenario of bench/path_scenarios.py (Gilbert-Elliott,
5 % on average in bursts of 8 frames, each way), and clean. Then one iperf3 TCP flow (cubic) on
the clean path with FEC on and off: FEC protects UDP only, so TCP must not notice it.

    sudo .venv/bin/python bench/fec_udp.py [--seconds 10] [--paths random10,bursty,clean] [--tcp-seconds 8]

Columns: delivered = distinct counted datagrams that arrived; overhead = FEC parity bytes over FEC
data bytes that B sent (whole run, warm-up included; the sequence/frame headers, 15 bytes a packet,
are in the data bytes); shape = the controller's last shape k+m x depth; recovered = packets A
rebuilt from parity. Node logs stay in the run's /tmp directory.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import proxy_goodput as pg

from pytier.testbed.linkem import LinkParams
from pytier.testbed.netns import EmulatedLink, Testbed, iperf3
from pytier.testbed.nodes import PytierNode
from pytier.testbed.scenarios import SCENARIOS
from pytier.testbed.udp_stream import result, start_receiver, start_sender

NET = ["--network-name", "fecbench", "--network-secret", "fecbench-secret"]
A_IP, B_IP = "10.144.144.1", "10.144.144.2"
SIZE = 1200
RATE = 5e6 / 8 / SIZE  # datagrams per second at 5 Mbit/s of UDP payload
WARMUP_S = 3.0
PATHS = {
    "random10": ("random 10 % each way",
                 LinkParams.both_ways(delay_ms=20.0, loss_pct=10.0, rate_mbit=100.0, queue_ms=50.0)),
    "bursty": ("bursty ~5 % (GE, bursts of 8)", SCENARIOS["bursty"].emulator),
    "clean": ("clean", LinkParams.both_ways(delay_ms=20.0, rate_mbit=100.0, queue_ms=50.0)),
}


@contextmanager
def nodes(tb: Testbed, link: EmulatedLink, fec: bool, run: pg.BenchRun,
          tag: str) -> Iterator[tuple[PytierNode, PytierNode]]:
    """Nodes A (listener, receives) and B (connects to A, sends); their logs go to the run's directory."""
    flag = ["--enable-fec-udp"] if fec else []
    na = PytierNode(tb, link.a, [*NET, "--ipv4", f"{A_IP}/24", "--listeners", "udp://0.0.0.0:11010", *flag],
                    name=f"{tag}-a").start()
    nb = PytierNode(tb, link.b, [*NET, "--ipv4", f"{B_IP}/24", "--no-listener",
                                 "--peers", f"udp://{link.ip_a}:11010", *flag], name=f"{tag}-b").start()
    try:
        na.wait_route(B_IP)
        nb.wait_route(A_IP)
        yield na, nb
    finally:
        for node in (nb, na):
            node.stop()
            shutil.copy(node.log_path, run.logdir / f"{node.name}.log")


def udp_row(tb: Testbed, link: EmulatedLink, fec: bool, seconds: float, run: pg.BenchRun,
            tag: str) -> list[str]:
    """delivered, overhead, shape, recovered for one stream from B to A."""
    warm, counted = round(WARMUP_S * RATE), round(seconds * RATE)
    with nodes(tb, link, fec, run, tag) as (na, nb):
        rx = start_receiver(tb, link.a, 5001, warm, counted)
        tx = start_sender(tb, link.b, A_IP, 5001, warm + counted, RATE, SIZE)
        tx.wait(timeout=WARMUP_S + seconds + 30)
        got = result(rx)["received"]
        stats = nb.cli("stats")
        [toward_a] = nb.cli("peer")
        [toward_b] = na.cli("peer")
    data, parity = stats.get("fec_tx_data_bytes", 0), stats.get("fec_tx_parity_bytes", 0)
    return [f"{100 * got / counted:.2f} %",
            f"{100 * parity / data:.1f} %" if data else "-",
            str(toward_a.get("fec") or "-") if fec else "-",
            str(toward_b.get("fec_recovered", 0)) if fec else "-"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="counted seconds of each UDP stream")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    parser.add_argument("--tcp-seconds", type=int, default=8, help="iperf3 -t of the TCP rows (0: none)")
    args = parser.parse_args()
    run = pg.BenchRun.begin("fec_udp")
    lines = []
    with Testbed() as tb:
        for name in [p.strip() for p in args.paths.split(",") if p.strip()]:
            title, params = PATHS[name]
            link = tb.linked_pair(params=params, seed=1)
            for fec in (False, True):
                cells = udp_row(tb, link, fec, args.seconds, run, f"{name}-{'on' if fec else 'off'}")
                lines.append(f"{title:32} {'FEC on ' if fec else 'FEC off'}  " + "  ".join(
                    f"{c:>10}" for c in cells))
                print(lines[-1], file=sys.stderr, flush=True)
            link.stop()
        tcp = []
        if args.tcp_seconds:
            link = tb.linked_pair(params=PATHS["clean"][1], seed=1)
            for fec in (False, True):
                with nodes(tb, link, fec, run, f"tcp-{'on' if fec else 'off'}"):
                    report = iperf3(link.b, link.a, A_IP, ["-t", str(args.tcp_seconds), "-C", "cubic"],
                                    timeout=args.tcp_seconds + 30)
                mbit = report["end"]["sum_received"]["bits_per_second"] / 1e6
                tcp.append(f"{'TCP goodput, clean, iperf3 cubic':32} {'FEC on ' if fec else 'FEC off'}  "
                           f"{mbit:10.1f} Mbit/s")
                print(tcp[-1], file=sys.stderr, flush=True)
            link.stop()
    run.print_header()
    print(f"{'path (UDP B->A, 5 Mbit/s)':32} {'':7}  {'delivered':>10}  {'overhead':>10}  {'shape':>10}  "
          f"{'recovered':>10}")
    for line in lines + tcp:
        print(line)
    print(f"(logs in {run.logdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
