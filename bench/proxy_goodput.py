"""TCP goodput and small-request latency through KCP proxies on a lossy emulated link.

A - link emulator - B: 20 ms one-way delay, 100 Mbit/s, 50 ms drop-tail queue, the same random
loss each way (0, 1, 5, 10, 20 %, a fixed emulator seed per loss level). Per loss level and row:
64-byte request/response round trips over one TCP connection (sequential, bounded in count and
time; pytier.testbed.rtt_probe), then one iperf3 TCP flow (client in B, server in A). Both use
cubic: these namespaces default to BBR, which hides what loss does to a real-world TCP. Rows, all
measured in the same run on the same testbed:

    kernel          kernel TCP over the bare emulated link
    pytier-plain    two pytier-core nodes, UDP tunnel, no proxy
    pytier-kcp      the same with --enable-kcp-proxy on the source node B
    pytier-kcp-us   the same with --use-smoltcp too (interception by the user-space TCP stack)
    pytier-quic     the same with --enable-quic-proxy on the source node B (QUIC with BBR)
    pytier-auto     the same with --proxy-transport auto on B (plain, KCP or QUIC per connection)
    pytier-kcp-fec  pytier-kcp with --enable-fec-kcp on both nodes (adaptive FEC under the KCP segments)
    easytier-plain  EasyTier 2.6.4 (easytier-pyo3), UDP tunnel
    easytier-kcp    the same with enable_kcp_proxy on B
    easytier-quic   the same with enable_quic_proxy on B
    kcptun          kcptun (Debian package) client in B, server in A forwarding to the servers;
                    mode fast3, sndwnd/rcvwnd 2048, nocomp, its default FEC (10 data + 3 parity)
                    and crypt (aes)

    sudo .venv/bin/python bench/proxy_goodput.py [--loss 0,1,5,10,20] [--seconds 10] [--rows kernel,...]

One link per loss level carries all its rows; between rows every process in A and B is ended by
PID and the benchmark waits until the nodes' TUN devices are gone. While the latency connection is
open the benchmark checks which process in A holds the connection to the server, so a proxy row
that silently fell back to the plain path is flagged rather than reported as a proxy result. Below
the table: CPU seconds of the two nodes during the iperf3 run, what the emulator did to the data
direction (random loss, queue drops), and notes (failures, 1 s iperf3 intervals without a byte,
warnings and tracebacks in the pytier node logs, which are kept with kcptun's in /tmp).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol

import pytier
from pytier.testbed.linkem import DirCounters, LinkCounters
from pytier.testbed.netns import EmulatedLink, Netns, Testbed, stop_process, wait_tcp_listen
from pytier.testbed.nodes import EasyTierNode, PytierNode, wait_for
from pytier.testbed.rtt_probe import percentile

NET = ["--network-name", "bench", "--network-secret", "bench-secret"]
DELAY_MS = 20.0  # one way
RATE_MBIT = 100.0
QUEUE_MS = 50.0
DEFAULT_LOSS = "0,1,5,10,20"
IPERF_PORT = 5201
ECHO_PORT = 7000
KCPTUN_IPERF_PORT = 12948  # kcptun client's local ports in B
KCPTUN_ECHO_PORT = 12949
KCPTUN_UDP = (29900, 29901)  # kcptun server ports in A, for the iperf3 and echo targets
KCPTUN_OPTS = ["--mode", "fast3", "--sndwnd", "2048", "--rcvwnd", "2048", "--nocomp", "--quiet"]
VIP_A, VIP_B = "10.144.144.1", "10.144.144.2"
LOG_ALARM = re.compile(r" (ERROR|CRITICAL|WARNING) |Traceback")
PYTIER_SRC = Path(pytier.__file__).resolve().parent

ROWS: dict[str, str] = {
    "kernel": "kernel TCP, bare link",
    "pytier-plain": "pytier plain, udp tunnel",
    "pytier-kcp": "pytier KCP proxy",
    "pytier-kcp-us": "pytier KCP, user-space TCP",
    "pytier-quic": "pytier QUIC proxy (BBR)",
    "pytier-auto": "pytier auto",
    "pytier-kcp-fec": "pytier KCP+FEC",
    "easytier-plain": "EasyTier 2.6.4 plain, udp",
    "easytier-kcp": "EasyTier 2.6.4 KCP proxy",
    "easytier-quic": "EasyTier 2.6.4 QUIC proxy",
    "kcptun": "kcptun fast3 (FEC 10/3)",
}


class Link(Protocol):
    """What the rows need of a path between A and B: an emulated one, or a bare veth pair."""

    a: Netns
    b: Netns
    if_a: str
    if_b: str

    @property
    def ip_a(self) -> IPv4Address: ...


@dataclass
class RowSetup:
    """Where the servers bind in A, where the clients connect from B, and who should carry it."""

    bind_ip: str
    connect_ip: str
    iperf_port: int = IPERF_PORT
    echo_port: int = ECHO_PORT
    carrier_a: int | None = None  # PID in A expected to hold the connection to the server; None: direct
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)  # "A"/"B": CPU reported, must live
    pytier_src: PytierNode | None = None
    proxy_kind: str = "Kcp"  # the transport_type pytier-cli proxy on B must show, when carrier_a is set
    logs: list[Path] = field(default_factory=list)


@dataclass
class Cell:
    mbit: float | None = None
    p50: float | None = None
    p99: float | None = None
    rtt_incomplete: bool = False  # fewer requests answered than asked for within the time budget
    cpu: dict[str, float] = field(default_factory=dict)
    data_dir: DirCounters | None = None  # what the emulator did to the B->A frames during the row
    notes: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far; `ip netns exec` execs, so the PID
    the testbed holds is the program's own."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def link_counters_now(link: EmulatedLink, timeout: float = 5.0) -> LinkCounters:
    """The emulator's counters so far: SIGUSR1 makes it print one line per direction and carry on.
    The last report wins when the link is stopped, so reading these here loses nothing."""
    assert link.process.stdout is not None
    fd = link.process.stdout.fileno()
    link.process.send_signal(signal.SIGUSR1)
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"link emulator sent no counters within {timeout} s")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("link emulator exited")
            data += chunk
    return LinkCounters.parse(data.decode())


def counters_since(before: DirCounters, after: DirCounters) -> DirCounters:
    names = [f.name for f in fields(DirCounters) if f.name != "max_frame"]
    return DirCounters(**{name: getattr(after, name) - getattr(before, name) for name in names})


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# ---- rows: start what carries the traffic, say where the servers and clients are ------------


def setup_kernel(tb: Testbed, link: Link) -> RowSetup:
    return RowSetup(str(link.ip_a), str(link.ip_a))


def setup_pytier(tb: Testbed, link: Link, kcp: bool, quic: bool = False,
                 userspace: bool = False, scheme: str = "udp", profile_a: Path | None = None,
                 auto: bool = False, fec: bool = False) -> RowSetup:
    """`profile_a`: run node A under cProfile, writing its profile there when A is stopped. `fec`:
    --enable-fec-kcp on both nodes."""
    fec_flags = ["--enable-fec-kcp"] if fec else []
    na = PytierNode(tb, link.a, [*NET, "-i", f"{VIP_A}/24", "-l", f"{scheme}://0.0.0.0:11010", *fec_flags],
                    name="bench-a")
    if profile_a is not None:
        na.wrap = [sys.executable, "-m", "cProfile", "-o", str(profile_a), "-m", "pytier.cli.core"]
    na.start()
    nb = PytierNode(tb, link.b, [*NET, "-i", f"{VIP_B}/24", "--no-listener", "-p",
                                 f"{scheme}://{link.ip_a}:11010",
                                 *(["--enable-kcp-proxy"] if kcp else []),
                                 *(["--enable-quic-proxy"] if quic else []),
                                 *(["--use-smoltcp"] if userspace else []),
                                 *(["--proxy-transport", "auto"] if auto else []), *fec_flags],
                    name="bench-b").start()
    nb.wait_route(VIP_A, timeout=60)
    assert na.proc is not None and nb.proc is not None
    # auto proxies over QUIC on these paths: 40 ms or more round trip, and neither iperf3's port nor
    # the echo port is an interactive one (docs/routing.md).
    return RowSetup(VIP_A, VIP_A, carrier_a=na.proc.pid if kcp or quic or auto else None,
                    procs={"A": na.proc, "B": nb.proc}, pytier_src=nb, logs=[na.log_path, nb.log_path],
                    proxy_kind="Quic" if quic or auto else "Kcp")


def setup_easytier(tb: Testbed, link: Link, kcp: bool, quic: bool = False,
                   scheme: str = "udp") -> RowSetup:
    common: dict[str, Any] = {"network_name": "bench", "network_secret": "bench-secret"}
    ea = EasyTierNode(tb, link.a, name="et-a", ipv4=f"{VIP_A}/24", listeners=[f"{scheme}://0.0.0.0:11010"],
                      peers=[], **common).start()
    flags = {"enable_kcp_proxy": True} if kcp else {"enable_quic_proxy": True} if quic else None
    eb = EasyTierNode(tb, link.b, name="et-b", ipv4=f"{VIP_B}/24", listeners=[],
                      peers=[f"{scheme}://{link.ip_a}:11010"], flags=flags, **common).start()
    eb.wait_route(VIP_A, timeout=60)
    wait_for(lambda: link.b.run(["ip", "route", "get", VIP_A], check=False).returncode == 0, 10,
             "EasyTier TUN route")
    assert ea.proc is not None and eb.proc is not None
    return RowSetup(VIP_A, VIP_A, carrier_a=ea.proc.pid if kcp or quic else None,
                    procs={"A": ea.proc, "B": eb.proc})


def setup_kcptun(tb: Testbed, link: Link, logdir: Path) -> RowSetup:
    procs: dict[str, subprocess.Popen[Any]] = {}
    servers: list[int] = []
    for udp, target, local in ((KCPTUN_UDP[0], IPERF_PORT, KCPTUN_IPERF_PORT),
                               (KCPTUN_UDP[1], ECHO_PORT, KCPTUN_ECHO_PORT)):
        with open(logdir / f"kcptun-server-{udp}.log", "ab") as log:
            srv = tb.popen(link.a, ["kcptun-server", "-l", f"{link.ip_a}:{udp}", "-t", f"127.0.0.1:{target}",
                                    *KCPTUN_OPTS], stdout=log, stderr=subprocess.STDOUT)
        with open(logdir / f"kcptun-client-{udp}.log", "ab") as log:
            cli = tb.popen(link.b, ["kcptun-client", "-l", f"127.0.0.1:{local}", "-r", f"{link.ip_a}:{udp}",
                                    *KCPTUN_OPTS], stdout=log, stderr=subprocess.STDOUT)
        servers.append(srv.pid)
        if target == IPERF_PORT:
            procs = {"A": srv, "B": cli}
    wait_tcp_listen(link.b, KCPTUN_IPERF_PORT)
    wait_tcp_listen(link.b, KCPTUN_ECHO_PORT)
    return RowSetup("127.0.0.1", "127.0.0.1", KCPTUN_IPERF_PORT, KCPTUN_ECHO_PORT, carrier_a=servers[1],
                    procs=procs)


def setup(row: str, tb: Testbed, link: Link, logdir: Path) -> RowSetup:
    if row == "kernel":
        return setup_kernel(tb, link)
    if row in ("pytier-plain", "pytier-kcp", "pytier-kcp-us", "pytier-quic", "pytier-auto", "pytier-kcp-fec"):
        return setup_pytier(tb, link, kcp=row in ("pytier-kcp", "pytier-kcp-us", "pytier-kcp-fec"),
                            quic=row == "pytier-quic", userspace=row == "pytier-kcp-us",
                            auto=row == "pytier-auto", fec=row == "pytier-kcp-fec")
    if row in ("easytier-plain", "easytier-kcp", "easytier-quic"):
        return setup_easytier(tb, link, kcp=row == "easytier-kcp", quic=row == "easytier-quic")
    return setup_kcptun(tb, link, logdir)


def clear_row(link: Link) -> None:
    """End every process of the previous row in A and B by PID and wait until its TUN devices went."""
    underlay = {link.a.name: link.if_a, link.b.name: link.if_b}
    for ns in (link.a, link.b):
        ns.stop_processes()

        def only_underlay(ns: Netns = ns) -> bool:
            names = {i["ifname"] for i in json.loads(ns.run(["ip", "-j", "link", "show"]).stdout)}
            return names <= {"lo", underlay[ns.name]} and not ns.pids()

        wait_for(only_underlay, 10, f"{ns.name} to be free of the previous row's nodes", interval=0.1)


# ---- measurements -----------------------------------------------------------------------------


def carrier_in_a(a: Netns, port: int) -> int | None:
    """The PID of the process in A that holds a connection to the server port, if any (a proxy's
    destination side); None when the server's peer is the client itself in B."""
    out = a.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"], check=False).stdout
    match = re.search(r"pid=(\d+)", out)
    return int(match.group(1)) if match else None


