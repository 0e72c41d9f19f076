"""The management API server on the rpc portal: answers pytier-cli from the node's handlers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import ipaddress
import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from pytier.errors import UserError
from pytier.mgmt.protocol import (
    MAX_REQUEST_BYTES,
    MgmtError,
    RequestError,
    decode_request,
    encode_error,
    encode_result,
    format_address,
)

log = logging.getLogger("pytier.mgmt")

# A handler takes the request's params and returns JSON-able data (or an awaitable of it). It raises
# MgmtError for an answer the user should read as is ("no such peer"); anything else is logged as a bug.
Handler = Callable[[dict[str, Any]], Any]

_LINGER_S = 2.0  # at most this long to drain a client we are hanging up on


class MgmtServer:
    def __init__(self, handlers: Mapping[str, Handler], host: str, port: int) -> None:
        self._handlers = handlers
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MgmtServer is not started")
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=MAX_REQUEST_BYTES, reuse_address=True
            )
        except OSError as e:
            raise UserError(_bind_error(self._host, self._port, e)) from e
        host, port = self.address
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("management API on %s is reachable from other hosts", format_address(host, port))
        log.info("management API listening on %s", format_address(host, port))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> MgmtServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve_requests(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only close() (or the loop shutting down) cancels a connection. Ending quietly matters:
            # asyncio's stream callback would log a cancelled task as an error.
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # StreamReader's way of saying the line is over its limit
                error = f"request line longer than {MAX_REQUEST_BYTES} bytes"
                await _reply_and_hang_up(reader, writer, error)
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                method, params = decode_request(line)
            except RequestError as e:
                await _reply_and_hang_up(reader, writer, str(e))
                return
            writer.write(await self._dispatch(method, params))
            await writer.drain()

    async def _dispatch(self, method: str, params: dict[str, Any]) -> bytes:
        handler = self._handlers.get(method)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return encode_error(f"unknown method {method!r} (known: {known})")
        try:
            result = handler(params)
            if inspect.isawaitable(result):
                result = await result
            return encode_result(result)
        except MgmtError as e:
            return encode_error(str(e))
        except Exception as e:
            log.exception("management request %r failed", method)
            return encode_error(f"internal error in {method!r}: {type(e).__name__}: {e}")


async def _reply_and_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: str) -> None:
    """Send the error, then our FIN, and drain what the client is still sending: closing with unread
    input would reset the connection and could destroy the reply before the client reads it."""
    writer.write(encode_error(error))
    writer.write_eof()
    await writer.drain()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_LINGER_S):
            while await reader.read(64 * 1024):
                pass


def _bind_error(host: str, port: int, e: OSError) -> str:
    where = f"cannot open the management API on {format_address(host, port)}"
    if e.errno == errno.EADDRINUSE:
        return (f"{where}: address already in use "
                "(is another pytier-core running? choose a port with --rpc-portal)")
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this host (see --rpc-portal)"
    if e.errno == errno.EACCES:
        return f"{where}: permission denied (see --rpc-portal)"
    return f"{where}: {(e.strerror or str(e)).lower()}"
