"""The management API: a real MgmtServer on 127.0.0.1, the client helper, and pytier-cli against it."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pytier.errors import UserError
from pytier.mgmt import MgmtError, MgmtServer, RemoteError, call
from pytier.mgmt.protocol import (
    MAX_REQUEST_BYTES,
    RequestError,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
    to_jsonable,
)

CLI = str(Path(sys.executable).parent / "pytier-cli")
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


class State(enum.IntEnum):
    CONNECTED = 3


@dataclass
class Point:
    x: int
    ip: IPv4Interface


# ---------------------------------------------------------------------------------------------
# Wire format


def test_request_and_reply_round_trip() -> None:
    line = encode_request("peer", {"verbose": True})
    assert line == b'{"method":"peer","params":{"verbose":true}}\n'
    assert decode_request(line) == ("peer", {"verbose": True})
    assert decode_request(b'{"method": "node"}') == ("node", {})
    assert decode_reply(encode_result([{"a": 1}])) == [{"a": 1}]
    assert decode_reply(b'{"ok": true}') is None
    with pytest.raises(RemoteError, match=r"^no such peer$"):
        decode_reply(encode_error("no such\npeer"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{nope", "request is not valid JSON"),
        (b"\xff\xfe", "request is not valid JSON"),
        (b"[1, 2]", "request must be a JSON object"),
        (b'{"params": {}}', 'request has no "method" string'),
        (b'{"method": 5}', 'request has no "method" string'),
        (b'{"method": "peer", "params": [1]}', '"params" must be a JSON object'),
    ],
)
def test_bad_requests(line: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        decode_request(line)


@pytest.mark.parametrize("line", [b"nope", b"[]", b'{"result": 1}', b'{"ok": "yes"}'])
def test_bad_replies(line: bytes) -> None:
    with pytest.raises(MgmtError, match=r"^pytier-core sent a reply"):
        decode_reply(line)


def test_to_jsonable() -> None:
    value = {"state": State.CONNECTED, "ip": IPv4Interface("10.1.1.1/24"), "nan": float("nan"),
             "set": frozenset([1]), "tuple": (1, "a"), "point": Point(1, IPv4Interface("10.0.0.1/8")),
             "raw": b"\x01\x02", 5: None}
    assert to_jsonable(value) == {"state": "CONNECTED", "ip": "10.1.1.1/24", "nan": None, "set": [1],
                                  "tuple": [1, "a"], "point": {"x": 1, "ip": "10.0.0.1/8"}, "raw": "0102",
                                  "5": None}


# ---------------------------------------------------------------------------------------------
# Server and client

PEERS = [
    {"peer_id": 1234567, "ipv4": "10.144.144.2/24", "hostname": "node-b", "tunnel": "udp",
     "remote_addr": "198.18.0.2:11010", "latency_ms": 1.5, "loss_rate": 0.0, "rx_bytes": 2048,
     "tx_bytes": 1024, "version": "0.1.0"},
]
PROXY = [
    {"src": "10.126.126.7:51838", "dst": "10.147.223.128:22", "start_time": 1738924748,
     "state": "Connected", "transport_type": "Kcp"},
]


def handlers(calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Callable[[dict[str, Any]], Any]]:
    def peer(params: dict[str, Any]) -> Any:
        calls.append(("peer", params))
        return PEERS

    async def proxy(params: dict[str, Any]) -> Any:
        calls.append(("proxy", params))
        await asyncio.sleep(0)
        return PROXY

    def node(params: dict[str, Any]) -> Any:
        raise MgmtError("node is still starting")

    def stats(params: dict[str, Any]) -> Any:
        raise RuntimeError("boom")

    return {"peer": peer, "proxy": proxy, "node": node, "stats": stats}


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_call_round_trip() -> None:
    async def scenario() -> None:
        calls: list[tuple[str, dict[str, Any]]] = []
        async with MgmtServer(handlers(calls), "127.0.0.1", 0) as server:
            host, port = server.address
            assert host == "127.0.0.1" and port != 0
            assert await call(host, port, "peer") == PEERS
            assert await call(host, port, "proxy", {"x": 1}) == PROXY
            with pytest.raises(RemoteError, match=r"^node is still starting$"):
                await call(host, port, "node")
            with pytest.raises(RemoteError, match=r"^internal error in 'stats': RuntimeError: boom$"):
                await call(host, port, "stats")
            unknown = r"^unknown method 'nope' \(known: node, peer, proxy, stats\)$"
            with pytest.raises(RemoteError, match=unknown):
                await call(host, port, "nope")
        assert calls == [("peer", {}), ("proxy", {"x": 1})]

    run(scenario())


async def exchange(port: int, data: bytes) -> list[bytes]:
    """Send raw bytes and our FIN, then read reply lines until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        lines = []
        while line := await reader.readline():
            lines.append(line)
        return lines
    finally:
        writer.close()


