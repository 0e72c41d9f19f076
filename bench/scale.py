"""Memory per proxied connection and connection churn, through the KCP proxy and the QUIC proxy.

Two pytier-core nodes on one veth (A: destination, 10.144.144.1, with a checking server; B: source,
with the proxy enabled and the load generator), random loss on both veth ends (nft numgen on the
ingress hook). All clients are one asyncio process in B (`python -m pytier.testbed.tcpload`); the
server in A checks every byte too.

memory  N connections at once, each moving `--bytes` both ways, then all held open: VmRSS of both
        nodes before (after a warm-up, with no proxy row left), sampled every 0.2 s while the
        connections open, move and are held (peak), and after they all closed and their rows went;
        the per-connection figure is (peak - before) / N, per node. The rows of both nodes while
        held prove the connections were all proxied at once.
churn   C short connections one after another (connect, 1 KiB each way, close): failures, proxy rows
        left over (pytier-cli -o json proxy, after their 5 s linger), open file descriptors
        (/proc/PID/fd) and VmRSS of both nodes at the start (after the warm-up below) and
        at the end; both taken once the rows, KCP's time-wait and the hairpin's closed entries are gone.

    sudo .venv/bin/python bench/scale.py                                  # the issue's sizes
    sudo .venv/bin/python bench/scale.py --connections 100 --churn 200    # a quick look
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import proxy_goodput as pg

from pytier.testbed.hostile import open_fds, rss_kib
from pytier.testbed.netns import Testbed, nft_input_loss
from pytier.testbed.nodes import PytierNode

VIP_A, VIP_B = "10.144.144.1", "10.144.144.2"
PORT = 7100
PROXY_FLAGS = {"kcp": ["--enable-kcp-proxy"], "quic": ["--enable-quic-proxy"]}
TRANSPORT = {"kcp": "Kcp", "quic": "Quic"}
# The warm-up before any start figure: short connections, so that the tables sized by how many
# connections are open or lingering at once have grown as churn grows them, and one bulk connection,
# so that each node's replay filter holds its 64 Ki nonces per peer (~5 MiB per node, filled by
# packets, not connections). Both are bounded; measured from a cold node they read as growth.
WARMUP = 2000
WARMUP_CONCURRENCY = 20
WARMUP_BULK = 48 << 20  # bytes each way: more than 64 Ki packets either way
ROWS_GONE_S = 60.0  # closed rows linger 5 s; this is the bound on waiting for them to go
# After the rows: KCP's time-wait and the hairpin's closed entries (10 s each) and the sweep (5 s).
SETTLE_S = 16.0


@dataclass
class Setup:
    tb: Testbed
    na: PytierNode
    nb: PytierNode
    server: subprocess.Popen[Any]

    def pids(self) -> dict[str, int]:
        assert self.na.proc is not None and self.nb.proc is not None
        return {"A": self.na.proc.pid, "B": self.nb.proc.pid}

    def rss(self) -> dict[str, int]:
        return {k: rss_kib(p) for k, p in self.pids().items()}

    def fds(self) -> dict[str, int]:
        return {k: open_fds(p) for k, p in self.pids().items()}

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        return {"A": list(self.na.cli("proxy")), "B": list(self.nb.cli("proxy"))}

    def wait_rows_gone(self) -> dict[str, int]:
        """Rows left on each node once they are gone or the bound ran out."""
        deadline = time.monotonic() + ROWS_GONE_S
        while True:
            left = {k: len(v) for k, v in self.rows().items()}
            if not any(left.values()) or time.monotonic() >= deadline:
                return left
            time.sleep(1.0)


def start(tb: Testbed, proxy: str, loss: int, logdir: Path, tag: str) -> Setup:
    a, b = tb.netns("a"), tb.netns("b")
    veth = tb.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    for ns, ifname in ((a, veth.ifname_a), (b, veth.ifname_b)):
        nft_input_loss(ns, ifname, loss)
    na = PytierNode(tb, a, [*pg.NET, "-i", f"{VIP_A}/24", "-l", "udp://0.0.0.0:11010"], name="node-a").start()
    nb = PytierNode(tb, b, [*pg.NET, "-i", f"{VIP_B}/24", "--no-listener", "-p", "udp://198.18.1.1:11010",
                            *PROXY_FLAGS[proxy]], name="node-b").start()
    nb.wait_route(VIP_A, timeout=40)
    server = tb.popen(a, [sys.executable, "-m", "pytier.testbed.tcpload", "server", "--bind", VIP_A,
                          "--port", str(PORT)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "listening":
        raise RuntimeError("the load server did not start")
    for node in (na, nb):
        node.log_path.rename(logdir / f"{tag}-{node.name}.log")
        node.log_path = logdir / f"{tag}-{node.name}.log"
    return Setup(tb, na, nb, server)


def log_alarms(s: Setup, most: int = 3) -> list[str]:
    """Warnings and tracebacks in the node logs, the first few of each."""
    notes = []
    for node in (s.na, s.nb):
        alarms = [line for line in node.log().splitlines() if pg.LOG_ALARM.search(line)]
        notes += [f"{node.name}: {line.strip()[:160]}" for line in alarms[:most]]
        if len(alarms) > most:
            notes.append(f"{node.name}: {len(alarms) - most} more in {node.log_path}")
    return notes


def client_argv(count: int, concurrency: int, nbytes: int, timeout: float, *, hold: bool,
                first_id: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "pytier.testbed.tcpload", "client", "--host", VIP_A, "--port", str(PORT),
            "--count", str(count), "--concurrency", str(concurrency), "--up", str(nbytes), "--down",
            str(nbytes), "--timeout", str(timeout), "--first-id", str(first_id), "--per-conn"]
    return [*argv, "--hold"] if hold else argv


def read_json_line(proc: subprocess.Popen[Any], deadline: float,
                   conns: list[dict[str, Any]]) -> dict[str, Any]:
    """The client's next line that is not a connection's outcome; those go to `conns`."""
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the load client said nothing in time")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the load client exited ({proc.wait()})")
            record = dict(json.loads(line))
            if "outcome" not in record:
                return record
            conns.append(record)


def failure_notes(conns: list[dict[str, Any]]) -> list[str]:
    """How the failed connections ended and when (seconds after their start), one line per outcome."""
    by_outcome: dict[str, list[float]] = {}
    for c in conns:
        if c["outcome"] != "complete":
            by_outcome.setdefault(c["outcome"], []).append(float(c["seconds"]))
    notes = []
    for outcome, secs in sorted(by_outcome.items()):
        secs.sort()
        notes.append(f"{len(secs)} {outcome}, after {secs[0]:.1f} / {secs[len(secs) // 2]:.1f} / "
                     f"{secs[-1]:.1f} s (first / median / last)")
    return notes


def run_client(s: Setup, argv: list[str], timeout: float, conns: list[dict[str, Any]]) -> dict[str, Any]:
    proc = s.tb.popen(s.nb.ns, argv, stdout=subprocess.PIPE, text=True)
    try:
        return read_json_line(proc, time.monotonic() + timeout, conns)
    finally:
        proc.wait(10)


class Sampler(threading.Thread):
    """Highest VmRSS of each node, sampled until stopped."""

    def __init__(self, s: Setup) -> None:
        super().__init__(daemon=True)
        self.s = s
        self.peak = s.rss()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.2):
            try:
                now = self.s.rss()
            except (OSError, RuntimeError):
                return
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join(5)
        return self.peak


@dataclass
class MemoryResult:
    proxy: str
    n: int
    outcomes: dict[str, int] = field(default_factory=dict)
    rows_held: dict[str, int] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    rows_left: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def start_warmed_up(tb: Testbed, proxy: str, loss: int, logdir: Path, name: str, timeout: float,
                    notes: list[str]) -> Setup:
    """Start the pair, run the warm-up (the per-node caches fill), and wait until its rows and
    time-wait entries are gone, so that what is measured next starts from rest."""
    s = start(tb, proxy, loss, logdir, name)
    warm_argv = client_argv(WARMUP, WARMUP_CONCURRENCY, 1024, timeout, hold=False, first_id=10**6)
    warm = run_client(s, warm_argv, timeout * 2, [])
    if warm["summary"] != {"complete": WARMUP}:
        notes.append(f"warm-up: {warm['summary']}")
    bulk_argv = client_argv(1, 1, WARMUP_BULK, timeout, hold=False, first_id=2 * 10**6)
    bulk = run_client(s, bulk_argv, timeout * 2, [])
    if bulk["summary"] != {"complete": 1}:
        notes.append(f"bulk warm-up: {bulk['summary']}")
    s.wait_rows_gone()
    time.sleep(SETTLE_S)
    return s


def measure_memory(proxy: str, n: int, args: argparse.Namespace, logdir: Path) -> MemoryResult:
    r = MemoryResult(proxy, n)
    with Testbed() as tb:
        s = start_warmed_up(tb, proxy, args.loss, logdir, f"memory-{proxy}-{n}", args.timeout, r.notes)
        r.before = s.rss()
        sampler = Sampler(s)
        sampler.start()
        t0 = time.monotonic()
        proc = tb.popen(s.nb.ns, client_argv(n, n, args.bytes, args.timeout, hold=True),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        conns: list[dict[str, Any]] = []
        try:
            held = read_json_line(proc, t0 + args.timeout + 30, conns)
            r.seconds = time.monotonic() - t0
            time.sleep(1.0)
            r.held = s.rss()
            rows = s.rows()
            kind = TRANSPORT[proxy]
            r.rows_held = {k: sum(1 for x in v if x["transport_type"] == kind and x["state"] == "Connected")
                           for k, v in rows.items()}
            if held["failed"]:
                r.notes.append(f"{held['failed']} connections failed before all were held")
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            summary = read_json_line(proc, time.monotonic() + 60, conns)
            r.outcomes = summary["summary"]
            r.notes.extend(failure_notes(conns))
        finally:
            r.peak = sampler.stop()
            proc.wait(30)
        r.rows_left = s.wait_rows_gone()
        time.sleep(SETTLE_S)
        r.after = s.rss()
        r.notes.extend(log_alarms(s))
    return r


@dataclass
class ChurnResult:
    proxy: str
    count: int
    outcomes: dict[str, int] = field(default_factory=dict)
    rows_left: dict[str, int] = field(default_factory=dict)
    fds: tuple[dict[str, int], dict[str, int]] = ({}, {})
    rss: tuple[dict[str, int], dict[str, int]] = ({}, {})
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def measure_churn(proxy: str, count: int, args: argparse.Namespace, logdir: Path) -> ChurnResult:
    r = ChurnResult(proxy, count)
    with Testbed() as tb:
        s = start_warmed_up(tb, proxy, args.churn_loss, logdir, f"churn-{proxy}", args.timeout, r.notes)
        fds0, rss0 = s.fds(), s.rss()
        t0 = time.monotonic()
        # Per connection at most --timeout; the whole run is bounded by the sum plus a margin.
        conns: list[dict[str, Any]] = []
        argv = client_argv(count, 1, 1024, args.timeout, hold=False)
        result = run_client(s, argv, count * 2.0 + 120, conns)
        r.seconds = time.monotonic() - t0
        r.outcomes = result["summary"]
        r.notes.extend(failure_notes(conns))
        r.rows_left = s.wait_rows_gone()
        time.sleep(SETTLE_S)
        r.fds, r.rss = (fds0, s.fds()), (rss0, s.rss())
        r.notes.extend(log_alarms(s))
    return r


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def fmt_outcomes(o: dict[str, int]) -> str:
    failed = sum(v for k, v in o.items() if k != "complete")
    return "0" if not failed else ",".join(f"{k}={v}" for k, v in sorted(o.items()) if k != "complete")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="1000,5000",
                        help="concurrent connections per memory run (default 1000,5000)")
    parser.add_argument("--bytes", type=int, default=64 * 1024, help="bytes each way per connection (65536)")
    parser.add_argument("--loss", type=int, default=5, help="random loss %% on both veth ends (5)")
    parser.add_argument("--churn", type=int, default=10_000, help="sequential connections per proxy (10000)")
    parser.add_argument("--churn-loss", type=int, default=0, help="random loss %% during churn (0)")
    parser.add_argument("--proxies", default="kcp,quic", help="kcp,quic")
    parser.add_argument("--parts", default="memory,churn", help="memory,churn")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a connection may take at most (300)")
    args = parser.parse_args()
    args.sizes = [int(x) for x in args.connections.split(",") if x.strip()]
    args.proxy_names = [x.strip() for x in args.proxies.split(",") if x.strip()]
    args.part_names = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not set(args.proxy_names) <= set(PROXY_FLAGS):
        parser.error("--proxies takes kcp and/or quic")
    if not set(args.part_names) <= {"memory", "churn"}:
        parser.error("--parts takes memory and/or churn")
    for loss in (args.loss, args.churn_loss):
        if not 0 <= loss < 100:
            parser.error("loss must be within 0..99")
    return args


def main() -> int:
    args = parse_args()
    run = pg.BenchRun.begin("scale")
    memory: list[MemoryResult] = []
    churn: list[ChurnResult] = []
    for proxy in args.proxy_names:
        if "memory" in args.part_names:
            for n in args.sizes:
                memory.append(m := measure_memory(proxy, n, args, run.logdir))
                print(f"[{time.monotonic() - run.t0:5.0f} s] memory {proxy} {n}: before {m.before} "
                      f"peak {m.peak} after {m.after} outcomes {m.outcomes}", file=sys.stderr, flush=True)
        if "churn" in args.part_names:
            churn.append(c := measure_churn(proxy, args.churn, args, run.logdir))
            print(f"[{time.monotonic() - run.t0:5.0f} s] churn {proxy}: {c.outcomes} rows left {c.rows_left} "
                  f"fds {c.fds} rss {c.rss}", file=sys.stderr, flush=True)

    run.print_header()
    print("A (destination) -- veth -- B (source, proxy, load generator); pytier.testbed.tcpload, one asyncio "
          "process in B; loss by nft numgen on both veth ends' ingress.")
    notes: list[str] = []
    if memory:
        print(f"\nMemory: N connections at once, {args.bytes} bytes each way at {args.loss}% loss, then held "
              "open. VmRSS MiB of node A / node B; per connection = (peak - before) / N.")
        print(f"{'proxy':6}{'N':>6}{'failed':>8}{'rows held A/B':>15}{'before':>13}{'peak':>13}{'held':>13}"
              f"{'after':>13}{'KiB/conn A/B':>15}{'s':>6}")
        for m in memory:
            per = {k: (m.peak[k] - m.before[k]) / m.n for k in ("A", "B")} if m.peak else {"A": 0, "B": 0}
            print(f"{m.proxy:6}{m.n:>6}{fmt_outcomes(m.outcomes):>8}"
                  f"{m.rows_held.get('A', 0):>8}/{m.rows_held.get('B', 0):<6}"
                  f"{mib(m.before['A']):>7}/{mib(m.before['B']):<5}{mib(m.peak['A']):>7}/{mib(m.peak['B']):<5}"
                  f"{mib(m.held['A']) if m.held else '-':>7}/{mib(m.held['B']) if m.held else '-':<5}"
                  f"{mib(m.after['A']):>7}/{mib(m.after['B']):<5}"
                  f"{per['A']:>8.1f}/{per['B']:<6.1f}{m.seconds:>6.0f}")
            notes += [f"memory {m.proxy} {m.n}: {n}" for n in m.notes]
            if any(m.rows_left.values()):
                notes.append(f"memory {m.proxy} {m.n}: rows left after close {m.rows_left}")
    if churn:
        print(f"\nChurn: sequential connections (connect, 1 KiB each way, close) at {args.churn_loss}% loss; "
              f"start figures after a warm-up of {WARMUP} and one of {WARMUP_BULK >> 20} MiB each way; "
              "rows counted after their linger.")
        print(f"{'proxy':6}{'count':>7}{'failed':>8}{'rows left A/B':>15}{'fds start':>12}{'fds end':>10}"
              f"{'RSS MiB start':>16}{'RSS MiB end':>14}{'conn/s':>8}")
        for c in churn:
            (f0, f1), (r0, r1) = c.fds, c.rss
            print(f"{c.proxy:6}{c.count:>7}{fmt_outcomes(c.outcomes):>8}"
                  f"{c.rows_left['A']:>9}/{c.rows_left['B']:<5}{f0['A']:>7}/{f0['B']:<4}{f1['A']:>5}/{f1['B']:<4}"
                  f"{mib(r0['A']):>9}/{mib(r0['B']):<6}{mib(r1['A']):>7}/{mib(r1['B']):<6}"
                  f"{c.count / c.seconds if c.seconds else 0:>8.0f}")
            notes += [f"churn {c.proxy}: {n}" for n in c.notes]
    if notes:
        print("\nNotes:")
        for n in notes:
            print(f"  {n}")
    print(f"\nNode logs: {run.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
