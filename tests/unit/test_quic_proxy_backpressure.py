"""The QUIC proxy transport's back-pressure: many streams whose far side does not read hold a bounded
number of unsent bytes, and every byte arrives once the far side reads."""

from __future__ import annotations

import asyncio
import os

from pytier.proxy import quic as proxy_quic
from pytier.proxy.quic import QuicStream, QuicTransport

A, B = 0x0A, 0x0B
STREAMS = 100
PER_STREAM = 128 << 10
CHUNK = 16 << 10


async def _run() -> None:
    loop = asyncio.get_running_loop()
    transports: dict[int, QuicTransport] = {}

    def sender(me: int) -> proxy_quic.SendFn:
        def send(to_peer: int, packet_type: int, payload: bytes) -> None:
            loop.call_soon(transports[to_peer].on_packet, me, packet_type, payload)
        return send

    ta, tb = QuicTransport(A, sender(A)), QuicTransport(B, sender(B))
    transports.update({A: ta, B: tb})
    ta.send_budget = 1 << 20
    accepted: list[QuicStream] = []
    tb.on_incoming = lambda incoming: accepted.append(incoming.accept())  # type: ignore[attr-defined]
    data = [os.urandom(PER_STREAM) for _ in range(STREAMS)]

    async def write_all(i: int) -> QuicStream:
        stream = await ta.open(B, b"conn %d" % i)
        for pos in range(0, PER_STREAM, CHUNK):
            stream.write(data[i][pos:pos + CHUNK])
            await stream.drain()
        stream.write_eof()
        return stream

    writers = [asyncio.create_task(write_all(i)) for i in range(STREAMS)]
    try:
        # Nobody reads at B: each stream gets its initial credit across, the rest waits.
        await asyncio.sleep(1.5)
        done = [w for w in writers if w.done()]
        assert not done
        assert len(accepted) == STREAMS
        unsent = sum(ta.endpoint.unsent(s.handle) for s in ta.streams.values())
        limit = ta.write_limit()
        assert limit == proxy_quic.WRITE_BUFFER_LOW
        # At most the limit per stream, plus the one chunk written before drain() waited.
        assert unsent <= max(ta.send_budget, STREAMS * limit) + STREAMS * CHUNK
        assert unsent > STREAMS * CHUNK  # the writers did fill up to their limit

        async def read_all(stream: QuicStream) -> bytes:
            got = bytearray()
            while chunk := await stream.read():
                got += chunk
            return bytes(got)

        got = await asyncio.wait_for(asyncio.gather(*(read_all(s) for s in accepted)), 60)
        await asyncio.wait_for(asyncio.gather(*writers), 10)
        by_header = sorted(got, key=lambda b: data.index(b) if b in data else -1)
        assert by_header == data
    finally:
        for w in writers:
            w.cancel()
        await ta.close()
        await tb.close()


def test_unread_streams_hold_bounded_unsent_bytes_then_all_arrive() -> None:
    asyncio.run(asyncio.wait_for(_run(), 120))
