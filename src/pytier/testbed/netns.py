"""Network-namespace testbed for end-to-end tests and benchmarks.

Everything a Testbed creates lives in namespaces named with one short per-run prefix, and is torn
down by the Testbed: its processes are ended by PID (SIGTERM, then SIGKILL) and its namespaces
deleted, even when the test fails. Underlay addresses come from 198.18.0.0/15 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from types import TracebackType
from typing import Any

from pytier.testbed.linkem import LinkCounters, LinkParams

__all__ = [
    "IFNAME_MAX",
    "UNDERLAY",
    "CommandFailed",
    "EmulatedLink",
    "Netns",
    "Testbed",
    "Veth",
    "delete_namespaces",
    "disable_offloads",
    "iperf3",
    "list_namespaces",
    "nft_clear_loss",
    "nft_input_loss",
    "run_prefix",
    "stop_process",
    "veth",
    "wait_link_up",
    "wait_tcp_listen",
]

UNDERLAY = IPv4Network("198.18.0.0/15")
IFNAME_MAX = 15  # characters; IFNAMSIZ is 16 including the terminating NUL
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
COMMAND_TIMEOUT = 30.0  # seconds; default bound for one `run`
IPERF3_PORT = 5201

# Features that could hand frames larger than the MTU to a veth peer, or leave checksums for
# "hardware" to fill in, which a packet socket would then copy out unfilled.
OFFLOAD_FEATURES = (
    "tso",
    "gso",
    "gro",
    "tx",
    "rx",
    "sg",
    "tx-udp-segmentation",
    "tx-gso-list",
    "tx-sctp-segmentation",
    "tx-gre-segmentation",
    "tx-gre-csum-segmentation",
    "tx-ipxip4-segmentation",
    "tx-ipxip6-segmentation",
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
)


class CommandFailed(subprocess.CalledProcessError):
    """A command in a namespace failed; unlike CalledProcessError, the message carries its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else ""
        return f"{super().__str__()}{': ' + err if err else ''}"


