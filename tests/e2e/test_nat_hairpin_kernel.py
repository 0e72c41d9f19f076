"""The NAT hairpin against the real kernel: a kernel client connects to a far address routed into a
TUN device, the hairpin turns the connection around into a kernel listener on the TUN's own address,
and bytes cross both ways. Everything runs in a namespace the test creates and deletes.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pytier.proxy.nat_hairpin import EntryState, NatHairpin
from pytier.testbed.netns import Netns, Testbed
from pytier.tun.device import TunDevice
from pytier.tun.netlink import LinkConfig

TUN_ADDR = IPv4Interface("10.144.144.1/24")
FAKE = IPv4Address("10.144.144.0")
PEER = IPv4Address("10.144.144.2")  # another node's virtual address: inside the TUN's own subnet
PROXIED_NET = IPv4Network("192.168.50.0/24")  # a subnet another node proxies, routed into the TUN
SUBNET_HOST = IPv4Address("192.168.50.7")
MTU = 1380
IO_TIMEOUT = 10.0  # seconds for any one socket operation
PUMP_LIMIT = 60.0  # seconds; the packet pump never runs longer than this
SYN, RST, ACK, FIN = 0x02, 0x04, 0x10, 0x01


@dataclass
class Pump:
    """Reads packets from TUN, passes them through the hairpin and writes the results back."""

    tun: TunDevice
    nat: NatHairpin
    proxied: tuple[IPv4Network, ...]
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    to_listener: list[int] = field(default_factory=list)  # TCP flags of client segments turned around
    to_client: list[int] = field(default_factory=list)  # TCP flags of listener segments turned around
    unhandled: list[bytes] = field(default_factory=list)

    def run(self) -> None:
        try:
            deadline = time.monotonic() + PUMP_LIMIT
            while not self.stop.is_set() and time.monotonic() < deadline:
                ready, _, _ = select.select([self.tun.fd], [], [], 0.05)
                for _ in range(64 if ready else 0):
                    packet = self.tun.read()
                    if packet is None:
                        break
                    self.handle(packet)
        except BaseException as exc:
            self.error = exc

    def handle(self, packet: bytes) -> None:
        hl = (packet[0] & 0x0F) * 4
        flags = packet[hl + 13] if packet[9] == 6 and len(packet) >= hl + 20 else 0
        if flags & (SYN | ACK | RST) == SYN and any(IPv4Address(packet[16:20]) in n for n in self.proxied):
            out = self.nat.intercept_syn(packet, time.monotonic())
            log = self.to_listener
        elif (out := self.nat.rewrite_reply(packet)) is not None:
            log = self.to_client
        else:
            out = self.nat.rewrite_inbound(packet)
            log = self.to_listener
        if out is None:
            self.unhandled.append(packet)
            return
        log.append(flags)
        assert self.tun.write(out), "the kernel refused a rewritten packet"


@dataclass
class Node:
    ns: Netns
    listener: socket.socket
    nat: NatHairpin
    pump: Pump
    stack: ExitStack  # sockets the test opens are closed with the node

    def client(self) -> socket.socket:
        with self.ns.enter():
            sock = self.stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.settimeout(IO_TIMEOUT)
        return sock

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, peer = self.listener.accept()
        self.stack.enter_context(sock)
        sock.settimeout(IO_TIMEOUT)
        return sock, peer


@contextmanager
def hairpin_node(testbed: Testbed) -> Iterator[Node]:
    """A namespace with a TUN device at TUN_ADDR, a kernel listener on it, and the pump running."""
    ns = testbed.netns("h")
    with ExitStack() as stack:
        with ns.enter():
            tun = stack.enter_context(TunDevice.open(testbed.name("tun")))
            cfg = stack.enter_context(LinkConfig(tun.name))
            cfg.set_up(mtu=MTU)
            cfg.add_address(TUN_ADDR)
            cfg.add_route(PROXIED_NET)
            listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind((str(TUN_ADDR.ip), 0))
        listener.listen(16)
        listener.settimeout(IO_TIMEOUT)
        nat = NatHairpin(TUN_ADDR.ip, TUN_ADDR.network, listener.getsockname()[1])
        pump = Pump(tun, nat, (IPv4Network(f"{PEER}/32"), PROXIED_NET))
        thread = threading.Thread(target=pump.run, name="hairpin-pump", daemon=True)
        thread.start()
        try:
            yield Node(ns, listener, nat, pump, stack)
        finally:
            pump.stop.set()
            thread.join(PUMP_LIMIT)
        assert not thread.is_alive()
        if pump.error is not None:
            raise pump.error


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    deadline = time.monotonic() + IO_TIMEOUT
    while got < n and time.monotonic() < deadline:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_to_eof(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise TimeoutError("no end of stream")


def test_kernel_client_reaches_kernel_listener_through_the_hairpin(testbed: Testbed) -> None:
    with hairpin_node(testbed) as node, ThreadPoolExecutor(2) as pool:
        nat, pump = node.nat, node.pump
        client = node.client()
        client.connect((str(PEER), 80))
        accepted, peer = node.accept()

        # The client believes it talks to PEER:80; the listener sees the fake address and client port.
        client_port = client.getsockname()[1]
        assert client.getsockname() == (str(TUN_ADDR.ip), client_port)
        assert client.getpeername() == (str(PEER), 80)
        assert peer == (str(FAKE), client_port)
        assert nat.original_destination(peer) == (PEER, 80)
        key = nat.client_of(peer)
        assert key == (TUN_ADDR.ip, client_port)

        # Enough bytes each way for many full-size segments, sent both ways at once.
        up, down = os.urandom(300_000), os.urandom(200_000)
        sending = [pool.submit(client.sendall, up), pool.submit(accepted.sendall, down)]
        assert recv_exactly(accepted, len(up)) == up
        assert recv_exactly(client, len(down)) == down
        for job in sending:
            job.result(IO_TIMEOUT)

        # Half-close each way: the client's FIN reaches the listener, which answers and then closes.
        client.shutdown(socket.SHUT_WR)
        assert recv_to_eof(accepted) == b""
        accepted.sendall(b"last words")
        accepted.close()
        assert nat.close(key, now=time.monotonic())
        assert recv_to_eof(client) == b"last words"

        # The client's ACK of the listener's FIN crosses the lingering entry (bounded wait).
        deadline = time.monotonic() + IO_TIMEOUT
        while pump.to_listener[-1:] != [ACK] and time.monotonic() < deadline:
            time.sleep(0.01)

    assert pump.to_listener[0] == SYN
    assert pump.to_client[0] == SYN | ACK
    assert any(f & FIN for f in pump.to_listener) and any(f & FIN for f in pump.to_client)
    assert pump.to_listener[-1] == ACK
    assert not any(f & RST for f in pump.to_listener + pump.to_client)
    assert pump.unhandled == []
    [entry] = nat.entries()
    assert entry.state is EntryState.CLOSED and entry.destination == (PEER, 80)


def test_concurrent_connections_to_a_peer_and_a_proxied_subnet(testbed: Testbed) -> None:
    with hairpin_node(testbed) as node:
        targets = [(PEER, 80), (SUBNET_HOST, 443), (PEER, 22)]
        clients = [node.client() for _ in targets]
        for sock, (addr, port) in zip(clients, targets, strict=True):
            sock.connect((str(addr), port))
        by_port = {
            sock.getsockname()[1]: (sock, target) for sock, target in zip(clients, targets, strict=True)
        }

        for _ in targets:
            accepted, peer = node.accept()
            client, target = by_port[peer[1]]
            assert peer[0] == str(FAKE)
            assert node.nat.original_destination(peer) == target
            # Each accepted socket carries the bytes of its own client, and only those.
            greeting = f"to {target[0]}:{target[1]} from {peer[1]}".encode()
            client.sendall(greeting)
            assert recv_exactly(accepted, len(greeting)) == greeting
            accepted.sendall(greeting[::-1])
            assert recv_exactly(client, len(greeting)) == greeting[::-1]

        assert sorted(e.destination for e in node.nat.entries()) == sorted(targets)
        assert all(e.state is EntryState.ACCEPTED for e in node.nat.entries())
    assert node.pump.unhandled == []
