"""TCP tunnels as EasyTier frames them: each peer packet behind a u32 little-endian length."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import cast

from pytier.tunnel.base import Listener, Tunnel, TunnelInfo, log
from pytier.wire.errors import WireError
from pytier.wire.tunnel_frame import TcpFrameDecoder, encode_tcp_frame

# A peer that stops reading must not make us hold its packets without bound: past this, drop.
MAX_WRITE_BUFFER_BYTES = 2 * 1024 * 1024
# asyncio's default of 100 overflows under a connection flood, and then a real peer's SYN waits for
# its 1 s retransmission; the peer layer closes the surplus at once, so a deep queue costs little.
ACCEPT_BACKLOG = 1024


def _fmt(addr: tuple[str, int] | tuple[str, int, int, int] | None) -> str:
    if not addr:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _TcpTunnel(Tunnel, asyncio.Protocol):
    def __init__(self, is_client: bool, listener: TcpListener | None = None) -> None:
        Tunnel.__init__(self, TunnelInfo("tcp", "", "?", is_client))
        self._decoder = TcpFrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._listener = listener
        # Frames sent during one loop iteration leave in one write: with TCP_NODELAY a write per
        # packet would be a syscall and a TCP segment per packet.
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.info.remote_addr = _fmt(transport.get_extra_info("peername"))
        self.info.local_addr = _fmt(transport.get_extra_info("sockname"))
        if self._listener is not None:
            # Only now does the tunnel know its peer's address (the per-source bound keys on it)
            # and have a transport that closing it can end.
            self._listener.on_tunnel(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except WireError as exc:
            # EasyTier ends the connection on a bad length; the stream cannot be resynchronised.
            self.stats.rx_malformed += 1
            if self._listener is not None:
                # The peer layer logs the close (rate-limited); here it is counted.
                self._listener.counters["rx_dropped_tcp_bad_frame"] += 1
            self.close(f"bad frame: {exc}")
            return
        if len(frames) == 1:
            self.deliver(frames[0])
        elif frames:
            self.deliver_many(frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(f"connection lost: {exc}" if exc else "connection closed by peer")

    def send(self, packet: bytes) -> None:
        t = self._transport
        if self.closed or t is None:
            return
        if t.get_write_buffer_size() + self._pending_bytes > MAX_WRITE_BUFFER_BYTES:
            self.stats.tx_errors += 1
            return
        try:
            frame = encode_tcp_frame(packet)
        except WireError:
            self.stats.tx_errors += 1
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        self.stats.tx_packets += 1
        self.stats.tx_bytes += len(packet)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        t = self._transport
        if pending and t is not None and not t.is_closing():
            t.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()


class TcpListener(Listener):
    """Accepts tunnels; the peer layer bounds how many may be in their handshake and for how long."""

    def __init__(self, on_tunnel: Callable[[Tunnel], None]) -> None:
        super().__init__()
        self.on_tunnel = on_tunnel
        self._server: asyncio.Server | None = None

    @classmethod
    async def start(cls, host: str, port: int, on_tunnel: Callable[[Tunnel], None]) -> TcpListener:
        loop = asyncio.get_running_loop()
        listener = cls(on_tunnel)
        listener._server = await loop.create_server(lambda: _TcpTunnel(is_client=False, listener=listener),
                                                    host, port, reuse_address=True, backlog=ACCEPT_BACKLOG)
        listener.local_addr = _fmt(listener._server.sockets[0].getsockname())
        return listener

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def connect_tcp(host: str, port: int, timeout_s: float = 5.0) -> Tunnel:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: _TcpTunnel(is_client=True), host, port), timeout_s
    )
    log.debug("tcp tunnel up %s", proto)
    return proto
