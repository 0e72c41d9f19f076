"""Faults in the middle of proxied transfers, many rounds: does every connection end cleanly?

Two pytier-core nodes on one veth (A: destination, 10.144.144.1, with a checking server; B: source,
with the KCP or QUIC proxy and the load generator), random loss on both veth ends (nft numgen on the
ingress hook). Each round starts `--conns` connections that each move `--bytes` both ways
(pytier.testbed.tcpload), waits until they all move data, then does one fault:

    restart    node A killed (SIGKILL) and started again (it comes back with a new peer id)
    blackout   100% loss both ways for `--blackout` seconds, then back to the base loss
    address    node B's underlay address changes (198.18.1.2 <-> 198.18.1.3)

Every connection must either complete byte-identical or end with a reset or EOF; what arrived must
be a correct prefix of what was sent (sha256 of the received bytes against the same length of the
expected ones, checked on both ends); and it must end within `--bound` seconds (a connection still
open then counts as hung). Between rounds the benchmark waits until a fresh proxied connection
completes again (the recovery time).

    sudo .venv/bin/python bench/soak.py                                  # 100 rounds of each fault
    sudo .venv/bin/python bench/soak.py --rounds 3 --proxies kcp --faults blackout
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import proxy_goodput as pg

from pytier.testbed.netns import Netns, Testbed, nft_input_loss
from pytier.testbed.nodes import PytierNode, wait_for

VIP_A, VIP_B = "10.144.144.1", "10.144.144.2"
PORT = 7100
ADDR_A = "198.18.1.1/24"
ADDRS_B = ("198.18.1.2/24", "198.18.1.3/24")
PROXY_FLAGS = {"kcp": ["--enable-kcp-proxy"], "quic": ["--enable-quic-proxy"]}
FAULTS = ("restart", "blackout", "address")
RECOVERY_BOUND_S = 180.0


@dataclass
class Tally:
    rounds: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # the client's view
    server: dict[str, int] = field(default_factory=dict)  # the server's view
    corrupt: int = 0
    hung: int = 0
    max_end_s: float = 0.0  # from the fault to a connection's end
    max_recovery_s: float = 0.0
    unrecovered: int = 0
    notes: list[str] = field(default_factory=list)


class Bed:
    def __init__(self, tb: Testbed, proxy: str, loss: int, logdir: Path) -> None:
        self.tb, self.loss = tb, loss
        self.a, self.b = tb.netns("a"), tb.netns("b")
        veth = tb.veth(self.a, self.b, ADDR_A, ADDRS_B[0])
        self.if_a, self.if_b = veth.ifname_a, veth.ifname_b
        self.addr_b = 0
        self.set_loss(loss)
        self.na = PytierNode(tb, self.a, [*pg.NET, "-i", f"{VIP_A}/24", "-l", "udp://0.0.0.0:11010"],
                             name="node-a")
        self.nb = PytierNode(tb, self.b, [*pg.NET, "-i", f"{VIP_B}/24", "--no-listener", "-p",
                                          "udp://198.18.1.1:11010", *PROXY_FLAGS[proxy]], name="node-b")
        for node in (self.na, self.nb):
            node.log_path = logdir / f"{proxy}-{node.name}.log"
            node.start()
        self.nb.wait_route(VIP_A, timeout=40)
        self.server_log = logdir / f"{proxy}-server.jsonl"
        with open(self.server_log, "w") as out:
            tb.popen(self.a, [sys.executable, "-m", "pytier.testbed.tcpload", "server", "--bind", VIP_A,
                              "--port", str(PORT), "--per-conn"], stdout=out)
        wait_for(lambda: "listening" in self.server_log.read_text(), 10, "the load server")
        self._server_read = 0
        self.server_seen: dict[int, dict[str, Any]] = {}

    def set_loss(self, percent: int) -> None:
        nft_input_loss(self.a, self.if_a, percent)
        nft_input_loss(self.b, self.if_b, percent)

    def client(self, count: int, nbytes: int, first_id: int, bound: float) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "pytier.testbed.tcpload", "client", "--host", VIP_A,
                "--port", str(PORT), "--count", str(count), "--concurrency", str(count), "--up", str(nbytes),
                "--down", str(nbytes), "--first-id", str(first_id), "--timeout", str(bound), "--per-conn"]
        return self.tb.popen(self.b, argv, stdout=subprocess.PIPE, text=True)

    def collect(self) -> bool:
        """Take the server's new per-connection lines into `server_seen` (by connection id)."""
        lines = [x for x in self.server_log.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
        for line in lines[self._server_read:]:
            report = json.loads(line)
            self.server_seen[int(report["id"])] = report
        self._server_read = len(lines)
        return True

    def moving(self, count: int) -> bool:
        try:
            rows = self.nb.cli("proxy")
        except Exception:
            return False
        return sum(1 for r in rows if r["state"] == "Connected" and int(r["rx_bytes"]) > 0) >= count

    def recover(self, probe_id: int) -> float | None:
        """Seconds until a fresh 1 KiB connection completes again; None if it never did in time."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < RECOVERY_BOUND_S:
            proc = self.client(1, 1024, probe_id, 10.0)
            out, _ = proc.communicate(timeout=30)
            if '"complete": 1}' in out:
                return time.monotonic() - t0
            time.sleep(1.0)
        return None


def fault(bed: Bed, kind: str, args: argparse.Namespace) -> None:
    if kind == "restart":
        bed.na.stop(signal.SIGKILL)
        bed.na.start()
    elif kind == "blackout":
        bed.set_loss(100)
        time.sleep(args.blackout)
        bed.set_loss(bed.loss)
    else:
        old, bed.addr_b = ADDRS_B[bed.addr_b], 1 - bed.addr_b
        ns: Netns = bed.b
        # Deleted first: deleting a subnet's primary address takes its secondaries with it.
        ns.run(["ip", "addr", "del", old, "dev", bed.if_b])
        ns.run(["ip", "addr", "add", ADDRS_B[bed.addr_b], "dev", bed.if_b])


def one_round(bed: Bed, kind: str, n: int, args: argparse.Namespace, tally: Tally) -> None:
    first = n * 1000
    t_start = time.monotonic()
    proc = bed.client(args.conns, args.bytes, first, args.bound)
    try:
        wait_for(lambda: bed.moving(args.conns), 60, f"{args.conns} connections moving data", interval=0.3)
    except TimeoutError as exc:
        tally.notes.append(f"round {n}: {exc}")
    t_fault = time.monotonic()
    fault(bed, kind, args)
    try:
        out, _ = proc.communicate(timeout=args.bound + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        tally.notes.append(f"round {n}: the load client itself did not end")
    conns = [json.loads(x) for x in out.splitlines() if x.startswith('{"id"')]
    if len(conns) != args.conns:
        tally.notes.append(f"round {n}: {len(conns)} of {args.conns} connections reported")
    for c in conns:
        tally.outcomes[c["outcome"]] = tally.outcomes.get(c["outcome"], 0) + 1
        tally.corrupt += c["outcome"] == "corrupt" or not c["prefix_ok"]
        tally.hung += c["outcome"] == "timeout"
        tally.max_end_s = max(tally.max_end_s, t_start + float(c["seconds"]) - t_fault)
    recovery = bed.recover(10**7 + n)
    if recovery is None:
        tally.unrecovered += 1
        tally.notes.append(f"round {n}: no proxied connection completed within {RECOVERY_BOUND_S:g} s after")
    else:
        tally.max_recovery_s = max(tally.max_recovery_s, recovery)
    ids = range(first, first + args.conns)
    try:
        # The server reports a connection once it closed it, which may be after the client ended.
        wait_for(lambda: bed.collect() and all(i in bed.server_seen for i in ids), 15, "the server's report")
    except TimeoutError:
        tally.notes.append(f"round {n}: the server reported {sum(i in bed.server_seen for i in ids)} "
                           f"of {args.conns} connections")
    for i in ids:
        s = bed.server_seen.pop(i, None)
        if s is not None:
            tally.server[s["outcome"]] = tally.server.get(s["outcome"], 0) + 1
            tally.corrupt += s["outcome"] == "corrupt" or not s["prefix_ok"]
    tally.rounds += 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds per fault and proxy (100)")
    parser.add_argument("--proxies", default="kcp,quic", help="kcp,quic")
    parser.add_argument("--faults", default=",".join(FAULTS), help=",".join(FAULTS))
    parser.add_argument("--conns", type=int, default=4, help="connections per round (4)")
    parser.add_argument("--bytes", type=int, default=32 << 20, help="bytes each way per connection (32 MiB)")
    parser.add_argument("--loss", type=int, default=5, help="random loss %% on both veth ends (5)")
    parser.add_argument("--blackout", type=float, default=10.0, help="seconds of 100%% loss (10)")
    parser.add_argument("--bound", type=float, default=120.0,
                        help="seconds a connection may stay open at most before it counts as hung (120)")
    args = parser.parse_args()
    args.proxy_names = [x.strip() for x in args.proxies.split(",") if x.strip()]
    args.fault_names = [x.strip() for x in args.faults.split(",") if x.strip()]
    if not set(args.proxy_names) <= set(PROXY_FLAGS):
        parser.error("--proxies takes kcp and/or quic")
    if not set(args.fault_names) <= set(FAULTS):
        parser.error(f"--faults takes {','.join(FAULTS)}")
    if not 0 <= args.loss < 100:
        parser.error("--loss must be within 0..99")
    return args


def fmt(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


def main() -> int:
    args = parse_args()
    run = pg.BenchRun.begin("soak")
    tallies: dict[tuple[str, str], Tally] = {}
    for proxy in args.proxy_names:
        with Testbed() as tb:
            bed = Bed(tb, proxy, args.loss, run.logdir)
            for kind in args.fault_names:
                tally = tallies[proxy, kind] = Tally()
                for n in range(args.rounds):
                    one_round(bed, kind, len(tallies) * args.rounds + n, args, tally)
                    print(f"[{time.monotonic() - run.t0:5.0f} s] {proxy} {kind} round {n + 1}: "
                          f"{fmt(tally.outcomes)}; server {fmt(tally.server)}; corrupt {tally.corrupt} "
                          f"hung {tally.hung}", file=sys.stderr, flush=True)

    run.print_header()
    print(f"A (destination) -- veth -- B (source, proxy, load generator), {args.loss}% random loss on both "
          f"ends; per round {args.conns} connections moving {args.bytes} bytes each way, one fault once all "
          f"move data; bound {args.bound:g} s per connection.")
    print("Outcomes as the client / the server saw them: complete, reset, eof (ended early, prefix checked), "
          "timeout (hung past the bound), corrupt (a wrong byte).")
    print(f"{'proxy':6}{'fault':10}{'rounds':>7}  {'client':34}{'server':34}{'corrupt':>8}{'hung':>6}"
          f"{'max s to end':>13}{'max s to recover':>17}")
    notes: list[str] = []
    for (proxy, kind), t in tallies.items():
        print(f"{proxy:6}{kind:10}{t.rounds:>7}  {fmt(t.outcomes):34}{fmt(t.server):34}{t.corrupt:>8}"
              f"{t.hung:>6}{t.max_end_s:>13.1f}{t.max_recovery_s:>17.1f}")
        notes += [f"{proxy} {kind}: {n}" for n in t.notes]
        if t.unrecovered:
            notes.append(f"{proxy} {kind}: {t.unrecovered} rounds after which no connection completed "
                         "in time")
    if notes:
        print("\nNotes:")
        for n in notes[:40]:
            print(f"  {n}")
        if len(notes) > 40:
            print(f"  ... {len(notes) - 40} more")
    print(f"\nLogs: {run.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
