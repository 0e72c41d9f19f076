"""The user-space TCP stack against the Linux kernel's TCP, through a real TUN device in a namespace.

A kernel client connects to addresses routed into the TUN; the stack accepts those connections
(any-IP) and the pump moves packets between the TUN and the stack, optionally dropping some each
way. The other direction is covered too: the stack opens a connection to a kernel listener. Each
test reports the stack's throughput figures (run pytest with -s to see them); nothing asserts speed.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from pytier.netstack import (
    CloseReason,
    Connected,
    ConnectionClosed,
    DataReceived,
    Endpoint,
    FourTuple,
    NetStack,
    NetStackConfig,
    PeerFinished,
    SynReceived,
    Writable,
)
from pytier.testbed.netns import Netns, Testbed
from pytier.tun.device import TunDevice
from pytier.tun.netlink import LinkConfig

TUN_ADDR = IPv4Interface("10.144.144.1/24")
PEER = IPv4Address("10.144.144.2")  # another node's virtual address, inside the TUN's subnet
PROXIED_NET = IPv4Network("192.168.50.0/24")  # a subnet routed into the TUN
SUBNET_HOST = IPv4Address("192.168.50.7")
MTU = 1500
IO_TIMEOUT = 30.0  # seconds for any one socket operation
PUMP_LIMIT = 240.0  # seconds; the pump never runs longer than this
FLOW = 20 * 1024 * 1024  # bytes each way
CHUNK = 256 * 1024  # bytes per sendall/recv call on the kernel side
HOLD = 1024 * 1024  # bytes the side that closes second sends only after the other side's FIN
BENCH = int(os.environ.get("PYTIER_NETSTACK_BENCH_MIB", "100")) * 1024 * 1024  # bytes, one way

# A kernel-side client in its own process, so that it does not share the pump's GIL: it sends N zero
# bytes and half-closes ("up"), or reads to EOF ("down"), then prints the byte count.
BENCH_CLIENT = """
import socket, sys
host, port, mode, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sock = socket.create_connection((host, port), timeout=60)
got = 0
if mode == "up":
    chunk = bytes(256 * 1024)
    while got < size:
        got += sock.send(memoryview(chunk)[: size - got])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
else:
    while data := sock.recv(256 * 1024):
        got += len(data)
