"""UDP GSO on send and GRO on receive: the same datagrams arrive, in fewer syscalls; a socket whose
kernel refuses GSO falls back to one datagram per syscall, and a path that segments on the way
(a veth without offloads) still delivers every byte."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pytier.testbed.netns import Testbed
from pytier.testbed.nodes import PytierNode, tcp_transfer
from pytier.tunnel.udp_socket import UdpSocket

NET = ["--network-name", "gso", "--network-secret", "gso-secret"]


Exchange = tuple[list[tuple[bytes, int]], UdpSocket, UdpSocket]


SO_NO_CHECK = 11  # UDP without checksums: the kernel refuses GSO on such a socket (EINVAL)


async def _exchange(datagrams: list[tuple[bytes, int]], offload: bool, refuse_gso: bool) -> Exchange:
    """Send `datagrams` (payload, index of the receiving socket) from one socket to two others on
    loopback; returns what arrived, in order, with the index of the socket that received it, the
    sender and the first receiver (whose counters the test reads)."""
    got: list[tuple[bytes, int]] = []
    receivers = []
    for index in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.bind(("127.0.0.1", 0))
        def on_datagrams(view: memoryview, seg: int, _addr: object, index: int = index) -> None:
            got.extend((bytes(view[off:off + seg]), index) for off in range(0, max(len(view), 1), seg))

        receivers.append(UdpSocket(sock, on_datagrams, lambda e: None, offload=offload))
    tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx_sock.bind(("127.0.0.1", 0))
    if refuse_gso:
        tx_sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    sender = UdpSocket(tx_sock, lambda v, s, a: None, lambda e: None, offload=offload)
    addrs = [r.sock.getsockname() for r in receivers]
    for payload, index in datagrams:
        sender.send(payload, addrs[index])
    for _ in range(100):
        if len(got) >= len(datagrams):
            break
        await asyncio.sleep(0.01)
    for r in receivers:
        r.close()
    sender.close()
    return got, sender, receivers[0]


def _traffic() -> list[tuple[bytes, int]]:
    # Runs of equal size to one address (GSO), a shorter one ending a run, a change of address in
    # the middle, a run longer than the 64 segments one send may carry, and tiny datagrams.
    out = [(bytes([i]) * 1400, 0) for i in range(100)]
    out += [(b"short", 0), (b"x" * 1400, 0)]
    out += [(bytes([i]) * 900, i % 2) for i in range(20)]
    out += [(bytes([i]) * 64, 1) for i in range(70)]
    out += [(b"", 0), (b"", 1)]
    return out


@pytest.mark.parametrize(("offload", "refuse_gso"), [(True, False), (False, False), (True, True)],
                         ids=["offload", "no-offload", "kernel-refuses-gso"])
def test_loopback_datagrams_arrive_exactly(offload: bool, refuse_gso: bool) -> None:
    sent = _traffic()
    got, sender, receiver = asyncio.run(_exchange(sent, offload, refuse_gso))
    for index in range(2):
        assert [d for d, i in got if i == index] == [d for d, i in sent if i == index]
    assert sender.stats.tx_datagrams == len(sent) and sender.stats.tx_errors == 0
    if refuse_gso:
        assert not sender.gso and sender.stats.tx_gso_sends == 0
        assert sender.stats.tx_syscalls == len(sent)
    elif offload:
        # Far fewer sends than datagrams, and the kernel handed runs back whole.
        assert sender.stats.tx_gso_sends > 0
        assert sender.stats.tx_syscalls < len(sent) // 3
        assert receiver.stats.rx_gro_batches > 0
    else:
        assert sender.stats.tx_syscalls == len(sent)
        assert sender.stats.tx_gso_sends == 0 and receiver.stats.rx_gro_batches == 0


@pytest.mark.netns
@pytest.mark.parametrize("offloads", [True, False], ids=["veth-offloads", "veth-no-offloads"])
def test_tunnel_transfer_with_and_without_kernel_offload(testbed: Testbed, offloads: bool) -> None:
    """The tunnel sends GSO runs either way. With segmentation offload on the veth a run crosses
    whole and the receiver takes it as one GRO batch; without, the kernel cuts it into frames on
    the way (as a NIC without USO does) and the receiver reads them one by one. Either way 30 MiB
    arrive byte-identical."""
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, b, "198.18.0.1/24", "198.18.0.2/24", offloads=offloads)
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010"],
                    name="gso-a").start()
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "--no-listener", "-p", "udp://198.18.0.1:11010"],
                    name="gso-b").start()
    nb.wait_route("10.144.144.1")
    size = 30 * 1024 * 1024
    sent, sha_sent, sha_received, _ = tcp_transfer(testbed, a, b, "10.144.144.1", size, timeout=120)
    assert sent == size and sha_received == sha_sent
    sender, receiver = nb.cli("stats"), na.cli("stats")
    assert sender.get("udp_tx_gso_sends", 0) > 0
    assert sender["udp_tx_syscalls"] < size // 1400 // 4
    if offloads:
        assert receiver.get("udp_rx_gro_batches", 0) > 0
        assert receiver["udp_rx_syscalls"] < size // 1400 // 4
    else:
        assert "udp_rx_gro_batches" not in receiver
        assert receiver["udp_rx_syscalls"] > size // 1400
