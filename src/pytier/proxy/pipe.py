"""Joins a kernel TCP socket and a proxy stream (KCP or QUIC), both ways, with half-close."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from pytier.proxy.entries import EntryState, ProxyEntry

READ_CHUNK = 64 * 1024
# How a side that went away shows itself; uvloop raises RuntimeError for a write to a transport
# that has already closed.
_BROKEN = (OSError, ConnectionError, asyncio.IncompleteReadError, EOFError, RuntimeError)


class ProxyStream(Protocol):
    """A reliable byte stream to another node, as a transport offers it to the proxy."""

    async def read(self) -> bytes:
        """Up to some bytes; b"" once the far side finished sending."""
        ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Wait until the transport takes more (backpressure toward the TCP reader)."""
        ...

    def write_eof(self) -> None: ...

    def abort(self) -> None:
        """Reset the stream: the far side's TCP connection is reset too."""
        ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


async def _tcp_to_stream(reader: asyncio.StreamReader, stream: ProxyStream, entry: ProxyEntry,
                         outbound: bool) -> None:
    while True:
        data = await reader.read(READ_CHUNK)
        if not data:
            stream.write_eof()
            entry.state = EntryState.ClosingSrc if outbound else EntryState.ClosingDst
            return
        if outbound:
            entry.tx_bytes += len(data)
        else:
            entry.rx_bytes += len(data)
        stream.write(data)
        # The frame would hold the chunk (up to READ_CHUNK) while it waits for the next one, which
        # on an idle connection is forever: that was most of an open connection's memory.
        del data
        await stream.drain()


async def _stream_to_tcp(stream: ProxyStream, writer: asyncio.StreamWriter, entry: ProxyEntry,
                         outbound: bool) -> None:
    while True:
        data = await stream.read()
        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            entry.state = EntryState.ClosingDst if outbound else EntryState.ClosingSrc
            return
        if outbound:
            entry.rx_bytes += len(data)
        else:
            entry.tx_bytes += len(data)
        writer.write(data)
        del data  # as above: not held while waiting
        await writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: ProxyStream,
               entry: ProxyEntry, *, outbound: bool) -> None:
    """Copy both ways until both directions finished; any error resets both sides.

    ``outbound`` is True on the source node (the TCP socket is the client's), False on the
    destination node (the TCP socket goes to the real destination); it decides which byte counter
    is tx and which is rx, so both sides' rows read from the client's point of view.
    """
    entry.state = EntryState.Connected
    up = asyncio.ensure_future(_tcp_to_stream(reader, stream, entry, outbound))
    down = asyncio.ensure_future(_stream_to_tcp(stream, writer, entry, outbound))
    try:
        await asyncio.gather(up, down)
    except _BROKEN:
        stream.abort()
        _reset(writer)
    except asyncio.CancelledError:
        stream.abort()
        _reset(writer)
        raise
    finally:
        up.cancel()
        down.cancel()
        stream.close()
        with contextlib.suppress(Exception):
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN, so the application sees the failure as a failure."""
    sock = writer.get_extra_info("socket")
    # On a transport that already closed, uvloop hands out a stand-in socket with fd -1.
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(RuntimeError):
        writer.transport.abort()


async def _copy(src: ProxyStream, dst: ProxyStream, count: Callable[[int], None]) -> None:
    while True:
        data = await src.read()
        if not data:
            dst.write_eof()
            return
        count(len(data))
        dst.write(data)
        del data  # as in _tcp_to_stream: not held while waiting
        await dst.drain()


async def pipe_streams(local: ProxyStream, remote: ProxyStream, entry: ProxyEntry) -> None:
    """Like `pipe`, with the client's side a user-space stack connection instead of a socket."""
    entry.state = EntryState.Connected

    def up(n: int) -> None:
        entry.tx_bytes += n

    def down(n: int) -> None:
        entry.rx_bytes += n

    tasks = [asyncio.ensure_future(_copy(local, remote, up)),
             asyncio.ensure_future(_copy(remote, local, down))]
    try:
        await asyncio.gather(*tasks)
    except _BROKEN:
        local.abort()
        remote.abort()
    except asyncio.CancelledError:
        local.abort()
        remote.abort()
        raise
    finally:
        for task in tasks:
            task.cancel()
        local.close()
        remote.close()
