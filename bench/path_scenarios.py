"""TCP goodput and small-request latency through pytier's proxies on named real-world path scenarios.

A - link emulator - B, one emulated link per scenario (pytier.testbed.scenarios.SCENARIOS, a fixed
emulator seed per scenario) carrying all of that scenario's rows in the same run. Per row: 64-byte
request/response round trips over one TCP connection, then one iperf3 -C cubic flow from B to A
(the namespaces default to BBR), exactly as bench/proxy_goodput.py sets up, checks and measures
them; this script adds the scenarios, the sender's resends and the targets.

    sudo .venv/bin/python bench/path_scenarios.py [--scenarios policed,bursty,...] [--rows kernel,...]
        [--seconds 10]

A scenario whose path changes under the flow (loss-change) runs iperf3 for twice --seconds (at
least until its last switch plus --seconds / 2), switches the emulator to its next phase at the
scenario's phase_times_s after the data connection is up, and reports the receiver's goodput per
phase from iperf3's 1 s intervals; its round-trip probe runs in the first phase, before the flow.

For pytier's KCP and QUIC rows the sender's resends come from `pytier-cli -o json proxy` on B, read
right after iperf3 returns: the proxy row that sent the most bytes, its "retrans" and, where the
node reports them, "segments_sent" and "spurious". Under the table: a checklist of targets per
scenario computed from the measured cells, then notes (failures, path-check failures, log alarms).
"""

from __future__ import annotations

import argparse
import bisect
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import proxy_goodput as pg

from pytier.testbed.linkem import LinkParams
from pytier.testbed.netns import EmulatedLink, Testbed
from pytier.testbed.nodes import wait_for
from pytier.testbed.scenarios import SCENARIOS, Scenario

DEFAULT_SCENARIOS = ["policed", "bursty", "long", "reorder", "loss-change", "random-0", "random-10",
                     "random-20"]
DEFAULT_ROWS = ["kernel", "pytier-plain", "pytier-kcp", "pytier-quic", "pytier-auto", "pytier-kcp-fec",
                "easytier-kcp", "easytier-quic", "kcptun"]
PYTIER_ROWS = [row for row in pg.ROWS if row.startswith("pytier-")]
PROXY_ROWS = ["pytier-kcp", "pytier-kcp-us", "pytier-quic", "pytier-auto", "pytier-kcp-fec"]
SAME_TRANSPORT = {"pytier-kcp": "easytier-kcp", "pytier-quic": "easytier-quic"}
RESEND_FIELDS = ("retrans", "segments_sent", "spurious")
FLOW_START_TIMEOUT = 30.0  # s for iperf3's data connection to be up before the phases start


@dataclass
class ScenarioCell(pg.Cell):
    phase_mbit: list[float | None] = field(default_factory=list)  # receiver's goodput per emulator phase
    phase_at_s: list[float] = field(default_factory=list)  # s after the flow started, one per switch
    resends: dict[str, int] | None = None  # RESEND_FIELDS the sender's proxy row had; None: not a proxy row


def scenario_seed(name: str) -> int:
    """A seed fixed by the scenario's name, so it does not move when the registry or --scenarios change."""
    return 3000 + zlib.crc32(name.encode()) % 1000


def flow_seconds(scenario: Scenario, seconds: int) -> int:
    if not scenario.phase_times_s:
        return seconds
    return max(2 * seconds, int(max(scenario.phase_times_s) + seconds / 2 + 0.999))


def wait_flow_start(link: EmulatedLink) -> float:
    """When iperf3's control and data connections are both established at the server in A."""
    accepted = ["ss", "-Htn", "state", "established", f"( sport = :{pg.IPERF_PORT} )"]
    wait_for(lambda: len(link.a.run(accepted, check=False).stdout.splitlines()) >= 2, FLOW_START_TIMEOUT,
             "iperf3's data connection", interval=0.05)
    return time.monotonic()


def switch_phases(link: EmulatedLink, times_s: tuple[float, ...], cell: ScenarioCell) -> None:
    """Move the emulator through its phases at `times_s` after the flow started (its data
    connection, not the client's launch), noting when each switch actually went out."""
    flow_started = wait_flow_start(link)
    for at in times_s:
        time.sleep(max(0.0, flow_started + at - time.monotonic()))
        link.next_phase()
        cell.phase_at_s.append(time.monotonic() - flow_started)