print(got)
"""


def ours(tup: FourTuple) -> bool:
    addr = tup.dst.addr
    return addr == PEER or addr in PROXIED_NET


@dataclass
class Flow:
    """What the stack side of one connection sends and has received."""

    outgoing: bytes
    hold: int = 0  # trailing bytes sent only once the peer has finished
    keep: bool = True  # keep what arrives (False: count it only)
    received_bytes: int = 0
    refuse: bool = False
    accept_after: float = 0.0  # seconds the SYN is held before the stack answers it
    syn_at: float = 0.0
    held: bool = False  # a SYN waits for accept
    accepted_at: float | None = None
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    connected: bool = False
    peer_finished: bool = False
    closed: CloseReason | None = None
    shut: bool = False


@dataclass
class Pump:
    """Moves packets between the TUN device and the stack, and plays the application on the stack side."""

    tun: TunDevice
    stack: NetStack
    make_flow: Callable[[SynReceived], Flow]
    loss: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    flows: dict[int, Flow] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None
    dropped_in: int = 0
    dropped_out: int = 0

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        tun, stack = self.tun, self.stack
        deadline = time.monotonic() + PUMP_LIMIT
        while not self.stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            timer = stack.get_timer()
            wait = 0.05 if timer is None else min(max(timer - now, 0.0), 0.05)
            ready, _, _ = select.select([tun.fd], [], [], wait)
            with self.lock:
                now = time.monotonic()
                if ready:
                    for _ in range(64):
                        packet = tun.read()
                        if packet is None:
                            break
                        if self.loss and self.rng.random() < self.loss:
                            self.dropped_in += 1
                            continue
                        stack.receive_packet(packet, now)
                timer = stack.get_timer()
                if timer is not None and timer <= now:
                    stack.handle_timer(now)
                self._app()
                for packet in stack.packets_to_send(now):
                    if self.loss and self.rng.random() < self.loss:
                        self.dropped_out += 1
                        continue
                    tun.write(packet)

    def _app(self) -> None:
        stack = self.stack
        while (event := stack.next_event()) is not None:
            if isinstance(event, SynReceived):
                flow = self.make_flow(event)
                flow.syn_at = time.monotonic()
                self.flows[event.handle] = flow
                if flow.refuse:
                    stack.refuse(event.handle)
                else:
                    flow.held = True
                continue
            flow = self.flows[event.handle]
            if isinstance(event, Connected):
                flow.connected = True
            elif isinstance(event, DataReceived):
                if flow.keep:
                    flow.received += event.data
                flow.received_bytes += len(event.data)
            elif isinstance(event, PeerFinished):
                flow.peer_finished = True
            elif isinstance(event, ConnectionClosed):
                flow.closed = event.reason
            elif isinstance(event, Writable):
                pass
        for handle, flow in self.flows.items():
            if flow.held and time.monotonic() >= flow.syn_at + flow.accept_after:
                flow.held = False
                flow.accepted_at = time.monotonic()
                stack.accept(handle)
            if flow.closed is not None or not flow.connected or flow.shut:
                continue
            limit = len(flow.outgoing) - (0 if flow.peer_finished else flow.hold)
            if flow.sent < limit:
                view = memoryview(flow.outgoing)[flow.sent : min(flow.sent + CHUNK, limit)]
                flow.sent += stack.send(handle, view)
            if flow.sent == len(flow.outgoing):
                stack.shutdown_write(handle)
                flow.shut = True

    def connect(self, src: Endpoint, dst: Endpoint, flow: Flow) -> int:
        with self.lock:
            handle = self.stack.connect(src, dst)
            self.flows[handle] = flow
            return handle

    def flow(self, handle: int) -> Flow:
        with self.lock:
            return self.flows[handle]


@dataclass
class Node:
    ns: Netns
    pump: Pump
    stack_ctx: ExitStack

    def socket(self) -> socket.socket:
        with self.ns.enter():
            sock = self.stack_ctx.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.settimeout(IO_TIMEOUT)
        return sock


@contextmanager
def netstack_node(
    testbed: Testbed, make_flow: Callable[[SynReceived], Flow], *, loss: float = 0.0
) -> Iterator[Node]:
    ns = testbed.netns("n")
    with ExitStack() as ctx:
        with ns.enter():
            tun = ctx.enter_context(TunDevice.open(testbed.name("tun")))
            cfg = ctx.enter_context(LinkConfig(tun.name))
            cfg.set_up(mtu=MTU)
            cfg.add_address(TUN_ADDR)
            cfg.add_route(PROXIED_NET)
        stack = NetStack(accept=ours, now=time.monotonic(), config=NetStackConfig(mtu=MTU))
        pump = Pump(tun, stack, make_flow, loss=loss)
        thread = threading.Thread(target=pump.run, name="netstack-pump", daemon=True)
        thread.start()
        try:
            yield Node(ns, pump, ctx)
        finally:
            pump.stop.set()
            thread.join(PUMP_LIMIT)
        assert not thread.is_alive()
        if pump.error is not None:
            raise pump.error


def recv_to_eof(sock: socket.socket, limit: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    deadline = time.monotonic() + PUMP_LIMIT
    while time.monotonic() < deadline and got <= limit:
        chunk = sock.recv(CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        got += len(chunk)
    raise AssertionError(f"no end of stream after {got} bytes")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = PUMP_LIMIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def report(name: str, node: Node, elapsed: float, payload_bytes: int) -> None:
    stack, pump = node.pump.stack, node.pump
    segments = stack.packets_in + stack.packets_out
    print(
        f"\n[{name}] {payload_bytes / 2**20:.0f} MiB of payload in {elapsed:.2f} s: "
        f"{payload_bytes * 8 / elapsed / 1e6:.0f} Mbit/s, {segments / elapsed:.0f} segments/s "
        f"({stack.packets_in} in, {stack.packets_out} out, dropped by the pump {pump.dropped_in} in / "
        f"{pump.dropped_out} out, stack drops {dict(stack.drops)})"
    )


def exchange_with_kernel_client(testbed: Testbed, *, loss: float, stack_first: bool) -> None:
    """20 MiB each way at once, then half-closes; the side that closes second sends its last MiB
    only after it has seen the other side's FIN, so data really crosses a half-closed connection."""
    up, down = os.urandom(FLOW), os.urandom(FLOW)

    def make_flow(syn: SynReceived) -> Flow:
        return Flow(down, hold=0 if stack_first else HOLD)

    with netstack_node(testbed, make_flow, loss=loss) as node, ThreadPoolExecutor(2) as pool:
        client = node.socket()
        started = time.monotonic()
        client.connect((str(SUBNET_HOST), 443))
        # The client believes it talks to SUBNET_HOST:443; the stack answered for that address.
        assert client.getpeername() == (str(SUBNET_HOST), 443)
        [(handle, flow)] = node.pump.flows.items()
        with node.pump.lock:
            info = node.pump.stack.info(handle)
        assert info.dst == Endpoint(SUBNET_HOST, 443)
        assert info.src == Endpoint(TUN_ADDR.ip, client.getsockname()[1])
        assert info.mss == MTU - 40

        eof = threading.Event()

        def client_send() -> None:
            first = len(up) - HOLD if stack_first else len(up)
            for off in range(0, first, CHUNK):
                client.sendall(up[off : min(off + CHUNK, first)])
            if stack_first:
                assert eof.wait(PUMP_LIMIT), "no FIN from the stack"
                assert not flow.peer_finished
                client.sendall(up[first:])
            client.shutdown(socket.SHUT_WR)

        def client_recv() -> bytes:
            got = recv_to_eof(client, FLOW)
            eof.set()
            return got

        receiving = pool.submit(client_recv)
        sending = pool.submit(client_send)
        got = receiving.result(PUMP_LIMIT)
        sending.result(PUMP_LIMIT)
        wait_for(lambda: flow.closed is not None, "the end of the connection")
        elapsed = time.monotonic() - started
        client.close()

        assert len(flow.received) == FLOW and digest(flow.received) == digest(up)
        assert len(got) == FLOW and digest(got) == digest(down)
        assert flow.peer_finished and flow.closed is CloseReason.FINISHED
        name = f"kernel client, {'stack' if stack_first else 'client'} closes first, loss {loss:.0%}"
        report(name, node, elapsed, 2 * FLOW)
        if loss:
            assert node.pump.dropped_in and node.pump.dropped_out


