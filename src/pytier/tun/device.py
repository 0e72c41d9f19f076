"""A Linux TUN device opened with a raw TUNSETIFF ioctl (layer-3 IP packets, no packet-info header).

With offload (IFF_VNET_HDR and TUNSETOFFLOAD) every packet crosses the fd behind a virtio net
header: the kernel hands over TCP super-segments of up to 64 KB and packets whose checksum it left
partial, and takes super-segments back. The device hides that from its users: reads are split into
ordinary wire packets with complete checksums, and batched writes are coalesced per TCP flow.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence

from pytier.wire.errors import WireError
from pytier.wire.tcp_gso import coalesce, split
from pytier.wire.virtio import F_NEEDS_CSUM, HDR_LEN, NO_OFFLOAD, VirtioNetHdr

__all__ = [
    "MAX_PACKET",
    "OFFLOADS",
    "READ_BATCH",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO_ECN",
    "TunDevice",
    "TunError",
    "offload_names",
]

log = logging.getLogger("pytier.tun")

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")

TUN_F_CSUM = 0x01  # the kernel may hand over packets with a partial checksum
TUN_F_TSO4 = 0x02  # ... and TCP/IPv4 super-segments
TUN_F_TSO_ECN = 0x08  # ... also those whose first segment carries CWR
# What pytier can finish itself: IPv6 is not carried, so TSO6 stays with the kernel.
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
_OFFLOAD_NAMES = ((TUN_F_CSUM, "csum"), (TUN_F_TSO4, "tso4"), (TUN_F_TSO_ECN, "tso_ecn"))

MAX_PACKET = 65535  # bytes; the largest IP packet a TUN read can return
READ_BATCH = 64  # reads, and packets, drained per event-loop wake-up before yielding to other callbacks

# Errors on write that mean "the kernel had no room or refused this one packet": the packet is
# dropped, as a router would, and the caller carries on.
_WRITE_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EINVAL})


class TunError(OSError):
    """The TUN device could not be created or configured; the message says why and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def _open_error(name: str, exc: OSError) -> TunError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        why = "permission denied (run as root or with CAP_NET_ADMIN)"
    elif exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        why = f"{TUN_PATH} is missing (load the 'tun' kernel module or give the container the device)"
    elif exc.errno == errno.EBUSY:
        why = "the name is already used by another device"
    else:
        why = exc.strerror or str(exc)
    return TunError(exc.errno or errno.EIO, f"cannot create TUN device {name!r}: {why}")


def offload_names(flags: int) -> list[str]:
    return [name for bit, name in _OFFLOAD_NAMES if flags & bit]


def _setiff(fd: int, raw: bytes, flags: int) -> str:
    ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
    return _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()


