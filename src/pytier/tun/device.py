"""A Linux TUN device opened with a raw TUNSETIFF ioctl (layer-3 IP packets, no packet-info header)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
from collections.abc import Callable

__all__ = ["MAX_PACKET", "READ_BATCH", "TunDevice", "TunError"]

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")

MAX_PACKET = 65535  # bytes; the largest IP packet a TUN read can return
READ_BATCH = 64  # packets drained per event-loop wake-up before yielding to other callbacks

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


class TunDevice:
    """One TUN device. The device lives as long as its file descriptor: `close()` removes it."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.write_drops = 0
        self._buf = bytearray(MAX_PACKET)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packets: Callable[[list[bytes]], None] | None = None

    @classmethod
    def open(cls, name: str) -> TunDevice:
        """Create (or attach to a persistent) TUN device; `name` may be a pattern such as 'pt%d'."""
        raw = name.encode()
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b" " in raw:
            raise TunError(errno.EINVAL, f"cannot create TUN device {name!r}: invalid interface name")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(name, exc) from exc
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            raise _open_error(name, exc) from exc
        final = _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
        return cls(fd, final)

    def read_into(self, buf: bytearray | memoryview) -> int:
        """Read one packet into `buf`; return its length, or 0 when no packet is waiting."""
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return 0

    def read(self) -> bytes | None:
        """Read one packet, or return None when no packet is waiting."""
        n = self.read_into(self._buf)
        return bytes(self._view[:n]) if n else None

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Write one IP packet. Return False (and count it) if the kernel dropped it."""
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            if exc.errno in _WRITE_DROP_ERRNOS:
                self.write_drops += 1
                return False
            raise
        return True

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
        fd = self.fd
        bufs = [self._buf]
        view = self._view
        packets: list[bytes] = []
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
        return f"TunDevice(name={self.name!r}, fd={self.fd})"
