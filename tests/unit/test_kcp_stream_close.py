"""KcpStream's close after both halves closed: bytes still waiting for KCP's window go before the FIN.

Two real KcpTransports in one event loop (kcp_transport_pair)."""

from __future__ import annotations

import asyncio
import hashlib

from kcp_transport_pair import PEER_B, linked_pair  # tests/unit is on sys.path (prepend import mode)

from pytier.proxy.kcp import KcpStream

SIZE = 3 << 20  # far more than KCP's send queue takes at once


async def _read_all(stream: KcpStream) -> bytes:
    parts = []
    while data := await stream.read():
        parts.append(data)
    return b"".join(parts)


async def _both_ways_then_close() -> tuple[bytes, bytes, bytes, bytes]:
    a, b, accepted = linked_pair()
    # B finishes long before A's bytes are all in KCP, so A closes with most of them still queued.
    data_a, data_b = bytes(range(256)) * (SIZE // 256), bytes(reversed(range(256))) * 4
    sa = await a.open(PEER_B, b"conn")
    sb = await accepted.get()

    async def side(stream: KcpStream, data: bytes) -> bytes:
        stream.write(data)  # all at once, as a fast TCP reader can; drain would wait, close must not lose
        stream.write_eof()
        got = await _read_all(stream)
        stream.close()
        return got

    got_b, got_a = await asyncio.wait_for(asyncio.gather(side(sa, data_a), side(sb, data_b)), 60)
    await a.close()
    await b.close()
    return data_a, got_a, data_b, got_b


def test_close_with_bytes_still_queued_sends_them_before_fin() -> None:
    data_a, got_a, data_b, got_b = asyncio.run(_both_ways_then_close())
    assert hashlib.sha256(got_a).digest() == hashlib.sha256(data_a).digest()
    assert hashlib.sha256(got_b).digest() == hashlib.sha256(data_b).digest()