class TunDevice:
    """One TUN device. The device lives as long as its file descriptor: `close()` removes it.

    `vnet_hdr` says whether packets cross the fd behind a virtio header (so that writes can carry
    coalesced super-segments); `offload` holds the TUN_F_* flags the kernel accepted for reads.
    `trust_checksums` lets coalescing skip verifying the segments it merges (see `coalesce`).
    """

    def __init__(self, fd: int, name: str, *, vnet_hdr: bool = False, offload: int = 0) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offload = offload
        self.trust_checksums = False
        self.write_drops = 0  # packets
        self.rx_super_segments = 0  # reads that carried a TCP super-segment
        self.rx_split_packets = 0  # the packets those were cut into
        self.rx_offload_errors = 0  # reads whose virtio header did not fit the packet: dropped
        self.tx_super_segments = 0  # coalesced writes
        self.tx_merged_packets = 0  # the packets those stood for
        self._hdr = HDR_LEN if vnet_hdr else 0
        self._buf = bytearray(self._hdr + MAX_PACKET)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packets: Callable[[list[bytes]], None] | None = None
        self._unread: deque[bytes] = deque()
        self._pending: list[bytes] = []

    @classmethod
    def open(cls, name: str, *, offload: int | None = None) -> TunDevice:
        """Create (or attach to a persistent) TUN device; `name` may be a pattern such as 'pt%d'.

        With `offload` (TUN_F_* flags, 0 for none), ask the kernel for a virtio header and those
        read offloads; if it refuses, log one line and open the plain device.
        """
        raw = name.encode()
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b" " in raw:
            raise TunError(errno.EINVAL, f"cannot create TUN device {name!r}: invalid interface name")
        fd = cls._open_fd(name)
        if offload is not None:
            try:
                features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4))[0]
            except OSError:
                features = 0
            if features & IFF_VNET_HDR:
                try:
                    final = _setiff(fd, raw, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
                except OSError as exc:
                    os.close(fd)
                    raise _open_error(name, exc) from exc
                try:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
                    fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
                except OSError as exc:
                    why = exc.strerror or str(exc)
                else:
                    return cls(fd, final, vnet_hdr=True, offload=offload)
                # The device has its virtio header for good: start over without one.
                os.close(fd)
                fd = cls._open_fd(name)
            else:
                why = "the kernel's TUN driver has no virtio header (IFF_VNET_HDR)"
            log.warning("TUN device %s: offload (virtio header, %s) refused: %s; using plain packets", name,
                        ",".join(offload_names(offload)) or "no read offloads", why)
        try:
            final = _setiff(fd, raw, IFF_TUN | IFF_NO_PI)
        except OSError as exc:
            os.close(fd)
            raise _open_error(name, exc) from exc
        return cls(fd, final)

    @staticmethod
    def _open_fd(name: str) -> int:
        try:
            return os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(name, exc) from exc

    def read_into(self, buf: bytearray | memoryview) -> int:
        """Read one packet of a plain device into `buf`; return its length, or 0 when none is waiting."""
        if self._hdr:
            raise RuntimeError(f"TUN device {self.name!r} has a virtio header: use read() or attach()")
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return 0

    def read(self) -> bytes | None:
        """Read one packet, or return None when no packet is waiting."""
        if self._unread:
            return self._unread.popleft()
        packets: list[bytes] = []
        for _ in range(READ_BATCH):
            if not self._read_one(packets) or packets:
                break
        if not packets:
            return None
        self._unread.extend(packets[1:])
        return packets[0]

    def _read_one(self, packets: list[bytes]) -> bool:
        """Append what one read brings (none if it was malformed); False when nothing was waiting."""
        try:
            n = os.readv(self.fd, [self._buf])
        except BlockingIOError:
            return False
        view = self._view
        hdr = self._hdr
        if not hdr:
            packets.append(bytes(view[:n]))
        elif not view[1] and not view[0] & F_NEEDS_CSUM:
            packets.append(bytes(view[hdr:n]))
        else:
            try:
                got = split(VirtioNetHdr.parse(view), view[hdr:n])
            except WireError as exc:
                self.rx_offload_errors += 1
                log.debug("TUN device %s: dropped a read of %d bytes: %s", self.name, n, exc)
                return True
            if view[1]:
                self.rx_super_segments += 1
                self.rx_split_packets += len(got)
            packets += got
        return True

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Write one IP packet. Return False (and count it) if the kernel dropped it."""
        try:
            if self._hdr:
                os.writev(self.fd, (NO_OFFLOAD, packet))
            else:
                os.write(self.fd, packet)
        except OSError as exc:
            if exc.errno in _WRITE_DROP_ERRNOS:
                self.write_drops += 1
                return False
            raise
        return True

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """Write IP packets, coalescing runs of one TCP flow where offload allows; return how many
        the kernel dropped (they are counted in `write_drops` too)."""
        if not self._hdr:
            return sum(not self.write(p) for p in packets)
        fd = self.fd
        dropped = 0
        for vector in coalesce(packets, verify=not self.trust_checksums):
            count = 1 if vector[0] is NO_OFFLOAD else len(vector) - 2
            try:
                os.writev(fd, vector)
            except OSError as exc:
                if exc.errno not in _WRITE_DROP_ERRNOS:
                    raise
                dropped += count
                continue
            if count > 1:
                self.tx_super_segments += 1
                self.tx_merged_packets += count
        self.write_drops += dropped
        return dropped

    def write_soon(self, packet: bytes) -> None:
        """Write `packet` with the others of this event-loop turn, as one `write_batch`.

        The packets a tunnel delivers from one read arrive one call at a time; gathering them until
        the loop comes round again (before it polls for more I/O) is what gives `coalesce` runs to
        merge. A plain or unattached device writes at once.
        """
        if not self._hdr or self._loop is None:
            self.write(packet)
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(packet)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self.fd >= 0:
            self.write_batch(pending)

    def attach(self, loop: asyncio.AbstractEventLoop, on_packets: Callable[[list[bytes]], None]) -> None:
        """Deliver packets to `on_packets` from `loop`, up to READ_BATCH per call."""
        if self._loop is not None:
            raise RuntimeError(f"TUN device {self.name!r} is already attached to an event loop")
        self._loop = loop
        self._on_packets = on_packets
        loop.add_reader(self.fd, self._drain)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        self._loop = None
        self._on_packets = None

    def _drain(self) -> None:
        packets: list[bytes] = []
        if self._hdr:
            read_one = self._read_one
            for _ in range(READ_BATCH):
                if not read_one(packets) or len(packets) >= READ_BATCH:
                    break
        else:
            fd = self.fd
            bufs = [self._buf]
            view = self._view
            for _ in range(READ_BATCH):
                try:
                    n = os.readv(fd, bufs)
                except BlockingIOError:
                    break
                packets.append(bytes(view[:n]))
        if packets and self._on_packets is not None:
            self._on_packets(packets)

    def close(self) -> None:
        if self.fd < 0:
            return
        self._flush()
        self.detach()
        os.close(self.fd)
        self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        offload = ",".join(offload_names(self.offload)) or "none"
        return f"TunDevice(name={self.name!r}, fd={self.fd}, vnet_hdr={self.vnet_hdr}, offload={offload})"