def goodput_per_phase(report: dict[str, Any], switches: list[float]) -> list[float | None]:
    """Receiver's Mbit/s in each phase, each 1 s interval counted in the phase that holds its middle."""
    intervals = report.get("server_output_json", {}).get("intervals", [])
    sums: list[list[float]] = [[0.0, 0.0] for _ in range(len(switches) + 1)]  # bytes, seconds
    for iv in intervals:
        s = iv["sum"]
        phase = bisect.bisect(switches, (s["start"] + s["end"]) / 2)
        sums[phase][0] += s["bytes"]
        sums[phase][1] += s["end"] - s["start"]
    return [8 * b / t / 1e6 if t > 0 else None for b, t in sums]


def read_resends(via: pg.RowSetup, cell: ScenarioCell) -> None:
    """The resend counters of the sender's proxy row with the most bytes (iperf3's data flow)."""
    assert via.pytier_src is not None
    rows = [r for r in via.pytier_src.cli("proxy") if isinstance(r.get("tx_bytes"), int)]
    if not rows:
        cell.notes.append("pytier-cli proxy on B showed no row after iperf3")
        return
    top = max(rows, key=lambda r: r["tx_bytes"])
    cell.resends = {k: int(top[k]) for k in RESEND_FIELDS if isinstance(top.get(k), int)}
    if not cell.resends:
        cell.notes.append(f"the sender's proxy row ({top.get('state')}, {top['tx_bytes']} bytes sent) has "
                          f"none of {', '.join(RESEND_FIELDS)}; its fields: {', '.join(top)}")


def run_flow(link: EmulatedLink, via: pg.RowSetup, cell: ScenarioCell, scenario: Scenario,
             seconds: int) -> None:
    phases = scenario.phase_times_s
    report = pg.run_iperf(
        link, via, cell, flow_seconds(scenario, seconds),
        during=(lambda _started: switch_phases(link, phases, cell)) if phases else None,
        extra=["--get-server-output"] if phases else [])
    if via.pytier_src is not None and via.carrier_a is not None:
        read_resends(via, cell)
    if report is not None and phases:
        cell.phase_mbit = goodput_per_phase(report, cell.phase_at_s)


def measure(row: str, scenario: Scenario, tb: Testbed, link: EmulatedLink, args: argparse.Namespace,
            logdir: Path) -> ScenarioCell:
    cell = ScenarioCell()
    pg.measure_row(row, tb, link, logdir, f"{row}-{scenario.name}", cell, rtt_count=args.rtt_count,
                   rtt_seconds=args.rtt_seconds,
                   flow=lambda via: run_flow(link, via, cell, scenario, args.seconds))
    # The next row must start at the next copy of the phases (see link_params), whatever failed here.
    missing = len(scenario.phase_times_s) - len(cell.phase_at_s)
    if missing > 0:
        for _ in range(missing):
            link.next_phase()
        cell.notes.append(f"{missing} of the emulator's phase switches sent only after the row ended")
    return cell


def link_params(scenario: Scenario, rows: int) -> LinkParams:
    """The emulator settings for a link that carries `rows` rows of `scenario`. The emulator never
    goes back to an earlier phase, so a time-varying path gets its phases once per row; that
    repeats the path only if its last phase is its first one again."""
    params = scenario.emulator
    if not params.phases:
        return params
    if params.phase_params(len(params.phases)) != params.phase_params(0):
        raise ValueError(f"scenario {scenario.name}: its last phase is not its first, so its rows cannot "
                         "share one link")
    return replace(params, phases=params.phases * rows)


# ---- the table --------------------------------------------------------------------------------


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def resend_share(cell: ScenarioCell, key: str) -> float | None:
    """`key` (retrans or spurious) as % of the segments sent, when the node reports both."""
    if cell.resends is None:
        return None
    sent, n = cell.resends.get("segments_sent"), cell.resends.get(key)
    return 100 * n / sent if sent and n is not None else None


def fmt_resends(cell: ScenarioCell) -> str:
    if cell.resends is None:
        return ""
    text = "/".join(str(cell.resends[k]) if k in cell.resends else "-" for k in RESEND_FIELDS)
    share = resend_share(cell, "retrans")
    return text + (f" ({share:.2f}%)" if share is not None else "")


COLUMNS = (f"{'':26}{'Mbit/s':>7}{'p50/p99':>10}{'CPU A/B':>13}{'frames':>8}{'lost%':>7}{'polic%':>7}"
           f"{'qdrop%':>7}{'reord%':>7}  resends retrans/sent/spurious")


def fmt_row(row: str, cell: ScenarioCell) -> str:
    mbit = f"{cell.mbit:.1f}" if cell.mbit is not None else "fail"
    rtt = f"{cell.p50:.0f}/{cell.p99:.0f}" if cell.p50 is not None and cell.p99 is not None else "-"
    rtt += "*" if cell.rtt_incomplete else ""
    d = cell.data_dir
    if d is not None and d.received:
        frames = f"{d.received / 1000:.0f}k" if d.received >= 10000 else str(d.received)
        emu = (f"{frames:>8}{pct(d.lost + d.burst_lost, d.received):>7}"
               f"{pct(d.policed, d.received):>7}{pct(d.queue_dropped, d.received):>7}"
               f"{pct(d.reordered, d.received):>7}")
    else:
        emu = f"{'-':>8}{'-':>7}{'-':>7}{'-':>7}{'-':>7}"
    return f"{pg.ROWS[row]:26}{mbit:>7}{rtt:>10}{pg.fmt_cpu(cell):>13}{emu}  {fmt_resends(cell)}".rstrip()


def fmt_phases(cell: ScenarioCell) -> str:
    parts = [f"{'-' if mbit is None else f'{mbit:.1f}'}" for mbit in cell.phase_mbit]
    at = ", ".join(f"{t:.1f}" for t in cell.phase_at_s)
    return f"{'':26}per phase Mbit/s: {' / '.join(parts) or '-'} (switched at {at or '-'} s)"


def describe_phases(scenario: Scenario, seconds: int) -> str:
    params = scenario.emulator
    spans = [f"0-{scenario.phase_times_s[0]:g} s base"]
    ends = (*scenario.phase_times_s[1:], float(flow_seconds(scenario, seconds)))
    spans += [f"{start:g}-{end:g} s {phase.spec()}"
              for start, end, phase in zip(scenario.phase_times_s, ends, params.phases, strict=True)]
    return " / ".join(spans)


# ---- targets ----------------------------------------------------------------------------------

Cells = dict[tuple[str, str], ScenarioCell]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def best_pytier(cells: Cells, scenario: str, rows: list[str]) -> tuple[str, float, ScenarioCell] | None:
    """The pytier row with the highest goodput in `scenario`: its name, goodput and cell."""
    measured = [(row, cell.mbit, cell) for row in rows if row in PYTIER_ROWS
                and (cell := cells.get((scenario, row))) is not None and cell.mbit is not None]
    return max(measured, key=lambda best: best[1]) if measured else None


def ceiling(cells: Cells, rows: list[str]) -> tuple[float, str]:
    best = best_pytier(cells, "random-0", rows)
    if best is not None:
        return best[1], f"best pytier row in random-0, {best[0]}"
    rate = SCENARIOS["random-0"].emulator.ba.rate_mbit or 0.0
    return 0.9 * rate, f"random-0 not measured: 90 % of its {rate:g} Mbit/s link"


def goodput_target(cells: Cells, scenario: str, rows: list[str], floor: float, why: str) -> str:
    best = best_pytier(cells, scenario, rows)
    if best is None:
        return f"best pytier >= {floor:.1f} Mbit/s ({why}): no pytier row measured"
    row, mbit, _ = best
    return f"best pytier ({row}) {mbit:.1f} >= {floor:.1f} Mbit/s ({why}): {verdict(mbit >= floor)}"


def targets(cells: Cells, scenarios: list[str], rows: list[str]) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    top, top_why = ceiling(cells, rows)
    for sc in scenarios:
        if sc == "policed":
            police = SCENARIOS[sc].emulator.ba.police_mbit or 0.0
            why = f"90 % of the {police:g} Mbit/s policer"
            lines.append((sc, goodput_target(cells, sc, rows, 0.9 * police, why)))
            best = best_pytier(cells, sc, rows)
            d = best[2].data_dir if best is not None else None
            if best is not None and d is not None and d.received:
                share = 100 * d.policed / d.received
                lines.append((sc, f"{best[0]}'s own loss, % policed, {share:.1f} < 5: {verdict(share < 5)}"))
            elif best is not None:
                lines.append((sc, f"{best[0]}'s own loss, % policed, < 5: unknown (no emulator counters)"))
        elif sc == "bursty":
            why = f"75 % of ceiling {top:.1f}, {top_why}"
            lines.append((sc, goodput_target(cells, sc, rows, 0.75 * top, why)))
        elif sc == "long":
            lines.append((sc, goodput_target(cells, sc, rows, 70.0, "absolute")))
        elif sc == "reorder":
            why = f"85 % of ceiling {top:.1f}, {top_why}"
            lines.append((sc, goodput_target(cells, sc, rows, 0.85 * top, why)))
            for row in rows:
                cell = cells.get((sc, row))
                if row not in PROXY_ROWS or cell is None:
                    continue
                key = "spurious" if cell.resends is not None and "spurious" in cell.resends else "retrans"
                share = resend_share(cell, key)
                if share is None:
                    lines.append((sc, f"{row} resends < 1 % of segments: unknown ({key} or segments_sent "
                                      "not reported)"))
                else:
                    lines.append((sc, f"{row} {key} {share:.2f} % of segments < 1 %: {verdict(share < 1)}"))
        for ours, theirs in SAME_TRANSPORT.items():
            a, b = cells.get((sc, ours)), cells.get((sc, theirs))
            if a is None or b is None:
                continue
            if a.mbit is None or b.mbit is None:
                lines.append((sc, f"{ours} > {theirs}: unknown (a row failed)"))
            else:
                lines.append((sc, f"{ours} {a.mbit:.1f} > {theirs} {b.mbit:.1f}: {verdict(a.mbit > b.mbit)}"))
    return lines


