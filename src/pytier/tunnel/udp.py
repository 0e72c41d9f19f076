"""UDP tunnels as EasyTier frames them: an 8-byte header, a Syn/Sack exchange, then Data datagrams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable

from pytier.ratelog import RateLimitedLog
from pytier.tunnel.base import Listener, Tunnel, TunnelInfo, log
from pytier.tunnel.udp_socket import SocketStats, UdpSocket
from pytier.wire.errors import WireError
from pytier.wire.tunnel_frame import UdpMsgType, is_stun, pack_udp, parse_udp

SYN_TIMEOUT_S = 3.0
# A lost Syn or Sack must not cost the whole 3 s on a lossy path: resend the same Syn meanwhile.
SYN_RESEND_S = 0.4
_UDP_HDR = struct.Struct("<IBBH")
_DATA = int(UdpMsgType.Data)
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def _fmt(addr: tuple[object, ...]) -> str:
    host, port = str(addr[0]), addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _tune(sock: socket.socket) -> None:
    # A burst of tunnel datagrams overflows the default 208 KiB buffer and every drop there makes
    # the TCP inside back off. Root may exceed net.core.rmem_max (the *FORCE options); others get
    # what the sysctl allows.
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)


def _split_read(data: memoryview, seg: int, tun: _UdpTunnel | None,
                other: Callable[[memoryview], None]) -> None:
    """Hand out what one read returned: a GRO run's Data datagrams of `tun`'s connection go up to it
    as batches, every other datagram (or the read's only one, perhaps empty) to `other`, in order."""
    n = len(data)
    if seg >= n:
        other(data)
        return
    if tun is None:
        for off in range(0, n, seg):
            other(data[off:off + seg])
        return
    conn_id, packets = tun.conn_id, []
    for off in range(0, n, seg):
        d = data[off:off + seg]
        if len(d) >= 8 and d[4] == _DATA:
            cid, _, _, length = _UDP_HDR.unpack_from(d)
            if cid == conn_id and length == len(d) - 8:
                packets.append(bytes(d[8:]))
                continue
        if packets:
            tun.deliver_many(packets)
            packets = []
        other(d)
    if packets:
        tun.deliver_many(packets)


class _UdpTunnel(Tunnel):
    def __init__(
        self, info: TunnelInfo, conn_id: int, sendto: Callable[[bytes], None], on_gone: Callable[[], None]
    ) -> None:
        super().__init__(info)
        self.conn_id = conn_id
        self._prefix = _UDP_HDR.pack(conn_id, _DATA, 0, 0)[:5]
        self._sendto = sendto
        self._on_gone = on_gone

    def send(self, packet: bytes) -> None:
        if self.closed:
            return
        n = len(packet)
        datagram = b"".join((self._prefix, b"\x00", n.to_bytes(2, "little"), packet))
        try:
            self._sendto(datagram)
        except OSError:
            self.stats.tx_errors += 1
            return
        self.stats.tx_packets += 1
        self.stats.tx_bytes += n

    def _close_transport(self) -> None:
        self._on_gone()


class UdpListener(Listener):
    """One bound socket; one tunnel per remote address, as EasyTier's UDP listener keys them."""

    def __init__(self, on_tunnel: Callable[[Tunnel], None]) -> None:
        super().__init__()
        self._on_tunnel = on_tunnel
        self._sock: UdpSocket | None = None
        self._tunnels: dict[tuple[str, int], _UdpTunnel] = {}
        self._syn_magic: dict[tuple[str, int], bytes] = {}
        # Dropped datagrams by reason (rx_dropped_udp_*, docs/limits.md) are in `counters`; their log
        # lines are rate-limited.
        self._bad_input_log = RateLimitedLog(log)

    @classmethod
    async def start(cls, host: str, port: int, on_tunnel: Callable[[Tunnel], None],
                    *, offload: bool = True) -> UdpListener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _tune(sock)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        proto = cls(on_tunnel)
        proto._sock = UdpSocket(sock, proto._on_datagrams, proto._on_error, offload=offload)
        proto.local_addr = _fmt(sock.getsockname())
        return proto

    @property
    def socket_stats(self) -> SocketStats | None:
        return self._sock.stats if self._sock is not None else None

    @property
    def tx_errors(self) -> int:
        return self._sock.stats.tx_errors if self._sock is not None else 0

    def _on_datagrams(self, data: memoryview, seg: int, addr: tuple[str, int]) -> None:
        tun = self._tunnels.get(addr) if seg < len(data) else None
        _split_read(data, seg, tun, lambda d: self._on_datagram(d, addr))

    def _on_datagram(self, data: memoryview, addr: tuple[str, int]) -> None:
        if len(data) >= 8 and data[4] == _DATA:
            tun = self._tunnels.get(addr)
            conn_id, _, _, length = _UDP_HDR.unpack_from(data)
            if tun is None or tun.conn_id != conn_id:
                self._drop("unknown_conn", addr)
                return
            if length != len(data) - 8:
                self._drop("bad_length", addr)
                return
            tun.deliver(bytes(data[8:]))
            return
        raw = bytes(data)
        try:
            conn_id, msg_type, body = parse_udp(raw)
        except WireError:
            if not is_stun(raw):
                self._drop("garbage", addr)
            return
        if msg_type == UdpMsgType.Syn and len(body) == 8:
            self._on_syn(conn_id, bytes(body), addr)
        else:
            self._drop("unexpected_type", addr)

    def _drop(self, reason: str, addr: tuple[str, int]) -> None:
        self.rx_malformed += 1
        self.counters["rx_dropped_udp_" + reason] += 1
        self._bad_input_log.log(logging.INFO, addr[0], reason, "udp listener %s: dropped a datagram from %s "
                                "(%s)", self.local_addr, _fmt(addr), reason.replace("_", " "))

    def _on_syn(self, conn_id: int, magic: bytes, addr: tuple[str, int]) -> None:
        usock = self._sock
        assert usock is not None
        old = self._tunnels.get(addr)
        if old is not None and old.conn_id == conn_id and self._syn_magic.get(addr) == magic:
            # A resent Syn of the same attempt: only the Sack was lost.
            usock.send(pack_udp(conn_id, UdpMsgType.Sack, magic), addr)
            return
        if old is not None:
            old.close("replaced by a new connection from the same address")
        info = TunnelInfo("udp", self.local_addr, _fmt(addr), is_client=False)

        def sendto(datagram: bytes) -> None:
            usock.send(datagram, addr)

        def gone() -> None:
            if self._tunnels.get(addr) is tun:
                del self._tunnels[addr]
                self._syn_magic.pop(addr, None)

        tun = _UdpTunnel(info, conn_id, sendto, gone)
        tun.socket_stats = usock.stats
        self._tunnels[addr] = tun
        self._syn_magic[addr] = magic
        usock.send(pack_udp(conn_id, UdpMsgType.Sack, magic), addr)
        self._on_tunnel(tun)

    def _on_error(self, exc: OSError) -> None:
        # ICMP errors for one remote, or a refused send, must not stop the socket that serves all.
        log.debug("udp listener %s: %s", self.local_addr, exc)

    def close(self) -> None:
        for tun in list(self._tunnels.values()):
            tun.close("listener closed")
        if self._sock is not None:
            self._sock.close()


class _UdpClient:
    def __init__(self) -> None:
        self.tunnel: _UdpTunnel | None = None
        self.sack: asyncio.Future[None] | None = None
        self.conn_id = 0
        self.magic = b""

    def on_datagrams(self, data: memoryview, seg: int, addr: tuple[str, int]) -> None:
        _split_read(data, seg, self.tunnel, lambda d: self.on_datagram(d, addr))

    def on_datagram(self, data: memoryview, addr: tuple[str, int]) -> None:
        tun = self.tunnel
        if tun is not None:
            if len(data) >= 8 and data[4] == _DATA:
                conn_id, _, _, length = _UDP_HDR.unpack_from(data)
                if conn_id == tun.conn_id and length == len(data) - 8:
                    tun.deliver(bytes(data[8:]))
                    return
            tun.stats.rx_malformed += 1
            return
        try:
            conn_id, msg_type, body = parse_udp(bytes(data))
        except WireError:
            return
        if (
            msg_type == UdpMsgType.Sack
            and conn_id == self.conn_id
            and bytes(body) == self.magic
            and self.sack is not None
            and not self.sack.done()
        ):
            self.sack.set_result(None)

    def on_error(self, exc: OSError) -> None:
        # A refused send (firewall EPERM, ENOBUFS, no route, ICMP unreachable) is a lost packet, not a
        # dead link: the peer layer's liveness check decides that.
        if self.tunnel is not None:
            self.tunnel.stats.tx_errors += 1
        log.debug("udp tunnel: %s", exc)


async def connect_udp(host: str, port: int, *, offload: bool = True) -> Tunnel:
    """Open a UDP tunnel; raises OSError or TimeoutError when the listener does not answer."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _tune(sock)
        sock.setblocking(False)
        sock.connect(sockaddr)
    except OSError:
        sock.close()
        raise
    client = _UdpClient()
    usock = UdpSocket(sock, client.on_datagrams, client.on_error, connected=True, offload=offload)
    client.conn_id = secrets.randbits(32)
    client.magic = os.urandom(8)
    client.sack = loop.create_future()
    syn = pack_udp(client.conn_id, UdpMsgType.Syn, client.magic)
    deadline = loop.time() + SYN_TIMEOUT_S
    try:
        while True:
            usock.send(syn)
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no answer from udp://{_fmt(sockaddr)} within {SYN_TIMEOUT_S:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(client.sack), min(SYN_RESEND_S, left))
                break
    except BaseException:
        usock.close()
        raise
    info = TunnelInfo("udp", _fmt(sock.getsockname()), _fmt(sockaddr), is_client=True)
    tun = _UdpTunnel(info, client.conn_id, usock.send, usock.close)
    tun.socket_stats = usock.stats
    client.tunnel = tun
    return tun
