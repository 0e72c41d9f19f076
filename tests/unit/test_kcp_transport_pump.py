"""KcpTransport's pump offers bytes to KCP only for the streams holding some: with many idle streams
open, a stream whose bytes wait for KCP's window still gets them all through, and a stream that ends
while holding bytes is forgotten.

Two real KcpTransports in one event loop (kcp_transport_pair)."""

from __future__ import annotations

import asyncio
import hashlib

from kcp_transport_pair import PEER_B, linked_pair  # tests/unit is on sys.path (prepend import mode)

from pytier.proxy.kcp import KcpStream

IDLE = 300
SIZE = 3 << 20  # far more than KCP's send queue takes at once


async def _read(stream: KcpStream, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size and (data := await stream.read()):
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def _scenario() -> tuple[bytes, bytes, list[int], list[int], list[int]]:
    a, b, accepted = linked_pair()
    idle = [await a.open(PEER_B, f"idle {i}".encode()) for i in range(IDLE)]
    for _ in idle:
        await accepted.get()
    busy = await a.open(PEER_B, b"busy")
    far = await accepted.get()
    doomed = await a.open(PEER_B, b"doomed")
    await accepted.get()

    data = bytes(range(256)) * (SIZE // 256)
    busy.write(data)
    doomed.write(data)
    blocked_while_sending = sorted(a.blocked)
    doomed.abort()
    blocked_after_abort = sorted(a.blocked)
    got = await asyncio.wait_for(_read(far, SIZE), 60)
    blocked_at_end = sorted(a.blocked)
    await a.close()
    await b.close()
    handles = [busy.handle, doomed.handle, *blocked_at_end]
    return data, got, blocked_while_sending, blocked_after_abort, handles


def test_bytes_waiting_for_the_window_go_through_beside_idle_streams() -> None:
    data, got, while_sending, after_abort, handles = asyncio.run(_scenario())
    busy, doomed, *at_end = handles
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert while_sending == sorted([busy, doomed])  # only the streams holding bytes, none of the idle
    assert after_abort == [busy]
    assert at_end == []