def test_kernel_client_20_mib_each_way_client_closes_first(testbed: Testbed) -> None:
    exchange_with_kernel_client(testbed, loss=0.0, stack_first=False)


def test_kernel_client_20_mib_each_way_stack_closes_first(testbed: Testbed) -> None:
    exchange_with_kernel_client(testbed, loss=0.0, stack_first=True)


@pytest.mark.parametrize("stack_first", [False, True], ids=["client-first", "stack-first"])
def test_kernel_client_20_mib_each_way_with_loss(testbed: Testbed, stack_first: bool) -> None:
    exchange_with_kernel_client(testbed, loss=0.02, stack_first=stack_first)


def test_refused_syn_reaches_the_kernel_client_as_connection_refused(testbed: Testbed) -> None:
    def make_flow(syn: SynReceived) -> Flow:
        return Flow(b"", refuse=syn.dst.port == 81)

    with netstack_node(testbed, make_flow) as node:
        refused = node.socket()
        with pytest.raises(ConnectionRefusedError):
            refused.connect((str(PEER), 81))
        taken = node.socket()
        taken.connect((str(PEER), 80))
        taken.sendall(b"hello")
        wait_for(lambda: any(f.received == b"hello" for f in node.pump.flows.values()), "the greeting")
        # A destination the predicate declines is not answered at all: the client times out.
        ignored = node.socket()
        ignored.settimeout(1.0)
        with pytest.raises(TimeoutError):
            ignored.connect(("10.144.144.9", 80))
        assert node.pump.stack.drops["not ours"] >= 1


