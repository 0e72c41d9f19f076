"""The asyncio shell around KcpEndpoint: peer packets in and out, timers, and one stream object per
proxied connection for the proxy to pipe through."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pytier.proxy.entries import TransportType
from pytier.proxy.transport import ConnectRefused, Incoming
from pytier.transport.kcp_endpoint import KcpEndpoint
from pytier.transport.kcp_events import (
    Connected,
    ConnectFailed,
    ConnectionClosed,
    DataReceived,
    IncomingConnection,
    PeerFinished,
)
from pytier.wire.messages import RoutePeerInfo
from pytier.wire.peer_header import PacketType

log = logging.getLogger("pytier.proxy.kcp")

# Received bytes a stream holds for a slow TCP writer before KCP stops reading (its window closes).
READ_BUFFER_HIGH = 1024 * 1024
READ_BUFFER_LOW = 256 * 1024
# Taken from the TCP reader per write before waiting for KCP's window.
WRITE_BUFFER_HIGH = 512 * 1024

SendFn = Callable[[int, int, bytes], object]
# The FEC shape protecting KCP toward a peer ("32+20x2", "off" while measuring a clean path), or
# None when its packets go plain (no --enable-fec-kcp, a peer without FEC, no direct UDP link).
FecShapeFn = Callable[[int], str | None]


class KcpStream:
    """One proxied connection's byte stream over KCP (the proxy's ProxyStream)."""

    def __init__(self, transport: KcpTransport, handle: int, peer: int) -> None:
        self._t = transport
        self.handle = handle
        self.peer = peer
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._closed_reason: str | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._pending = bytearray()
        self._eof_wanted = False
        self._close_wanted = False
        self._final_stats: dict[str, Any] = {}

    # ---- events from the endpoint -----------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()
        if self._buffered > READ_BUFFER_HIGH:
            self._t.endpoint.pause_reading(self.handle)

    def _on_finished(self) -> None:
        self._eof = True
        self._readable.set()

    def _on_closed(self, reason: str, stats: dict[str, Any]) -> None:
        self._t.blocked.pop(self.handle, None)
        self._closed_reason = reason
        self._final_stats = stats
        self._eof = True
        self._readable.set()
        self._writable.set()

    def _push(self) -> None:
        """Move queued bytes into KCP as its window allows."""
        ep = self._t.endpoint
        while self._pending:
            taken = ep.send(self.handle, memoryview(self._pending)[: min(len(self._pending), 256 * 1024)])
            if not taken:
                break
            del self._pending[:taken]
        if self._pending:
            self._t.blocked[self.handle] = self
        else:
            self._t.blocked.pop(self.handle, None)
        if not self._pending and self._eof_wanted:
            ep.shutdown_write(self.handle)
            self._eof_wanted = False
        if not self._pending and self._close_wanted:
            ep.close(self.handle)
            self._close_wanted = False
        if len(self._pending) < WRITE_BUFFER_HIGH:
            self._writable.set()

    # ---- ProxyStream --------------------------------------------------------------------------

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._closed_reason not in (None, "finished"):
                    raise ConnectionResetError(f"KCP stream closed: {self._closed_reason}")
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered < READ_BUFFER_LOW:
            self._t.endpoint.resume_reading(self.handle)
            self._t.kick()
        return data

    def write(self, data: bytes) -> None:
        if self._closed_reason is not None:
            raise ConnectionResetError(f"KCP stream closed: {self._closed_reason}")
        self._pending += data
        self._push()
        self._t.kick()

    async def drain(self) -> None:
        while len(self._pending) >= WRITE_BUFFER_HIGH:
            if self._closed_reason is not None:
                raise ConnectionResetError(f"KCP stream closed: {self._closed_reason}")
            self._writable.clear()
            await self._writable.wait()

    def write_eof(self) -> None:
        self._eof_wanted = True
        self._push()
        self._t.kick()

    def abort(self) -> None:
        self._pending.clear()
        self._t.blocked.pop(self.handle, None)
        self._close_wanted = False
        if self._closed_reason is None:
            self._t.endpoint.abort(self.handle)
            self._t.kick()

    def close(self) -> None:
        if self._closed_reason is None:
            if self._pending:
                # KCP takes no data after its close (that sends FIN once what it holds is
                # acknowledged), so bytes still waiting here for its window go in first: closing at
                # once cut both ways' last bytes off behind a clean FIN when both sides finished
                # sending at about the same time.
                self._close_wanted = True
                self._push()
            else:
                self._t.endpoint.close(self.handle)
            self._t.kick()

    def stats(self) -> dict[str, Any]:
        """Round-trip time and resent data segments (fast and timeout resends), live or final; a
        conversation lingering after its close has no KCP state left, so it shows the final ones."""
        s = self._final_stats
        if self._closed_reason is None:
            with contextlib.suppress(KeyError):
                s = self._t.endpoint.stats(self.handle)
        out = {"rtt_ms": s.get("srtt_ms"), "retrans": s.get("retransmits"),
               "segments_sent": s.get("segments_sent"), "spurious": s.get("spurious_resends")}
        if self._t.fec_shape is not None:
            out["fec"] = self._t.fec_shape(self.peer)
        return out


class _KcpIncoming:
    kind = TransportType.Kcp

    def __init__(self, transport: KcpTransport, event: IncomingConnection) -> None:
        self._t = transport
        self.handle = event.handle
        self.from_peer = event.from_peer
        self.conn_data = event.conn_data

    def accept(self) -> KcpStream:
        stream = KcpStream(self._t, self.handle, self.from_peer)
        self._t.streams[self.handle] = stream
        self._t.endpoint.accept(self.handle)
        self._t.kick()
        return stream

    def refuse(self) -> None:
        self._t.endpoint.refuse(self.handle)
        self._t.kick()


class KcpTransport:
    kind = TransportType.Kcp

    def __init__(self, my_peer_id: int, send: SendFn, fec_shape: FecShapeFn | None = None) -> None:
        self.endpoint = KcpEndpoint(my_peer_id, now=time.monotonic())
        self._send = send
        self.fec_shape = fec_shape
        self.streams: dict[int, KcpStream] = {}
        # Streams holding bytes KCP's window did not take yet: each pump offers them again. Kept
        # apart so that a pump costs nothing per idle stream (walking all 5,000 streams of a busy
        # node on every received packet was a quarter of its CPU time).
        self.blocked: dict[int, KcpStream] = {}
        self._connecting: dict[int, asyncio.Future[None]] = {}
        self.on_incoming: Callable[[Incoming], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._kick_scheduled = False
        self._loop = asyncio.get_running_loop()

    def accepts(self, dst: RoutePeerInfo, next_hop: RoutePeerInfo | None) -> bool:
        if not dst.feature_flag.kcp_input:
            return False
        return next_hop is None or not next_hop.feature_flag.no_relay_kcp

    def on_packet(self, from_peer: int, packet_type: int, payload: bytes) -> None:
        self.endpoint.receive(from_peer, packet_type, payload, time.monotonic())
        self.kick()

    async def open(self, peer_id: int, conn_data: bytes) -> KcpStream:
        handle = self.endpoint.connect(peer_id, conn_data, time.monotonic())
        fut: asyncio.Future[None] = self._loop.create_future()
        self._connecting[handle] = fut
        stream = KcpStream(self, handle, peer_id)
        self.streams[handle] = stream
        self._pump()
        try:
            await fut
        except BaseException:
            self.streams.pop(handle, None)
            self.blocked.pop(handle, None)
            self.endpoint.abort(handle)
            self.kick()
            raise
        finally:
            self._connecting.pop(handle, None)
        return stream

    def peer_gone(self, peer_id: int) -> None:
        self.endpoint.peer_gone(peer_id)
        self.kick()

    async def close(self) -> None:
        for handle in list(self.streams):
            self.endpoint.abort(handle)
        self._pump()
        if self._timer is not None:
            self._timer.cancel()

    # ---- the pump --------------------------------------------------------------------------

    def kick(self) -> None:
        """Run the endpoint soon, once, after the current burst of callbacks."""
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._kick_scheduled = False
        ep = self.endpoint
        now = time.monotonic()
        if (t := ep.get_timer()) is not None and t <= now:
            ep.handle_timer(now)
        while (ev := ep.next_event()) is not None:
            self._dispatch(ev)
        if self.blocked:
            for stream in list(self.blocked.values()):
                stream._push()
        send = self._send
        for to_peer, packet_type, payload in ep.datagrams_to_send(now):
            send(to_peer, packet_type, payload)
        while (ev := ep.next_event()) is not None:
            self._dispatch(ev)
        self._arm()

    def _arm(self) -> None:
        when = self.endpoint.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            delay = max(0.0, when - time.monotonic())
            self._timer = self._loop.call_later(delay, self._pump)

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, DataReceived):
            stream = self.streams.get(ev.handle)
            if stream is not None:
                stream._on_data(ev.data)
        elif isinstance(ev, PeerFinished):
            stream = self.streams.get(ev.handle)
            if stream is not None:
                stream._on_finished()
        elif isinstance(ev, Connected):
            fut = self._connecting.get(ev.handle)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(ev, ConnectFailed):
            self.streams.pop(ev.handle, None)
            self.blocked.pop(ev.handle, None)
            fut = self._connecting.get(ev.handle)
            if fut is not None and not fut.done():
                fut.set_exception(ConnectRefused(str(ev.reason)))
        elif isinstance(ev, ConnectionClosed):
            log.debug("KCP conversation %s closed (%s): %s", ev.stats.get("conv"), ev.reason,
                      " ".join(f"{k}={v}" for k, v in ev.stats.items() if k != "conv"))
            stream = self.streams.pop(ev.handle, None)
            if stream is not None:
                stream._on_closed(str(ev.reason), dict(ev.stats))
            fut = self._connecting.get(ev.handle)
            if fut is not None and not fut.done():
                fut.set_exception(ConnectRefused(str(ev.reason)))
        elif isinstance(ev, IncomingConnection):
            if self.on_incoming is None:
                self.endpoint.refuse(ev.handle)
            else:
                self.on_incoming(_KcpIncoming(self, ev))


def register(transport: KcpTransport, register_handler: Callable[[PacketType, Callable[[int, bytes], None]],
                                                                  None]) -> None:
    """Route KcpSrc/KcpDst peer packets addressed to this node into the transport."""
    register_handler(PacketType.KcpSrc, lambda peer, payload: transport.on_packet(peer, PacketType.KcpSrc,
                                                                                 payload))
    register_handler(PacketType.KcpDst, lambda peer, payload: transport.on_packet(peer, PacketType.KcpDst,
                                                                                 payload))
