"""The management API under hostile clients: whitelist, connection bound, idle deadline, floods.

A real MgmtServer on 127.0.0.1 and real sockets; the whitelist case that needs another source
address is in tests/e2e/test_hostile_input.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable
from ipaddress import ip_network
from typing import TypeVar

import pytest

from pytier.mgmt import MgmtServer, call
from pytier.mgmt import server as server_module
from pytier.mgmt.protocol import MAX_REQUEST_BYTES, encode_request

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


HANDLERS = {"stats": lambda _p: {"answered": 1}}


async def read_reply(reader: asyncio.StreamReader) -> dict[str, object]:
    return dict(json.loads(await asyncio.wait_for(reader.readline(), 5)))


def test_a_source_outside_the_whitelist_is_told_and_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pytier.mgmt")

    async def scenario() -> tuple[list[dict[str, object]], dict[str, int]]:
        async with MgmtServer(HANDLERS, "127.0.0.1", 0, [ip_network("198.18.0.0/15")]) as server:
            replies = []
            for _ in range(20):
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(encode_request("stats"))
                replies.append(await read_reply(reader))
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            return replies, dict(server.counters)

    replies, counters = run(scenario())
    assert replies == [{"ok": False, "error": "127.0.0.1 is not in the rpc portal whitelist "
                                              "(--rpc-portal-whitelist)"}] * 20
    assert counters == {"mgmt_refused_not_whitelisted": 20}
    lines = [r.getMessage() for r in caplog.records if r.name == "pytier.mgmt"]
    assert lines == ["management API: refused a connection: 127.0.0.1 is not in the rpc portal whitelist "
                     "(--rpc-portal-whitelist)"]


def test_connections_are_bounded_and_idle_ones_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_S", 1.0)

    async def scenario() -> None:
        async with MgmtServer(HANDLERS, "127.0.0.1", 0) as server:
            limit = server_module.MAX_CONNECTIONS
            idle = [await asyncio.open_connection(*server.address) for _ in range(limit)]
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(encode_request("stats"))
            busy = await read_reply(reader)
            assert busy == {"ok": False, "error": "too many management connections (at most 32)"}
            writer.close()
            # The idle deadline frees the slots: each idle connection is closed by the server.
            for r, _w in idle:
                assert await asyncio.wait_for(r.read(), 5) == b""
            assert await call(*server.address, "stats") == {"answered": 1}
            assert server.counters["mgmt_refused_busy"] == 1
            assert server.counters["mgmt_closed_idle"] == limit
            for _r, w in idle:
                w.close()

    run(scenario())


def test_garbage_huge_lines_and_request_floods_leave_the_server_answering() -> None:
    async def garbage(port: int, payload: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(payload)
            await writer.drain()
            await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def flood(port: int, n: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_request("stats") * n)
        await writer.drain()
        answered = 0
        for _ in range(n):
            reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
            answered += reply == {"ok": True, "result": {"answered": 1}}
        writer.close()
        return answered

    async def blank_lines_then_a_request(port: int) -> dict[str, object]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\n" * 100_000 + encode_request("stats"))
        reply = await read_reply(reader)
        writer.close()
        return reply

    async def scenario() -> None:
        async with MgmtServer(HANDLERS, "127.0.0.1", 0) as server:
            port = server.address[1]
            hostile = [garbage(port, os.urandom(4096)) for _ in range(10)]
            hostile += [garbage(port, b"x" * (4 * MAX_REQUEST_BYTES)) for _ in range(5)]
            flooders = [flood(port, 2000) for _ in range(3)]
            results = await asyncio.gather(*hostile, *flooders, blank_lines_then_a_request(port))
            assert results[-4:] == [2000, 2000, 2000, {"ok": True, "result": {"answered": 1}}]
            assert await call("127.0.0.1", port, "stats") == {"answered": 1}
            assert server.counters["mgmt_refused_bad_request"] == 10
            assert server.counters["mgmt_refused_long_line"] == 5

    run(scenario())
