"""The asyncio shell around QuicEndpoint: peer packets in and out, timers on the pacer's schedule, and
one stream object per proxied connection for the proxy to pipe through.

Datagrams leave only when the endpoint hands them out, and the endpoint's QUIC connections hand out
no more than BBR's pacer allows; when the pacer holds some back, the endpoint's timer says when the
next may go, and the shell wakes up then. So what leaves the node is paced, in bursts of at most a
couple of milliseconds' worth.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pytier.proxy.entries import TransportType
from pytier.proxy.transport import ConnectRefused, Incoming
from pytier.transport.quic_endpoint import (
    IncomingStream,
    QuicEndpoint,
    QuicSettings,
    StreamClosed,
    StreamData,
    StreamFinished,
    StreamOpened,
)
from pytier.wire.messages import RoutePeerInfo
from pytier.wire.peer_header import PacketType

# Bytes written to a stream and not yet sent before `drain()` waits. What is in flight is bounded by
# the congestion window and the peer's flow control, so it need not count here: counting it (it
# includes everything above a hole) capped a long lossy path far below its rate. While many streams
# are open they share SEND_BUDGET instead (never less than WRITE_BUFFER_LOW each): the node's unsent
# bytes stay within max(budget, N x WRITE_BUFFER_LOW) plus one read per stream, where N x 512 KiB
# was allowed; the rest waits in the kernel's socket buffers, and TCP's window tells the sender.
WRITE_BUFFER_HIGH = 512 << 10
WRITE_BUFFER_LOW = 16 << 10
SEND_BUDGET = 16 << 20
# A read() joins queued frames up to about this many bytes.
READ_JOIN = 64 << 10
# Waiting writers a pump looks at (see QuicTransport._wake_writers).
WAKE_CHECKS = 64
SendFn = Callable[[int, int, bytes], object]


class QuicStream:
    """One proxied connection's byte stream over QUIC (the proxy's ProxyStream)."""

    def __init__(self, transport: QuicTransport, handle: int) -> None:
        self._t = transport
        self.handle = handle
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._closed_reason: str | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._final_stats: dict[str, Any] = {}

    # ---- events from the endpoint -----------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._readable.set()

    def _on_finished(self) -> None:
        self._eof = True
        self._readable.set()

    def _on_closed(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._eof = True
        self._readable.set()
        self._writable.set()

    def _check_writable(self) -> None:
        if self._t.endpoint.unsent(self.handle) < self._t.write_limit():
            self._writable.set()

    # ---- ProxyStream --------------------------------------------------------------------------

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._closed_reason is not None:
                    raise ConnectionResetError(f"QUIC stream closed: {self._closed_reason}")
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunks = self._chunks
        data = chunks.popleft()
        if chunks and len(data) < READ_JOIN:
            # QUIC hands over a STREAM frame at a time (~1.3 KB): what queued up since the last
            # read goes to the TCP side in one write, not one await and one send() per frame.
            parts = [data]
            size = len(data)
            while chunks and size < READ_JOIN:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        # Credit the peer only for what the TCP side has taken: a slow writer slows the sender.
        self._t.endpoint.consume(self.handle, len(data))
        self._t.kick()
        return data

    def write(self, data: bytes) -> None:
        if self._closed_reason is not None:
            raise ConnectionResetError(f"QUIC stream closed: {self._closed_reason}")
        self._t.endpoint.send(self.handle, data)
        self._t.kick()

    async def drain(self) -> None:
        while self._t.endpoint.unsent(self.handle) >= self._t.write_limit():
            if self._closed_reason is not None:
                raise ConnectionResetError(f"QUIC stream closed: {self._closed_reason}")
            self._writable.clear()
            self._t.block(self)
            await self._writable.wait()
        if self._closed_reason is not None:
            raise ConnectionResetError(f"QUIC stream closed: {self._closed_reason}")

    def write_eof(self) -> None:
        if self._closed_reason is None:
            self._t.endpoint.shutdown_write(self.handle)
            self._t.kick()

    def abort(self) -> None:
        if self._closed_reason is None:
            self._closed_reason = "aborted"
            self._t.endpoint.abort(self.handle)
            self._t.streams.pop(self.handle, None)
            self._collect_final_stats()
            self._t.kick()

    def close(self) -> None:
        if self._closed_reason is None:
            self._closed_reason = "closed"
            self._t.endpoint.close(self.handle)
            self._t.streams.pop(self.handle, None)
            self._collect_final_stats()
            self._t.kick()

    def stats(self) -> dict[str, Any]:
        """The connection's figures, live; once the endpoint forgot the stream (here, or by itself
        when the stream failed), the ones it kept from that moment."""
        try:
            return self._t.endpoint.stats(self.handle)
        except KeyError:
            self._collect_final_stats()
            return self._final_stats

    def _collect_final_stats(self) -> None:
        final = self._t.endpoint.take_final_stats(self.handle)
        if final is not None:
            self._final_stats = final


class _QuicIncoming:
    kind = TransportType.Quic

    def __init__(self, transport: QuicTransport, event: IncomingStream) -> None:
        self._t = transport
        self.handle = event.handle
        self.from_peer = event.from_peer
        self.conn_data = event.conn_data

    def accept(self) -> QuicStream:
        stream = QuicStream(self._t, self.handle)
        if self._t.endpoint.accept(self.handle):
            self._t.streams[self.handle] = stream
        else:
            stream._on_closed("gone before it was accepted")
        self._t.kick()
        return stream

    def refuse(self) -> None:
        self._t.endpoint.refuse(self.handle)
        self._t.kick()


class QuicTransport:
    kind = TransportType.Quic

    def __init__(self, my_peer_id: int, send: SendFn, settings: QuicSettings | None = None) -> None:
        self.endpoint = QuicEndpoint(my_peer_id, settings)
        self._send = send
        self.streams: dict[int, QuicStream] = {}
        # Writers waiting in drain(), in the order the pump looks at them, and the same as a set.
        self._blocked: deque[QuicStream] = deque()
        self.blocked: set[QuicStream] = set()
        self.send_budget = SEND_BUDGET
        self._opening: dict[int, asyncio.Future[None]] = {}
        self.on_incoming: Callable[[Incoming], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._kick_scheduled = False
        self._loop = asyncio.get_running_loop()

    def write_limit(self) -> int:
        """Unsent bytes a stream may hold before its writer waits (see SEND_BUDGET)."""
        return max(WRITE_BUFFER_LOW, min(WRITE_BUFFER_HIGH, self.send_budget // max(1, len(self.streams))))

    def accepts(self, dst: RoutePeerInfo, next_hop: RoutePeerInfo | None) -> bool:
        if not dst.feature_flag.quic_input:
            return False
        return next_hop is None or not next_hop.feature_flag.no_relay_quic

    def on_packet(self, from_peer: int, packet_type: int, payload: bytes) -> None:
        self.endpoint.receive(from_peer, packet_type, payload, time.monotonic())
        self.kick()

    async def open(self, peer_id: int, conn_data: bytes) -> QuicStream:
        handle = self.endpoint.open(peer_id, conn_data, time.monotonic())
        fut: asyncio.Future[None] = self._loop.create_future()
        self._opening[handle] = fut
        stream = QuicStream(self, handle)
        self.streams[handle] = stream
        self._pump()
        try:
            await fut
        except BaseException:
            self.streams.pop(handle, None)
            self.endpoint.abort(handle)
            self.kick()
            raise
        finally:
            self._opening.pop(handle, None)
        return stream

    def peer_gone(self, peer_id: int) -> None:
        self.endpoint.peer_gone(peer_id, time.monotonic())
        self.kick()

    async def close(self) -> None:
        self.endpoint.close_all(time.monotonic())
        self._pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- the pump --------------------------------------------------------------------------

    def kick(self) -> None:
        """Run the endpoint soon, once, after the current burst of callbacks."""
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self, timer_fired: bool = False) -> None:
        self._kick_scheduled = False
        ep = self.endpoint
        now = time.monotonic()
        if timer_fired:
            ep.handle_timer(now)
        self._dispatch_all()
        send = self._send
        for to_peer, packet_type, payload in ep.datagrams_to_send(now):
            send(to_peer, packet_type, payload)
        self._dispatch_all()
        if self._blocked:
            self._wake_writers()
        self._arm()

    def block(self, stream: QuicStream) -> None:
        if stream not in self.blocked:
            self.blocked.add(stream)
            self._blocked.append(stream)

    def _wake_writers(self) -> None:
        """Look at up to WAKE_CHECKS waiting writers, in turn: with thousands waiting, a pump that
        looked at each of them would cost more than the datagrams it sends."""
        queue, waiting = self._blocked, self.blocked
        for _ in range(min(len(queue), WAKE_CHECKS)):
            stream = queue.popleft()
            if stream not in waiting:
                continue  # closed meanwhile
            stream._check_writable()
            if stream._writable.is_set():
                waiting.discard(stream)
            else:
                queue.append(stream)

    def _arm(self) -> None:
        when = self.endpoint.get_timer()
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            delay = max(0.0, when - time.monotonic())
            self._timer = self._loop.call_at(self._loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self._pump(timer_fired=True)

    def _dispatch_all(self) -> None:
        ep = self.endpoint
        while (ev := ep.next_event()) is not None:
            if isinstance(ev, StreamData):
                stream = self.streams.get(ev.handle)
                if stream is not None:
                    stream._on_data(ev.data)
            elif isinstance(ev, StreamFinished):
                stream = self.streams.get(ev.handle)
                if stream is not None:
                    stream._on_finished()
            elif isinstance(ev, StreamOpened):
                fut = self._opening.get(ev.handle)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif isinstance(ev, StreamClosed):
                stream = self.streams.pop(ev.handle, None)
                if stream is not None:
                    stream._on_closed(ev.reason)
                    self.blocked.discard(stream)
                fut = self._opening.get(ev.handle)
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectRefused(ev.reason))
            elif isinstance(ev, IncomingStream):
                if self.on_incoming is None:
                    ep.refuse(ev.handle)
                else:
                    self.on_incoming(_QuicIncoming(self, ev))


def register(transport: QuicTransport, register_handler: Callable[[PacketType, Callable[[int, bytes], None]],
                                                                   None]) -> None:
    """Route QuicSrc/QuicDst peer packets addressed to this node into the transport."""
    register_handler(PacketType.QuicSrc, lambda peer, payload: transport.on_packet(peer, PacketType.QuicSrc,
                                                                                  payload))
    register_handler(PacketType.QuicDst, lambda peer, payload: transport.on_packet(peer, PacketType.QuicDst,
                                                                                  payload))
