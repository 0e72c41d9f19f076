"""Real pytier-core and EasyTier processes inside testbed namespaces, and the traffic tests send.

Every process here is started through the Testbed (so it is ended by PID on teardown) and every
wait is bounded in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pytier.testbed.easytier_runner import easytier_toml
from pytier.testbed.netns import Netns, Testbed, stop_process

BIN = Path(sys.executable).parent


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class PytierNode:
    """One ``pytier-core`` process in a namespace, queried through the real ``pytier-cli``."""

    def __init__(self, tb: Testbed, ns: Netns, args: Sequence[str], *, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.tb = tb
        self.env = {**os.environ, **env} if env else None
        self.ns = ns
        self.name = name
        self.args = list(args)
        fd, path = tempfile.mkstemp(prefix=f"pytier-{name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self.proc: subprocess.Popen[bytes] | None = None
        # The launcher: a benchmark may put a profiler in front of the same entry point.
        self.wrap: list[str] = [str(BIN / "pytier-core")]

    def start(self) -> PytierNode:
        argv = [*self.wrap, "--hostname", self.name, "--console-log-level", "debug", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = self.tb.popen(self.ns, argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_for(lambda: self._alive() and self.cli_ok("node"), 15, f"{self.name} to start")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return True

    def cli_ok(self, command: str) -> bool:
        return self.ns.run([str(BIN / "pytier-cli"), "-o", "json", command], check=False).returncode == 0

    def cli(self, command: str) -> Any:
        out = self.ns.run([str(BIN / "pytier-cli"), "-o", "json", command]).stdout
        return json.loads(out)

    def cli_table(self, command: str) -> str:
        # Whole, whatever COLUMNS the test runner leaves in the environment.
        return str(self.ns.run([str(BIN / "pytier-cli"), "--no-trunc", command]).stdout)

    def route_ips(self) -> set[str]:
        return {r["ipv4"] for r in self.cli("route") if r.get("ipv4")}

    def wait_route(self, ipv4: str, timeout: float = 20.0) -> None:
        wait_for(lambda: self._alive() and ipv4 in self.route_ips(), timeout, f"{self.name} to learn {ipv4}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def route_ipv4(route: dict[str, Any]) -> str | None:
    """The virtual IPv4 of one entry of the real node's ``routes()``: it reports the address as the
    big-endian u32 of the wire message (``{"ipv4_addr": {"address": {"addr": N}, ...}}``)."""
    addr = (route.get("ipv4_addr") or {}).get("address", {}).get("addr")
    return None if addr is None else str(IPv4Address(int(addr)))


class EasyTierNode:
    """The real EasyTier core (easytier-pyo3) in a namespace, driven by the runner's line protocol."""

    def __init__(self, tb: Testbed, ns: Netns, *, name: str, ipv4: str | None, listeners: list[str],
                 peers: list[str], network_name: str, network_secret: str,
                 flags: dict[str, Any] | None = None, proxy_networks: list[str] | None = None) -> None:
        self.tb = tb
        self.ns = ns
        self.name = name
        fd, path = tempfile.mkstemp(prefix=f"easytier-{name}-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(easytier_toml(network_name=network_name, network_secret=network_secret, ipv4=ipv4,
                                  listeners=listeners, peers=peers, hostname=name, flags=flags,
                                  proxy_networks=proxy_networks))
        self.config_path = Path(path)
        self.proc: subprocess.Popen[str] | None = None
        self.peer_id = 0

    def start(self) -> EasyTierNode:
        argv = [sys.executable, "-m", "pytier.testbed.easytier_runner", str(self.config_path)]
        self.proc = self.tb.popen(self.ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        hello = self._read_line(30)
        if not hello.get("ready"):
            raise RuntimeError(f"EasyTier {self.name} did not start: {hello}")
        self.peer_id = int(hello["peer_id"])
        return self

    def _read_line(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"EasyTier {self.name} did not answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"EasyTier {self.name} exited ({self.proc.poll()})")
        return dict(json.loads(line))

    def query(self, cmd: str) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self._read_line(10)
        if not reply.get("ok"):
            raise RuntimeError(f"EasyTier {self.name} {cmd}: {reply}")
        return reply["result"]

    def routes(self) -> list[dict[str, Any]]:
        return list(self.query("routes"))

    def route_for(self, ipv4: str) -> dict[str, Any] | None:
        for r in self.routes():
            if route_ipv4(r) == ipv4:
                return r
        return None

    def wait_route(self, ipv4: str, timeout: float = 30.0) -> dict[str, Any]:
        return dict(wait_for(lambda: self.route_for(ipv4), timeout, f"EasyTier {self.name} to learn {ipv4}",
                             interval=0.5))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            stop_process(self.proc)


# ---- traffic --------------------------------------------------------------------------------

_SINK = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(float(sys.argv[3]))
h = hashlib.sha256(); n = 0; expect = int(sys.argv[4])
while expect < 0 or n < expect:
    b = c.recv(1 << 16 if expect < 0 else min(1 << 16, expect - n))
    if not b: break
    h.update(b); n += len(b)
c.sendall(h.hexdigest().encode()); c.close()
print(n, h.hexdigest(), flush=True)
"""

_SOURCE = r"""
import hashlib, random, socket, sys
total = int(sys.argv[3]); rng = random.Random(int(sys.argv[4]))
c = socket.socket()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[7].encode())
c.settimeout(float(sys.argv[5])); c.connect((sys.argv[1], int(sys.argv[2])))
h = hashlib.sha256(); sent = 0
while sent < total:
    chunk = rng.randbytes(min(1 << 16, total - sent)); c.sendall(chunk); h.update(chunk); sent += len(chunk)
if sys.argv[6] == "1":
    c.shutdown(socket.SHUT_WR)
echo = b""
while len(echo) < 64:
    b = c.recv(128)
    if not b: break
    echo += b
print(sent, h.hexdigest(), echo.decode(), flush=True)
"""


def tcp_transfer(tb: Testbed, server_ns: Netns, client_ns: Netns, server_ip: str, nbytes: int,
                 *, port: int = 5201, timeout: float = 120.0, seed: int = 1,
                 half_close: bool = True, congestion: str = "cubic") -> tuple[int, str, str, float]:
    """Send ``nbytes`` of seeded random bytes over a real TCP connection; returns
    (bytes sent, sha256 the sender computed, sha256 the receiver computed, seconds taken).

    With ``half_close`` the sender ends its half with FIN and the receiver answers after EOF (the
    test of half-close); without, the receiver answers after ``nbytes``, for peers (EasyTier's
    proxies) that do not carry a half-close. The sender's congestion control is set explicitly
    (cubic, the default of most hosts): these namespaces default to BBR, which ignores loss."""
    expect = -1 if half_close else nbytes
    sink = tb.popen(server_ns, [sys.executable, "-c", _SINK, server_ip, str(port), str(timeout), str(expect)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    if sink.stdout.readline().strip() != "listening":
        raise RuntimeError(f"sink did not start: {sink.stderr.read() if sink.stderr else ''}")
    started = time.monotonic()
    out = client_ns.run([sys.executable, "-c", _SOURCE, server_ip, str(port), str(nbytes), str(seed),
                         str(timeout), "1" if half_close else "0", congestion], timeout=timeout + 10).stdout
    took = time.monotonic() - started
    sink.wait(timeout)
    sent, sha_sent, sha_echo = str(out).split()
    return int(sent), sha_sent, sha_echo, took


def sha256_of_seed(nbytes: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    h = hashlib.sha256()
    left = nbytes
    while left:
        n = min(1 << 16, left)
        h.update(rng.randbytes(n))
        left -= n
    return h.hexdigest()