# ---- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"subset of {','.join(SCENARIOS)} (default {','.join(DEFAULT_SCENARIOS)})")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"subset of {','.join(pg.ROWS)} (default {','.join(DEFAULT_ROWS)})")
    parser.add_argument("--seconds", type=int, default=10,
                        help="iperf3 -t (default 10; a scenario with phases runs longer, see above)")
    parser.add_argument("--rtt-count", type=int, default=100,
                        help="request/response pairs at most (default 100)")
    parser.add_argument("--rtt-seconds", type=float, default=15.0,
                        help="time budget for the request/response pairs (default 15)")
    args = parser.parse_args()
    args.scenario_names = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    args.row_names = [x.strip() for x in args.rows.split(",") if x.strip()]
    if unknown := [s for s in args.scenario_names if s not in SCENARIOS]:
        parser.error(f"unknown scenarios {unknown}; choose from {','.join(SCENARIOS)}")
    if unknown := [r for r in args.row_names if r not in pg.ROWS]:
        parser.error(f"unknown rows {unknown}; choose from {','.join(pg.ROWS)}")
    if args.seconds < 1 or args.rtt_count < 1 or args.rtt_seconds <= 0:
        parser.error("--seconds, --rtt-count and --rtt-seconds must be positive")
    return args


def main() -> int:
    args = parse_args()
    run = pg.BenchRun.begin("path_scenarios")
    logdir, t0 = run.logdir, run.t0
    cells: Cells = {}
    for name in args.scenario_names:
        scenario = SCENARIOS[name]
        with Testbed() as tb:
            params = link_params(scenario, len(args.row_names))
            link = tb.linked_pair(params=params, seed=scenario_seed(name))
            for row in args.row_names:
                t_row = time.monotonic()
                cells[name, row] = cell = measure(row, scenario, tb, link, args, logdir)
                print(f"[{time.monotonic() - t0:5.0f} s] {name} {pg.ROWS[row]}: "
                      f"{fmt_row(row, cell)[26:].strip()} ({time.monotonic() - t_row:.0f} s)",
                      file=sys.stderr, flush=True)
            link.stop()

    run.print_header()
    print(f"iperf3 -C cubic -t {args.seconds}, one flow, client in B, server in A; before it, 64-byte "
          f"request/response over one TCP connection, sequential, up to {args.rtt_count} within "
          f"{args.rtt_seconds:g} s.")
    print("Columns: goodput; round trip p50/p99 ms (* over fewer requests, see notes); CPU s of node A / B "
          "during the flow; the emulator's B->A data direction during the flow: frames offered, % lost "
          "(random + burst), % policed (the sender's own loss), % queue-dropped, % reordered; for pytier "
          "KCP/QUIC the sender's proxy row (retrans/segments sent/spurious resends, retrans as % of sent).")
    for name in args.scenario_names:
        scenario = SCENARIOS[name]
        print(f"\n== {name}: {scenario.title} (B->A {scenario.emulator.ba.describe()}; "
              f"seed {scenario_seed(name)})")
        if scenario.phase_times_s:
            print(f"   iperf3 -t {flow_seconds(scenario, args.seconds)}, phases from the data connection "
                  f"up: {describe_phases(scenario, args.seconds)}; round trips probed in the first phase, "
                  "before the flow; per-phase goodput at the receiver, each 1 s interval in the phase "
                  "holding its middle")
        print(COLUMNS)
        for row in args.row_names:
            cell = cells[name, row]
            print(fmt_row(row, cell))
            if scenario.phase_times_s:
                print(fmt_phases(cell))
    print("\nTargets:")
    checks = targets(cells, args.scenario_names, args.row_names)
    for sc, line in checks:
        print(f"  {sc:12} {line}")
    if not checks:
        print("  none apply to these scenarios and rows")
    notes = [(name, row, n) for name in args.scenario_names for row in args.row_names
             for n in cells[name, row].notes]
    if notes:
        print("\nNotes:")
        for name, row, note in notes:
            print(f"  {row} @ {name}: {note}")
    print(f"\nNode and kcptun logs: {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