def probe_rtt(link: EmulatedLink, via: RowSetup, cell: Cell, count: int, seconds: float) -> None:
    srv = link.a.popen(python_module("pytier.testbed.rtt_probe", "server", "--bind", via.bind_ip, "--port",
                                     str(ECHO_PORT), "--lifetime", str(seconds + 60)),
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    cli: subprocess.Popen[str] | None = None
    try:
        assert srv.stdout is not None
        if srv.stdout.readline().strip() != "listening":
            raise RuntimeError("rtt_probe server did not start")
        cli = link.b.popen(python_module("pytier.testbed.rtt_probe", "client", "--host", via.connect_ip,
                                         "--port", str(via.echo_port), "--count", str(count),
                                         "--seconds", str(seconds)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        accepted = ["ss", "-Htn", "state", "established", f"( sport = :{ECHO_PORT} )"]
        wait_for(lambda: link.a.run(accepted, check=False).stdout.strip(), 30, "the echo server to accept")
        carrier = carrier_in_a(link.a, ECHO_PORT)
        if carrier != via.carrier_a:
            cell.notes.append(f"PATH CHECK FAILED: connection in A held by pid {carrier}, "
                              f"expected {via.carrier_a}")
        if via.pytier_src is not None:
            kinds = sorted({r["transport_type"] for r in via.pytier_src.cli("proxy")})
            expected = [via.proxy_kind] if via.carrier_a is not None else []
            if kinds != expected:
                cell.notes.append(f"PATH CHECK FAILED: pytier-cli proxy on B shows {kinds}, "
                                  f"expected {expected}")
        out, err = cli.communicate(timeout=seconds + 60)
        result: dict[str, Any] = json.loads(out) if out.strip() else {"rtt_ms": [], "error": err[-200:]}
    finally:
        if cli is not None:
            stop_process(cli)
        stop_process(srv)
    samples: list[float] = result["rtt_ms"]
    if samples:
        cell.p50, cell.p99 = percentile(samples, 50), percentile(samples, 99)
        if samples[0] > 3 * cell.p50:
            cell.notes.append(f"first request took {samples[0]:.0f} ms (p50 {cell.p50:.0f} ms)")
    cell.rtt_incomplete = len(samples) < count
    if len(samples) < count or result.get("error"):
        cell.notes.append(f"rtt: {len(samples)}/{count} requests answered within {seconds:.0f} s"
                          + (", one cut off unanswered" if result.get("cut_short") else "")
                          + (f", error: {result['error']}" if result.get("error") else ""))


def run_iperf(link: Link, via: RowSetup, cell: Cell, seconds: int,
              during: Callable[[float], None] | None = None,
              extra: Sequence[str] = ()) -> dict[str, Any] | None:
    """One iperf3 -C cubic flow B->A (client options `extra` added); fills goodput and CPU into
    `cell` and returns iperf3's report. `during` runs while the client does, given the monotonic
    time the client was started at."""
    # -J on the server too: the client's --get-server-output then carries the receiver's intervals as JSON.
    srv = link.a.popen(["iperf3", "-s", "-1", "-J", "-B", via.bind_ip, "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client: subprocess.Popen[str] | None = None
    try:
        wait_tcp_listen(link.a, IPERF_PORT)
        cpu0 = {k: cpu_seconds(p.pid) for k, p in via.procs.items()}
        argv = ["iperf3", "-c", via.connect_ip, "-p", str(via.iperf_port), "-J", "-C", "cubic",
                "-t", str(seconds), *extra]
        started = time.monotonic()
        client = link.b.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if during is not None:
            during(started)
        try:
            out, err = client.communicate(timeout=max(1.0, started + seconds + 60 - time.monotonic()))
        except subprocess.TimeoutExpired:
            cell.notes.append(f"iperf3 did not finish within {seconds + 60} s")
            return None
        cell.cpu = {k: cpu_seconds(p.pid) - cpu0[k] for k, p in via.procs.items() if p.poll() is None}
        try:
            report: dict[str, Any] = json.loads(out)
        except ValueError:
            cell.notes.append(f"iperf3 exit {client.returncode}: {err.strip()[-200:]}")
            return None
        if "error" in report:
            cell.notes.append(f"iperf3: {report['error']}")
        end = report.get("end", {})
        if "sum_received" in end:
            cell.mbit = float(end["sum_received"]["bits_per_second"]) / 1e6
        idle = [i for i, iv in enumerate(report.get("intervals", [])) if iv["sum"]["bytes"] == 0]
        if idle:
            cell.notes.append(f"iperf3 sender moved no bytes in {len(idle)} of the 1 s intervals (at {idle})")
        return report
    finally:
        if client is not None:
            stop_process(client)
        stop_process(srv)


def loss_tag(link: EmulatedLink) -> str:
    return f"{link.params.ab.loss_pct:g}pct"


def scan_logs(via: RowSetup, cell: Cell, keep_as: Path) -> None:
    """Keep the node logs next to the others and note their warnings, errors and tracebacks."""
    for log in via.logs:
        kept = keep_as.with_name(f"{keep_as.name}-{log.name}")
        shutil.copyfile(log, kept)
        alarms = [line for line in log.read_text(errors="replace").splitlines() if LOG_ALARM.search(line)]
        if alarms:
            cell.notes.append(f"{len(alarms)} alarm line(s) in {kept}, first: {alarms[0][:200]}")


def measure_row(row: str, tb: Testbed, link: EmulatedLink, logdir: Path, log_name: str, cell: Cell, *,
                rtt_count: int, rtt_seconds: float, flow: Callable[[RowSetup], object]) -> None:
    """Set up a row, probe its round trips, run `flow` (the bulk transfer) and record what the
    emulator did to the data direction meanwhile; a failure becomes a note in `cell`. The row's
    processes are always ended and its logs kept as `log_name`-<log> in `logdir`."""
    via: RowSetup | None = None
    try:
        via = setup(row, tb, link, logdir)
        probe_rtt(link, via, cell, rtt_count, rtt_seconds)
        before = link_counters_now(link).ba
        flow(via)
        cell.data_dir = counters_since(before, link_counters_now(link).ba)
        if cell.data_dir.socket_dropped or cell.data_dir.send_failed:
            cell.notes.append(f"the emulator fell behind: {cell.data_dir.socket_dropped} B->A frames dropped "
                              f"unread, {cell.data_dir.send_failed} refused on send")
        for name, proc in via.procs.items():
            if proc.poll() is not None:
                cell.notes.append(f"{name} (pid {proc.pid}) exited with {proc.returncode} during the row")
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        last = f" ... {lines[-1].strip()[:200]}" if len(lines) > 1 else ""
        cell.notes.append(f"FAILED: {type(exc).__name__}: {lines[0][:200]}{last}")
    finally:
        if via is not None:
            scan_logs(via, cell, logdir / log_name)
        clear_row(link)


def measure(row: str, tb: Testbed, link: EmulatedLink, args: argparse.Namespace, logdir: Path) -> Cell:
    cell = Cell()
    measure_row(row, tb, link, logdir, f"{row}-{loss_tag(link)}", cell, rtt_count=args.rtt_count,
                rtt_seconds=args.rtt_seconds, flow=lambda via: run_iperf(link, via, cell, args.seconds))
    return cell


# ---- the table --------------------------------------------------------------------------------


def seed_for(loss: float) -> int:
    return 1000 + round(loss * 10)


def grid(rows: list[str], levels: list[float], text: Callable[[str, float], str]) -> None:
    print(f"{'loss each way':26}" + "".join(f"{f'{x:g}%':>17}" for x in levels))
    for row in rows:
        print(f"{ROWS[row]:26}" + "".join(f"{text(row, x):>17}" for x in levels))


def fmt_cpu(cell: Cell) -> str:
    return f"{cell.cpu['A']:.1f} / {cell.cpu['B']:.1f}" if len(cell.cpu) == 2 else "-"


def fmt_frames(cell: Cell) -> str:
    d = cell.data_dir
    if d is None or not d.received:
        return "-"
    lost, dropped = 100 * d.lost / d.received, 100 * d.queue_dropped / d.received
    return f"{d.received / 1000:.0f}k {lost:.1f} {dropped:.1f}"


def fmt_cell(cell: Cell) -> str:
    mbit = f"{cell.mbit:.1f}" if cell.mbit is not None else "fail"
    rtt = f"{cell.p50:.0f}/{cell.p99:.0f}" if cell.p50 is not None and cell.p99 is not None else "-"
    rtt += "*" if cell.rtt_incomplete else ""
    return f"{mbit:>6} {rtt:>9}"


def git_revision() -> str:
    """The revision of the pytier tree that the nodes import (this checkout or another on PYTHONPATH)."""
    out = subprocess.run(["git", "-C", str(PYTIER_SRC), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out or "unknown"


def source_digest() -> str:
    """A digest of every pytier source file, to notice when the code under test changes mid-run."""
    h = hashlib.sha256()
    for path in sorted(PYTIER_SRC.rglob("*.py")):
        h.update(str(path.relative_to(PYTIER_SRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class BenchRun:
    """What a benchmark's table header says about the run: the command, when, which pytier."""

    command: str
    started: str
    logdir: Path
    revision: str
    digest: str
    t0: float

    @classmethod
    def begin(cls, name: str) -> BenchRun:
        argv = ["sudo", ".venv/bin/python", *sys.argv] if os.getuid() == 0 else sys.argv
        logdir = Path(f"/tmp/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        logdir.mkdir(parents=True, exist_ok=True)
        return cls(" ".join(argv), time.strftime("%Y-%m-%d %H:%M"), logdir, git_revision(), source_digest(),
                   time.monotonic())

    def print_header(self) -> None:
        total = time.monotonic() - self.t0
        print(f"\n$ {self.command}")
        print(f"({self.started}, {os.cpu_count()} cores, pytier {self.revision} from {PYTIER_SRC.parent}, "
              f"wall time {total / 60:.1f} min)")
        if source_digest() != self.digest:
            print(f"WARNING: pytier's sources changed during the run (now {git_revision()}); rows measured "
                  "at different times may have run different code.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default=DEFAULT_LOSS,
                        help=f"loss levels in %% each way (default {DEFAULT_LOSS})")
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 -t (default 10)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--rtt-count", type=int, default=100,
                        help="request/response pairs at most (default 100)")
    parser.add_argument("--rtt-seconds", type=float, default=15.0,
                        help="time budget for the request/response pairs (default 15)")
    args = parser.parse_args()
    args.loss_levels = [float(x) for x in args.loss.split(",") if x.strip()]
    args.row_names = [x.strip() for x in args.rows.split(",") if x.strip()]
    unknown = [r for r in args.row_names if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    if any(not 0 <= x < 100 for x in args.loss_levels):
        parser.error("loss levels must be within 0..100")
    return args


def main() -> int:
    args = parse_args()
    run = BenchRun.begin("proxy_goodput")
    logdir, t0 = run.logdir, run.t0
    cells: dict[tuple[str, float], Cell] = {}
    for loss in args.loss_levels:
        with Testbed() as tb:
            link = tb.linked_pair(DELAY_MS, loss, RATE_MBIT, queue_ms=QUEUE_MS, seed=seed_for(loss))
            for row in args.row_names:
                t_row = time.monotonic()
                cells[row, loss] = cell = measure(row, tb, link, args, logdir)
                print(f"[{time.monotonic() - t0:5.0f} s] {loss:g}% {ROWS[row]}: {fmt_cell(cell).strip()} "
                      f"({time.monotonic() - t_row:.0f} s)", file=sys.stderr, flush=True)
            link.stop()

    levels = args.loss_levels
    run.print_header()
    print(f"A - emulator - B: {DELAY_MS:g} ms one way, {RATE_MBIT:g} Mbit/s, {QUEUE_MS:g} ms queue, "
          f"random loss each way (emulator seed 1000 + 10 x loss %);")
    print(f"iperf3 -C cubic -t {args.seconds}, one flow, client in B, server in A;")
    print(f"64-byte request/response over one TCP connection, sequential, up to {args.rtt_count} "
          f"within {args.rtt_seconds:g} s.")
    print("Each cell: goodput Mbit/s, then round trip p50/p99 ms (* over fewer requests: the budget ran out, "
          "see notes).")
    grid(args.row_names, levels, lambda row, x: fmt_cell(cells[row, x]))
    print(f"\nCPU seconds of node A / node B during the iperf3 run ({args.seconds} s):")
    grid([r for r in args.row_names if r != "kernel"], levels, lambda row, x: fmt_cpu(cells[row, x]))
    print("\nEmulator during the iperf3 run, data direction B->A: frames offered, % lost at random, "
          f"% dropped by the {QUEUE_MS:g} ms queue:")
    grid(args.row_names, levels, lambda row, x: fmt_frames(cells[row, x]))
    notes = [(row, x, n) for row in args.row_names for x in levels for n in cells[row, x].notes]
    if notes:
        print("\nNotes:")
        for row, x, note in notes:
            print(f"  {row} @ {x:g}%: {note}")
    print(f"\nNode and kcptun logs: {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