def test_a_held_syn_is_answered_when_the_owner_accepts(testbed: Testbed) -> None:
    # The proxy holds the SYN while it reaches the far end; the kernel client waits in connect().
    with netstack_node(testbed, lambda syn: Flow(b"", accept_after=0.5)) as node:
        client = node.socket()
        client.connect((str(PEER), 8080))
        connected_at = time.monotonic()
        [flow] = node.pump.flows.values()
        assert flow.accepted_at is not None and flow.accepted_at <= connected_at
        assert flow.accepted_at - flow.syn_at >= 0.5
        client.sendall(b"after the wait")
        wait_for(lambda: flow.received == b"after the wait", "the data")


def test_stack_connects_to_a_kernel_listener(testbed: Testbed) -> None:
    up, down = os.urandom(FLOW), os.urandom(FLOW)
    with netstack_node(testbed, lambda syn: Flow(b"")) as node, ThreadPoolExecutor(1) as pool:
        with node.ns.enter():
            listener = node.stack_ctx.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind((str(TUN_ADDR.ip), 0))
        listener.listen(4)
        listener.settimeout(IO_TIMEOUT)
        port = listener.getsockname()[1]
        flow = Flow(up)
        started = time.monotonic()
        # The stack opens from PEER, an address the kernel routes back into the TUN.
        node.pump.connect(Endpoint(PEER, 40123), Endpoint(TUN_ADDR.ip, port), flow)
        server, addr = listener.accept()
        node.stack_ctx.enter_context(server)
        server.settimeout(IO_TIMEOUT)
        assert addr == (str(PEER), 40123)

        def server_send() -> None:
            for off in range(0, len(down), CHUNK):
                server.sendall(down[off : off + CHUNK])
            server.shutdown(socket.SHUT_WR)

        sending = pool.submit(server_send)
        got = recv_to_eof(server, FLOW)
        sending.result(PUMP_LIMIT)
        wait_for(lambda: flow.closed is not None, "the end of the connection")
        elapsed = time.monotonic() - started
        server.close()
        assert flow.connected and flow.peer_finished and flow.closed is CloseReason.FINISHED
        assert len(got) == FLOW and digest(got) == digest(up)
        assert len(flow.received) == FLOW and digest(flow.received) == digest(down)
        report("stack connects to kernel listener", node, elapsed, 2 * FLOW)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_one_way_throughput_with_a_client_in_its_own_process(testbed: Testbed, direction: str) -> None:
    """Bulk one way, the kernel's client in a separate process: the figures printed are the stack's."""
    outgoing = bytes(BENCH) if direction == "down" else b""
    with netstack_node(testbed, lambda syn: Flow(outgoing, keep=False)) as node:
        started = time.monotonic()
        proc = node.ns.popen(
            [sys.executable, "-c", BENCH_CLIENT, str(SUBNET_HOST), "5001", direction, str(BENCH)],
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = proc.communicate(timeout=PUMP_LIMIT)
        elapsed = time.monotonic() - started
        assert proc.returncode == 0
        [flow] = node.pump.flows.values()
        wait_for(lambda: flow.closed is not None, "the end of the connection")
        if direction == "up":
            assert flow.received_bytes == BENCH
        else:
            assert int(out) == BENCH
        assert flow.closed is CloseReason.FINISHED
        report(f"one way {direction}, client in its own process", node, elapsed, BENCH)
