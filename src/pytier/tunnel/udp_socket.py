"""A UDP socket driven straight by the event loop, with the kernel's batching on both edges.

Receive: UDP_GRO lets one recvmsg return a run of same-size datagrams from one sender, split here
by the segment size the kernel reports; each wake-up reads until the socket is empty (bounded).
Send: datagrams queued during one loop iteration go out at its end, and each run of same-size
datagrams to one address leaves in one sendmsg with UDP_SEGMENT (GSO), the last one allowed to be
shorter. Either feature falls back to one datagram per syscall where the kernel refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("pytier.tunnel")

# Linux constants that Python's socket module does not name.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_GSO_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
MAX_UDP_PAYLOAD = 65507
RECV_BUFFER = 65536
# Bound on what one wake-up reads, so that a flood on one socket cannot starve the others.
MAX_RECVS_PER_WAKEUP = 256
# Bound on datagrams waiting for a full socket buffer to drain; past it new ones are dropped, as a
# kernel drops them when its own queue is full.
MAX_QUEUED_BYTES = 4 * 1024 * 1024
_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
# Errors meaning "this kernel or device cannot segment this send": retry it unsegmented.
_GSO_REFUSED = frozenset((errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT))

Address = tuple[str, int] | None  # None: the socket is connected
# (datagrams, segment size, sender): `datagrams` holds one datagram, or a GRO run of datagrams of
# `segment size` bytes each from one sender (the last may be shorter).
DatagramHandler = Callable[[memoryview, int, "tuple[str, int]"], None]
ErrorHandler = Callable[[OSError], None]


@dataclass(slots=True)
class SocketStats:
    rx_datagrams: int = 0
    rx_syscalls: int = 0
    rx_gro_batches: int = 0  # recvmsg calls that returned more than one datagram
    tx_datagrams: int = 0
    tx_syscalls: int = 0
    tx_gso_sends: int = 0  # sendmsg calls that carried more than one datagram
    tx_errors: int = 0
    tx_dropped_full: int = 0


class UdpSocket:
    """One non-blocking UDP socket. `on_datagrams(view, segment, addr)` gets what each read returned
    as a view that is valid only during the call (copy what you keep); `on_error` gets errors the
    kernel reports for the socket (ICMP unreachable on a connected socket, refused sends)."""

    def __init__(self, sock: socket.socket, on_datagrams: DatagramHandler, on_error: ErrorHandler,
                 *, connected: bool = False, offload: bool = True) -> None:
        self.sock = sock
        self.stats = SocketStats()
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._on_datagrams = on_datagrams
        self._on_error = on_error
        self._connected = connected
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._ancbuf = socket.CMSG_SPACE(_GRO_SIZE.size)
        self._queue: list[tuple[Address, bytes]] = []
        self._queued_bytes = 0
        self._flush_scheduled = False
        self._waiting_writable = False
        self._closed = False
        self.gso = offload
        # Datagrams bigger than the path's MTU leave as IP fragments, which GSO cannot make
        # (EMSGSIZE): runs of such sizes go one by one.
        self._gso_max_size = MAX_UDP_PAYLOAD
        if offload:
            # A kernel without UDP_GRO just hands over one datagram per read.
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._read)

    # ---- receive ---------------------------------------------------------------------------------

    def _read(self) -> None:
        sock, view, stats = self.sock, self._view, self.stats
        for _ in range(MAX_RECVS_PER_WAKEUP):
            if self._closed:
                return
            try:
                n, anc, _flags, addr = sock.recvmsg_into((self._buf,), self._ancbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._on_error(e)
                continue
            stats.rx_syscalls += 1
            seg = n
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO_SIZE.size:
                    seg = _GRO_SIZE.unpack_from(data)[0] or n
            if seg >= n:
                seg = n
                stats.rx_datagrams += 1
            else:
                stats.rx_gro_batches += 1
                stats.rx_datagrams += -(-n // seg)
            self._on_datagrams(view[:n], max(seg, 1), addr)

    # ---- send ------------------------------------------------------------------------------------

    def send(self, datagram: bytes, addr: Address = None) -> None:
        if self._closed:
            return
        if self._queued_bytes + len(datagram) > MAX_QUEUED_BYTES:
            self.stats.tx_dropped_full += 1
            return
        self._queue.append((addr, datagram))
        self._queued_bytes += len(datagram)
        if not self._flush_scheduled and not self._waiting_writable:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue = self._queue
        i, end = 0, len(queue)
        while i < end:
            addr, first = queue[i]
            size = len(first)
            j = i + 1
            if self.gso and 0 < size <= self._gso_max_size:
                limit = i + min(MAX_GSO_SEGMENTS, MAX_UDP_PAYLOAD // size)
                while j < end and j < limit:
                    a, d = queue[j]
                    if a != addr or len(d) > size or not d:  # an empty one would vanish in a run
                        break
                    j += 1
                    if len(d) < size:  # a shorter datagram may only end a run
                        break
            try:
                sent = self._send_run(queue, i, j, addr, size)
            except (BlockingIOError, InterruptedError):
                del queue[:i]
                self._queued_bytes = sum(len(d) for _, d in queue)
                self._wait_writable()
                return
            if sent:
                i = j
        queue.clear()
        self._queued_bytes = 0

    def _send_run(self, queue: list[tuple[Address, bytes]], i: int, j: int, addr: Address, size: int) -> bool:
        """Send queue[i:j] (one datagram, or a GSO run); False when the kernel refused GSO, which is
        then off, so that the caller sends the same datagrams again one by one."""
        stats = self.stats
        if j - i == 1:
            datagram = queue[i][1]
            try:
                if addr is None:
                    self.sock.send(datagram)
                else:
                    self.sock.sendto(datagram, addr)
            except (BlockingIOError, InterruptedError):
                raise
            except OSError as e:
                stats.tx_errors += 1
                self._on_error(e)
            else:
                stats.tx_syscalls += 1
                stats.tx_datagrams += 1
            return True
        payload = b"".join(d for _, d in queue[i:j])
        cmsg = [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))]
        try:
            self.sock.sendmsg((payload,), cmsg, 0, addr)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                self._gso_max_size = size - 1
                log.debug("udp socket %s: no GSO for datagrams of %d bytes and more (%s)", _name(self.sock),
                          size, e.strerror or e)
                return False
            if e.errno in _GSO_REFUSED:
                self.gso = False
                log.info("udp socket %s: the kernel refused UDP GSO (%s); sending datagrams one by one",
                         _name(self.sock), e.strerror or e)
                return False
            stats.tx_errors += j - i
            self._on_error(e)
            return True
        stats.tx_syscalls += 1
        stats.tx_datagrams += j - i
        stats.tx_gso_sends += 1
        return True

    def _wait_writable(self) -> None:
        if not self._waiting_writable and not self._closed:
            self._waiting_writable = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        self._waiting_writable = False
        self._loop.remove_writer(self._fd)
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._waiting_writable:
            self._loop.remove_writer(self._fd)
        self._queue.clear()
        self.sock.close()


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