def test_several_requests_per_connection_and_errors_that_keep_it_open() -> None:
    async def scenario() -> None:
        async with MgmtServer(handlers([]), "127.0.0.1", 0) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            for method in ("peer", "nope", "proxy", "node"):
                writer.write(encode_request(method) + b"\n")  # a blank line in between is fine
            await writer.drain()
            replies = [json.loads(await reader.readline()) for _ in range(4)]
            writer.close()
        assert replies == [
            {"ok": True, "result": PEERS},
            {"ok": False, "error": "unknown method 'nope' (known: node, peer, proxy, stats)"},
            {"ok": True, "result": PROXY},
            {"ok": False, "error": "node is still starting"},
        ]

    run(scenario())


def test_bad_json_gets_an_error_and_the_connection_closes() -> None:
    async def scenario() -> list[bytes]:
        async with MgmtServer(handlers([]), "127.0.0.1", 0) as server:
            return await exchange(server.address[1], b"{oops\n" + encode_request("peer"))

    [reply] = run(scenario())
    assert json.loads(reply)["ok"] is False
    assert json.loads(reply)["error"].startswith("request is not valid JSON")


def test_long_request_line_gets_an_error_and_the_connection_closes() -> None:
    async def scenario() -> tuple[list[bytes], list[bytes]]:
        async with MgmtServer(handlers([]), "127.0.0.1", 0) as server:
            port = server.address[1]
            just_fits = json.dumps({"method": "peer", "pad": "x" * (MAX_REQUEST_BYTES - 40)}).encode()
            assert len(just_fits) <= MAX_REQUEST_BYTES
            fits = await exchange(port, just_fits + b"\n")
            too_long = await exchange(port, b'{"method": "peer", "pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}')
            return fits, too_long

    fits, too_long = run(scenario())
    assert [json.loads(x) for x in fits] == [{"ok": True, "result": PEERS}]
    assert [json.loads(x) for x in too_long] == [
        {"ok": False, "error": "request line longer than 65536 bytes"}
    ]