def _argv(cmd: Sequence[str] | str) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _host(
    cmd: Sequence[str] | str,
    *,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = _argv(cmd)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def list_namespaces() -> list[str]:
    out = _host(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def run_prefix() -> str:
    """A fresh short prefix ('pt' + 4 hex digits) that no existing namespace starts with."""
    existing = list_namespaces()
    for _ in range(100):
        prefix = "pt" + secrets.token_hex(2)
        if not any(name.startswith(prefix) for name in existing):
            return prefix
    raise RuntimeError("no free namespace prefix found after 100 tries")


def stop_process(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int:
    """End `proc` by its PID: SIGTERM, wait up to `timeout`, then SIGKILL. Return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class _Libc:
    """setns(2) for Python 3.11, which lacks os.setns."""

    _lib: ctypes.CDLL | None = None

    @classmethod
    def setns(cls, fd: int, nstype: int) -> None:
        if cls._lib is None:
            cls._lib = ctypes.CDLL(None, use_errno=True)
        if cls._lib.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns failed: {os.strerror(err)}")


class Netns:
    """A named network namespace (as `ip netns` knows it) and the processes started in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[Any]] = []

    @classmethod
    def create(cls, name: str, *, forwarding: bool = False, ipv6: bool = False) -> Netns:
        """Create the namespace, bring `lo` up and set its sysctls.

        IPv6 is off unless asked for: router solicitations, DAD and MLD would otherwise put
        unsolicited frames on every link, which muddles packet counts in tests.
        """
        _host(["ip", "netns", "add", name])
        ns = cls(name)
        try:
            ns.run(["ip", "link", "set", "lo", "up"])
            ns.sysctl(
                {
                    "net.ipv4.ip_forward": int(forwarding),
                    "net.ipv6.conf.all.disable_ipv6": int(not ipv6),
                    "net.ipv6.conf.default.disable_ipv6": int(not ipv6),
                }
            )
        except BaseException:
            _host(["ip", "netns", "delete", name], check=False)
            raise
        return ns

    def argv(self, cmd: Sequence[str] | str) -> list[str]:
        """The host command line that runs `cmd` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *_argv(cmd)]

    def run(
        self,
        cmd: Sequence[str] | str,
        check: bool = True,
        *,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the namespace to completion (bounded by `timeout`), capturing text output."""
        return _host(self.argv(cmd), check=check, timeout=timeout, input=input)

    def popen(self, cmd: Sequence[str] | str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `cmd` in the namespace. The process is remembered and ended by `delete()`.

        `ip netns exec` execs the command in place, so the Popen's PID is the command's own.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(cmd), **kwargs)
        self.processes.append(proc)
        return proc

    def sysctl(self, settings: dict[str, int | str]) -> None:
        self.run(["sysctl", "-q", "-w", *(f"{key}={value}" for key, value in settings.items())])

    def pids(self) -> list[int]:
        out = _host(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(tok) for tok in out.split() if tok.isdigit()]

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """Move the calling thread into this namespace for the `with` block, then back.

        Sockets and TUN devices opened inside stay in this namespace after the block ends.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(os.path.join(NETNS_RUN_DIR, self.name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _Libc.setns(target, CLONE_NEWNET)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _Libc.setns(own, CLONE_NEWNET)
        finally:
            os.close(own)

    def stop_processes(self, timeout: float = STOP_TIMEOUT) -> None:
        """End every process started here (SIGTERM to all, wait, SIGKILL), then any stray PID left."""
        _stop_all(self.processes, timeout)
        self.processes.clear()
        for pid in self.pids():
            if pid == os.getpid():
                continue  # a thread of ours may have entered the namespace; never end ourselves
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def delete(self) -> None:
        self.stop_processes()
        _host(["ip", "netns", "delete", self.name], check=False)

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def _stop_all(procs: Sequence[subprocess.Popen[Any]], timeout: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for proc in procs:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def delete_namespaces(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with `prefix`, ending the processes inside first."""
    if len(prefix) < 4:
        raise ValueError(f"prefix {prefix!r} is too short to delete namespaces by")
    gone = [name for name in list_namespaces() if name.startswith(prefix)]
    for name in gone:
        Netns(name).delete()
    return gone


def _underlay(addr: IPv4Interface | str) -> IPv4Interface:
    iface = IPv4Interface(addr)
    if iface.ip not in UNDERLAY:
        raise ValueError(f"underlay address {iface} is outside {UNDERLAY}")
    return iface


def _check_ifname(name: str) -> str:
    if not name or len(name) > IFNAME_MAX:
        raise ValueError(f"interface name {name!r} must be 1 to {IFNAME_MAX} characters")
    return name


@dataclass(frozen=True)
class Veth:
    ns_a: Netns
    ifname_a: str
    ns_b: Netns
    ifname_b: str
    addr_a: IPv4Interface | None
    addr_b: IPv4Interface | None


def veth(
    ns_a: Netns,
    ifname_a: str,
    ns_b: Netns,
    ifname_b: str,
    addr_a: IPv4Interface | str | None,
    addr_b: IPv4Interface | str | None,
    *,
    mtu: int = 1500,
    offloads: bool = False,
) -> Veth:
    """Join two namespaces with a veth pair and bring both ends up.

    Addresses (from 198.18.0.0/15 only) are optional: a bridge namespace wants none. Offloads are
    switched off unless `offloads=True`, so no frame bigger than the MTU crosses the pair.
    """
    a = _underlay(addr_a) if addr_a is not None else None
    b = _underlay(addr_b) if addr_b is not None else None
    _check_ifname(ifname_a)
    _check_ifname(ifname_b)
    # Distinct interface indexes on the two ends: when both ends share one index (each namespace
    # counts from 1), the kernel treats the carrier change as non-urgent and the link stays
    # without carrier, dropping what is sent, for about a second.
    index_a = 1000 + secrets.randbelow(1 << 20)
    index_b = index_a + 1
    ns_a.run(
        f"ip link add {ifname_a} index {index_a} mtu {mtu} type veth"
        f" peer name {ifname_b} index {index_b} mtu {mtu} netns {ns_b.name}"
    )
    for ns, ifname, addr in ((ns_a, ifname_a, a), (ns_b, ifname_b, b)):
        if not offloads:
            disable_offloads(ns, ifname)
        if addr is not None:
            ns.run(["ip", "addr", "add", str(addr), "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
    wait_link_up(ns_a, ifname_a)
    wait_link_up(ns_b, ifname_b)
    return Veth(ns_a, ifname_a, ns_b, ifname_b, a, b)


def wait_link_up(ns: Netns, ifname: str, timeout: float = 5.0) -> None:
    """Wait until `ifname` in `ns` has carrier (operstate UP), so that frames sent are not lost."""
    deadline = time.monotonic() + timeout
    while True:
        out = ns.run(["ip", "-j", "link", "show", "dev", ifname]).stdout
        if json.loads(out)[0].get("operstate") == "UP":
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{ifname} in {ns.name} has no carrier after {timeout} s")
        time.sleep(0.02)


def disable_offloads(ns: Netns, ifname: str) -> None:
    """Switch off segmentation, GRO and checksum offloads on `ifname` (ethtool -K)."""
    args: list[str] = []
    for feature in OFFLOAD_FEATURES:
        args += [feature, "off"]
    ns.run(["ethtool", "-K", ifname, *args])


def _loss_table(ifname: str) -> str:
    return f"pytier_loss_{ifname}".replace("-", "_").replace(".", "_")


def nft_input_loss(ns: Netns, ifname: str, percent: int) -> None:
    """Drop `percent` % of the IPv4 packets arriving on `ifname` (nft numgen random, ingress hook).

    Only the receive side is touched: dropping on output would make the sender's own stack see
    local errors (ENOBUFS) instead of silent loss. ARP is never dropped. Calling again replaces
    the rule; `percent` 0 removes it.
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"loss percent {percent} is not within 0..100")
    table = _loss_table(ifname)
    script = f"table netdev {table}\ndelete table netdev {table}\n"
    if percent:
        draw = "" if percent == 100 else f"numgen random mod 100 < {int(percent)} "
        script += (
            f"table netdev {table} {{\n"
            f"  chain ingress {{\n"
            f'    type filter hook ingress device "{ifname}" priority 0;\n'
            f"    meta protocol ip {draw}drop\n"
            f"  }}\n"
            f"}}\n"
        )
    ns.run(["nft", "-f", "-"], input=script)


def nft_clear_loss(ns: Netns, ifname: str) -> None:
    nft_input_loss(ns, ifname, 0)


def wait_tcp_listen(ns: Netns, port: int, timeout: float = 10.0) -> None:
    """Wait until something in `ns` listens on TCP `port`, without connecting to it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on TCP port {port} in {ns.name} after {timeout} s")


def iperf3(
    client: Netns,
    server: Netns,
    server_ip: IPv4Address | str,
    args: Sequence[str] = (),
    *,
    port: int = IPERF3_PORT,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run one iperf3 test from `client` to a one-off server in `server`; return iperf3's JSON report.

    `args` go to the client (e.g. ["-t", "3", "-C", "cubic"] or ["-u", "-b", "100M"]). The server is
    ended by PID whatever happens.
    """
    srv = server.popen(
        ["iperf3", "-s", "-1", "-B", str(server_ip), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_tcp_listen(server, port)
        argv = ["iperf3", "-c", str(server_ip), "-p", str(port), "-J", *args]
        proc = client.run(argv, check=False, timeout=timeout)
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr) from None
        if "error" in report or proc.returncode != 0:
            raise CommandFailed(proc.returncode, argv, proc.stdout, str(report.get("error", proc.stderr)))
        return report
    finally:
        stop_process(srv)
        if srv in server.processes:
            server.processes.remove(srv)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes]:
    """Read stdout up to the first newline (raw fd, so a later communicate() loses nothing)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line from {proc.args!r} after {timeout} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{proc.args!r} exited (status {proc.wait()}) before saying a line")
            data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


@dataclass
class EmulatedLink:
    """Node A -- veth -- M (link emulator) -- veth -- node B, as built by `Testbed.linked_pair`."""

    a: Netns
    m: Netns
    b: Netns
    if_a: str  # A's interface toward M
    if_b: str  # B's interface toward M
    addr_a: IPv4Interface
    addr_b: IPv4Interface
    params: LinkParams
    process: subprocess.Popen[bytes]
    _early_output: bytes = b""
    counters: LinkCounters | None = None

    @property
    def ip_a(self) -> IPv4Address:
        return self.addr_a.ip

    @property
    def ip_b(self) -> IPv4Address:
        return self.addr_b.ip

    def stop(self, timeout: float = STOP_TIMEOUT) -> LinkCounters:
        """End the emulator (SIGTERM) and return the counters it printed on the way out."""
        if self.counters is not None:
            return self.counters
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate(timeout=timeout)
        self.counters = LinkCounters.parse((self._early_output + (out or b"")).decode())
        return self.counters

    def next_phase(self) -> None:
        """Switch the emulator to the next of `params.phases` (SIGUSR2); it says so on its stderr."""
        if self.process.poll() is not None:
            raise RuntimeError(f"link emulator exited (status {self.process.returncode})")
        self.process.send_signal(signal.SIGUSR2)


class Testbed:
    """Owns namespaces and processes for one test; `close()` (or leaving the `with`) removes them all."""

    __test__ = False  # a helper, not a test class, whatever pytest makes of its name

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else run_prefix()
        self.namespaces: list[Netns] = []
        self._links = 0

    def name(self, role: str) -> str:
        name = self.prefix + role
        if len(name) > IFNAME_MAX:
            raise ValueError(f"name {name!r} (prefix {self.prefix!r} + role {role!r}) exceeds 15 characters")
        return name

    def netns(self, role: str, *, forwarding: bool = False, ipv6: bool = False) -> Netns:
        ns = Netns.create(self.name(role), forwarding=forwarding, ipv6=ipv6)
        self.namespaces.append(ns)
        return ns

    def veth(
        self,
        ns_a: Netns,
        ns_b: Netns,
        addr_a: IPv4Interface | str | None,
        addr_b: IPv4Interface | str | None,
        *,
        mtu: int = 1500,
        offloads: bool = False,
    ) -> Veth:
        """A veth pair named after the two namespaces (`<ns_a>` toward b, `<ns_b>` toward a)."""
        return veth(ns_a, self._ifname(ns_a, ns_b), ns_b, self._ifname(ns_b, ns_a), addr_a, addr_b, mtu=mtu,
                    offloads=offloads)

    def _ifname(self, ns: Netns, peer: Netns) -> str:
        return _check_ifname(ns.name + peer.name.removeprefix(self.prefix)[:IFNAME_MAX])

    def popen(self, ns: Netns, cmd: Sequence[str] | str, **kwargs: Any) -> subprocess.Popen[Any]:
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} does not belong to this testbed")
        return ns.popen(cmd, **kwargs)

    def linked_pair(
        self,
        delay_ms: float = 0.0,
        loss_pct: float = 0.0,
        rate_mbit: float | None = None,
        *,
        queue_ms: float | None = None,
        queue_bytes: int | None = None,
        seed: int | None = None,
        loss_ab: float | None = None,
        loss_ba: float | None = None,
        delay_ab: float | None = None,
        delay_ba: float | None = None,
        rate_ab: float | None = None,
        rate_ba: float | None = None,
        params: LinkParams | None = None,
        subnet: IPv4Network | str = "198.18.0.0/24",
        mtu: int = 1500,
        ready_timeout: float = 10.0,
    ) -> EmulatedLink:
        """Build A -- M -- B with the link emulator running in M.

        A and B get the first two host addresses of `subnet` on one L2 segment; M has no
        addresses and bridges frames between its two veth ends. "ab" is the direction A to B.
        The link settings are either the keyword arguments or, for everything else the emulator
        can do (burst loss, policer, reordering, phases), `params` as it is; not both.
        """
        net = IPv4Network(subnet)
        if not net.subnet_of(UNDERLAY):
            raise ValueError(f"subnet {net} is outside {UNDERLAY}")
        if params is None:
            params = LinkParams.both_ways(
                delay_ms=delay_ms,
                loss_pct=loss_pct,
                rate_mbit=rate_mbit,
                queue_ms=queue_ms,
                queue_bytes=queue_bytes,
                loss_ab=loss_ab,
                loss_ba=loss_ba,
                delay_ab=delay_ab,
                delay_ba=delay_ba,
                rate_ab=rate_ab,
                rate_ba=rate_ba,
            )
        else:
            shared = (rate_mbit, queue_ms, queue_bytes)
            per_direction = (loss_ab, loss_ba, delay_ab, delay_ba, rate_ab, rate_ba)
            if delay_ms or loss_pct or any(v is not None for v in (*shared, *per_direction)):
                raise ValueError("linked_pair takes either params or the link keyword arguments, not both")
        hosts = net.hosts()
        addr_a = IPv4Interface(f"{next(hosts)}/{net.prefixlen}")
        addr_b = IPv4Interface(f"{next(hosts)}/{net.prefixlen}")
        tag = str(self._links) if self._links else ""
        self._links += 1
        a = self.netns(f"{tag}a")
        m = self.netns(f"{tag}m")
        b = self.netns(f"{tag}b")
        va = self.veth(a, m, addr_a, None, mtu=mtu)
        vb = self.veth(b, m, addr_b, None, mtu=mtu)
        argv = [
            sys.executable,
            "-m",
            "pytier.testbed.linkem",
            "--if-a",
            va.ifname_b,
            "--if-b",
            vb.ifname_b,
            *params.to_argv(),
        ]
        if seed is not None:
            argv += ["--seed", str(seed)]
        proc = m.popen(argv, stdout=subprocess.PIPE)
        line, rest = _read_line(proc, ready_timeout)
        if not line.startswith(b"linkem ready"):
            raise RuntimeError(f"link emulator said {line!r} instead of being ready")
        return EmulatedLink(a, m, b, va.ifname_a, vb.ifname_a, addr_a, addr_b, params, proc, rest)

    def close(self) -> None:
        """End every process (SIGTERM, then SIGKILL) and delete every namespace, newest first."""
        _stop_all([p for ns in self.namespaces for p in ns.processes], STOP_TIMEOUT)
        errors: list[BaseException] = []
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except Exception as exc:
                errors.append(exc)
        self.namespaces.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise
