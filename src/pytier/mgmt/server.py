"""The management API server on the rpc portal: answers pytier-cli from the node's handlers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import inspect
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from pytier.config import DEFAULT_RPC_PORTAL_WHITELIST
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
from pytier.ratelog import RateLimitedLog

log = logging.getLogger("pytier.mgmt")

# A handler takes the request's params and returns JSON-able data (or an awaitable of it). It raises
# MgmtError for an answer the user should read as is ("no such peer"); anything else is logged as a bug.
Handler = Callable[[dict[str, Any]], Any]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LINGER_S = 2.0  # at most this long to drain a client we are hanging up on
# pytier-cli holds a connection for one request; these bound what a flood of connections can take
# (sockets, tasks, buffers), and a connection that sends nothing for IDLE_TIMEOUT_S is closed.
MAX_CONNECTIONS = 32
MAX_REFUSING = 16  # connections being told why they are refused; past that they are cut at once
IDLE_TIMEOUT_S = 30.0
_REFUSE_LINGER_S = 0.5


class MgmtServer:
    def __init__(self, handlers: Mapping[str, Handler], host: str, port: int,
                 whitelist: Sequence[IPNetwork] = DEFAULT_RPC_PORTAL_WHITELIST) -> None:
        self._handlers = handlers
        self._host = host
        self._port = port
        self._whitelist = tuple(whitelist)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._refusing: set[asyncio.Task[None]] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self._refusal_log = RateLimitedLog(log)

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
        where = format_address(host, port)
        if not ipaddress.ip_address(host).is_loopback:
            if all(net.network_address.is_loopback for net in self._whitelist):
                log.info("management API on %s answers loopback clients only (see --rpc-portal-whitelist)",
                         where)
            else:
                log.warning("management API on %s answers clients from %s", where,
                            ", ".join(str(net) for net in self._whitelist))
        log.info("management API listening on %s", where)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [*self._connections, *self._refusing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> MgmtServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _admits(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d
        return any(addr in net for net in self._whitelist)

    def _refusal(self, host: str) -> tuple[str, str] | None:
        if not self._admits(host):
            return "not_whitelisted", f"{host} is not in the rpc portal whitelist (--rpc-portal-whitelist)"
        if len(self._connections) >= MAX_CONNECTIONS:
            return "busy", f"too many management connections (at most {MAX_CONNECTIONS})"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        refusal = self._refusal(host)
        tasks = self._connections if refusal is None else self._refusing
        tasks.add(task)
        try:
            if refusal is None:
                await self._serve_requests(reader, writer)
            else:
                await self._refuse(reader, writer, host, *refusal)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only close() (or the loop shutting down) cancels a connection. Ending quietly matters:
            # asyncio's stream callback would log a cancelled task as an error.
            pass
        finally:
            tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                      kind: str, error: str) -> None:
        self.counters[f"mgmt_refused_{kind}"] += 1
        self._refusal_log.log(logging.WARNING, host, kind, "management API: refused a connection: %s", error)
        if len(self._refusing) > MAX_REFUSING:
            writer.transport.abort()
            return
        await _reply_and_hang_up(reader, writer, error, _REFUSE_LINGER_S)

    async def _serve_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    line = await reader.readline()
            except ValueError:  # StreamReader's way of saying the line is over its limit
                self.counters["mgmt_refused_long_line"] += 1
                error = f"request line longer than {MAX_REQUEST_BYTES} bytes"
                await _reply_and_hang_up(reader, writer, error)
                return
            except TimeoutError:
                self.counters["mgmt_closed_idle"] += 1
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                method, params = decode_request(line)
            except RequestError as e:
                self.counters["mgmt_refused_bad_request"] += 1
                await _reply_and_hang_up(reader, writer, str(e))
                return
            writer.write(await self._dispatch(method, params))
            try:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    await writer.drain()
            except TimeoutError:  # a client that sends requests but never reads the replies
                self.counters["mgmt_closed_idle"] += 1
                return
            # Requests pipelined in one burst are all in the buffer already: without this, answering
            # them would hold the event loop (and the node's packets) until the burst is done.
            await asyncio.sleep(0)

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


async def _reply_and_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: str,
                             linger_s: float = _LINGER_S) -> None:
    """Send the error, then our FIN, and drain what the client is still sending: closing with unread
    input would reset the connection and could destroy the reply before the client reads it."""
    writer.write(encode_error(error))
    writer.write_eof()
    await writer.drain()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(linger_s):
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