def test_close_ends_idle_connections(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> bytes:
        server = MgmtServer(handlers([]), "127.0.0.1", 0)
        await server.start()
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(encode_request("peer"))
        await reader.readline()
        await server.close()
        rest = await reader.read()
        writer.close()
        return rest

    assert run(scenario()) == b""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_port_in_use_is_a_user_error() -> None:
    async def scenario() -> None:
        async with MgmtServer({}, "127.0.0.1", 0) as first:
            port = first.address[1]
            with pytest.raises(UserError) as info:
                await MgmtServer({}, "127.0.0.1", port).start()
            assert str(info.value) == (
                f"cannot open the management API on 127.0.0.1:{port}: address already in use "
                "(is another pytier-core running? choose a port with --rpc-portal)"
            )

    run(scenario())


def test_unreachable_portal(refused_port: int) -> None:
    with pytest.raises(MgmtError) as info:
        run(call("127.0.0.1", refused_port, "peer"))
    assert str(info.value) == (
        f"cannot reach pytier-core at 127.0.0.1:{refused_port}: connection refused "
        "(is pytier-core running? see --rpc-portal)"
    )


def test_silent_server_times_out() -> None:
    async def scenario() -> str:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(MgmtError) as info:
                await call("127.0.0.1", port, "peer", timeout=0.2)
            return str(info.value).replace(str(port), "PORT")

    assert run(scenario()) == "no reply from pytier-core at 127.0.0.1:PORT within 0.2 s"


# ---------------------------------------------------------------------------------------------
# pytier-cli against a real server


async def cli(*argv: str) -> tuple[int, str, str]:
    # Without COLUMNS and into a pipe, tables come whole.
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = await asyncio.create_subprocess_exec(CLI, *argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_pytier_cli_against_a_server() -> None:
    async def scenario() -> dict[str, tuple[int, str, str]]:
        async with MgmtServer(handlers([]), "127.0.0.1", 0) as server:
            portal = f"127.0.0.1:{server.address[1]}"
            return {
                "proxy": await cli("--rpc-portal", portal, "proxy"),
                "proxy-json": await cli("-p", portal, "-o", "json", "proxy"),
                "peer-json-after": await cli("peer", "-p", portal, "--output", "json"),
                "peer": await cli("-p", portal, "peer"),
                "node": await cli("-p", portal, "node"),
                "stats": await cli("-p", portal, "stats"),
                "route": await cli("-p", portal, "route"),
            }

    results = run(scenario())
    assert results["proxy"] == (0, (
        "┌────────────────────┬───────────────────┬─────────────────────────┬───────────┬────────────────┬────┬────┬─────────┬─────────┐\n"
        "│ src                │ dst               │ start_time              │ state     │ transport_type │ rx │ tx │ rtt(ms) │ retrans │\n"  # noqa: E501
        "├────────────────────┼───────────────────┼─────────────────────────┼───────────┼────────────────┼────┼────┼─────────┼─────────┤\n"
        "│ 10.126.126.7:51838 │ 10.147.223.128:22 │ 2025-02-07 10:39:08 UTC │ Connected │ Kcp            │ -  │ -  │ -       │ -       │\n"  # noqa: E501
        "└────────────────────┴───────────────────┴─────────────────────────┴───────────┴────────────────┴────┴────┴─────────┴─────────┘\n"
    ), "")
    code, out, err = results["proxy-json"]
    assert (code, json.loads(out), err) == (0, PROXY, "")
    code, out, err = results["peer-json-after"]
    assert (code, json.loads(out), err) == (0, PEERS, "")
    code, out, err = results["peer"]
    assert code == 0 and err == ""
    assert "│ 10.144.144.2/24 │ node-b   │ -    │ 1.50    │ 0.0% │ 2.0 KiB │ 1.0 KiB │ udp    │ 0.1.0   │ 1234567 │" in out  # noqa: E501
    assert results["node"] == (1, "", "pytier-cli: error: node is still starting\n")
    assert results["stats"] == (1, "", "pytier-cli: error: internal error in 'stats': RuntimeError: boom\n")
    assert results["route"] == (
        1, "", "pytier-cli: error: unknown method 'route' (known: node, peer, proxy, stats)\n"
    )


def test_pytier_cli_unreachable(refused_port: int) -> None:
    code, out, err = run(cli("--rpc-portal", f"127.0.0.1:{refused_port}", "peer"))
    assert (code, out) == (1, "")
    assert err == (
        f"pytier-cli: error: cannot reach pytier-core at 127.0.0.1:{refused_port}: connection refused "
        "(is pytier-core running? see --rpc-portal)\n"
    )


def test_pytier_cli_reports_a_malformed_reply() -> None:
    async def scenario() -> tuple[int, str, str]:
        async with MgmtServer({"peer": lambda params: {"not": "a list"}}, "127.0.0.1", 0) as server:
            return await cli("-p", str(server.address[1]), "peer")

    assert run(scenario()) == (
        1, "", "pytier-cli: error: unexpected reply from pytier-core to 'peer': expected a list of rows\n"
    )
