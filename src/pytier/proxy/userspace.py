"""User-space interception (--use-smoltcp): the asyncio shell around our NetStack.

Intercepted TCP packets read from TUN go to the user-space stack instead of the kernel, so host
firewall rules cannot break the proxy, and TCP that LAN hosts route through this node can be
proxied too (subnet-to-subnet). Each accepted connection becomes a `LocalStream`, which the proxy
pipes into a KCP or QUIC stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pytier.netstack.config import NetStackConfig
from pytier.netstack.events import (
    Connected,
    ConnectionClosed,
    DataReceived,
    Endpoint,
    FourTuple,
    NetStackError,
    PeerFinished,
    SynReceived,
    Writable,
)
from pytier.netstack.stack import NetStack

# Tuples stay routed to the stack this long after their connection closed, so late segments
# (retransmitted FINs, the last ACK) still reach it rather than leaking out as plain packets.
TUPLE_LINGER_S = 30.0
READ_BUFFER_HIGH = 1024 * 1024
READ_BUFFER_LOW = 256 * 1024
READ_BATCH = 64 * 1024


class LocalStream:
    """The client's side of one intercepted connection, as a ProxyStream."""

    def __init__(self, shell: UserspaceStack, handle: int) -> None:
        self._s = shell
        self.handle = handle
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._reset: str | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._pending = bytearray()
        self._eof_wanted = False

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()
        if self._buffered > READ_BUFFER_HIGH:
            self._s.stack.pause_reading(self.handle)

    def _on_finished(self) -> None:
        self._eof = True
        self._readable.set()

    def _on_closed(self, reason: str) -> None:
        if reason != "finished":
            self._reset = reason
        self._eof = True
        self._readable.set()
        self._writable.set()

    def _push(self) -> None:
        stack = self._s.stack
        while self._pending:
            try:
                taken = stack.send(self.handle, bytes(self._pending[: 256 * 1024]))
            except (KeyError, NetStackError):
                self._pending.clear()
                break
            if not taken:
                break
            del self._pending[:taken]
        if not self._pending:
            if self._eof_wanted:
                self._eof_wanted = False
                with contextlib.suppress(KeyError, NetStackError):
                    stack.shutdown_write(self.handle)
            self._writable.set()

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._reset is not None:
                    raise ConnectionResetError(f"local TCP connection closed: {self._reset}")
                return b""
            self._readable.clear()
            await self._readable.wait()
        # The stack delivers a segment at a time; hand the transport large writes, as a socket
        # read would (QUIC in particular pays per write).
        chunks = self._chunks
        data = chunks.popleft()
        if chunks and len(data) < READ_BATCH:
            parts = [data]
            size = len(data)
            while chunks and size + len(chunks[0]) <= READ_BATCH:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        self._buffered -= len(data)
        if self._buffered < READ_BUFFER_LOW:
            with contextlib.suppress(KeyError, NetStackError):
                self._s.stack.resume_reading(self.handle)
            self._s.kick()
        return data

    def write(self, data: bytes) -> None:
        if self._reset is not None:
            raise ConnectionResetError(f"local TCP connection closed: {self._reset}")
        self._pending += data
        self._push()
        self._s.kick()

    async def drain(self) -> None:
        while self._pending:
            if self._reset is not None:
                raise ConnectionResetError(f"local TCP connection closed: {self._reset}")
            self._writable.clear()
            await self._writable.wait()

    def write_eof(self) -> None:
        self._eof_wanted = True
        self._push()
        self._s.kick()

    def abort(self) -> None:
        self._s.call(self.handle, "abort")

    def close(self) -> None:
        self._s.call(self.handle, "close")

    def stats(self) -> dict[str, Any]:
        return {}


class UserspaceStack:
    def __init__(self, *, mtu: int, write_tun: Callable[[bytes], object],
                 on_syn: Callable[[int, Endpoint, Endpoint], None]) -> None:
        self.stack = NetStack(accept=lambda _t: True, now=time.monotonic(), config=NetStackConfig(mtu=mtu))
        self._write_tun = write_tun
        self._on_syn = on_syn
        self.streams: dict[int, LocalStream] = {}
        self._tuples: dict[bytes, float | None] = {}  # tuple key -> closed-at time (None: live)
        self._handle_tuple: dict[int, bytes] = {}
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._kick_scheduled = False

    @staticmethod
    def tuple_key(pkt: bytes, hl: int) -> bytes:
        return pkt[12:20] + pkt[hl:hl + 4]

    def owns(self, key: bytes) -> bool:
        closed_at = self._tuples.get(key, 0.0)
        if closed_at is None:
            return True
        if closed_at and time.monotonic() - closed_at < TUPLE_LINGER_S:
            return True
        self._tuples.pop(key, None)
        return False

    def feed(self, key: bytes, pkt: bytes) -> None:
        self._tuples.setdefault(key, None)
        self.stack.receive_packet(pkt, time.monotonic())
        self.kick()

    def stream_for(self, handle: int) -> LocalStream:
        stream = LocalStream(self, handle)
        self.streams[handle] = stream
        return stream

    def call(self, handle: int, what: str) -> None:
        try:
            getattr(self.stack, what)(handle)
        except (KeyError, NetStackError):
            return
        self.kick()

    def kick(self) -> None:
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._kick_scheduled = False
        stack = self.stack
        now = time.monotonic()
        if (t := stack.get_timer()) is not None and t <= now:
            stack.handle_timer(now)
        while (ev := stack.next_event()) is not None:
            self._dispatch(ev)
        for stream in self.streams.values():
            if stream._pending:
                stream._push()
        for pkt in stack.packets_to_send(now):
            self._write_tun(pkt)
        when = stack.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self._loop.call_later(max(0.0, when - time.monotonic()), self._pump)

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, SynReceived):
            key = ev.src.addr.packed + ev.dst.addr.packed + ev.src.port.to_bytes(2, "big") + \
                ev.dst.port.to_bytes(2, "big")
            self._tuples[key] = None
            self._handle_tuple[ev.handle] = key
            self._on_syn(ev.handle, ev.src, ev.dst)
        elif isinstance(ev, DataReceived):
            stream = self.streams.get(ev.handle)
            if stream is not None:
                stream._on_data(ev.data)
        elif isinstance(ev, PeerFinished):
            stream = self.streams.get(ev.handle)
            if stream is not None:
                stream._on_finished()
        elif isinstance(ev, Writable):
            stream = self.streams.get(ev.handle)
            if stream is not None:
                stream._push()
        elif isinstance(ev, ConnectionClosed):
            stream = self.streams.pop(ev.handle, None)
            if stream is not None:
                stream._on_closed(str(ev.reason))
            closed_key = self._handle_tuple.pop(ev.handle, None)
            if closed_key is not None:
                self._tuples[closed_key] = time.monotonic()
        elif isinstance(ev, Connected):
            pass

    def close(self) -> None:
        for handle in list(self.streams):
            self.call(handle, "abort")
        self._pump()
        if self._timer is not None:
            self._timer.cancel()


__all__ = ["FourTuple", "LocalStream", "UserspaceStack"]
