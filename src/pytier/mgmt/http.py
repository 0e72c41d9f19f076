"""The HTTP endpoint that Prometheus scrapes (--metrics-listen): GET /metrics, and nothing else.

It sits beside a node that carries traffic, so a client can cost it little: requests are small and
read within a deadline, replies are written within one, few clients are served at once, and an
error in rendering is a 500 for that scrape, never a problem for the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from collections.abc import Callable

from pytier.errors import UserError
from pytier.mgmt.metrics import CONTENT_TYPE
from pytier.mgmt.protocol import format_address

log = logging.getLogger("pytier.metrics")

PATH = "/metrics"
MAX_REQUEST_BYTES = 8 * 1024  # request line and headers together
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_CLIENTS = 8

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


class MetricsHttpServer:
    def __init__(self, render: Callable[[], str], host: str, port: int) -> None:
        self._render = render
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MetricsHttpServer is not started")
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port,
                                                      limit=MAX_REQUEST_BYTES, reuse_address=True)
        except OSError as e:
            raise UserError(_bind_error(self._host, self._port, e)) from e
        host, port = self.address
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("metrics on %s are reachable from other hosts", format_address(host, port))
        log.info("metrics at http://%s%s", format_address(host, port), PATH)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self._clients) >= MAX_CLIENTS:
                await _send(writer, 503, "too many clients\n")
                return
            self._clients.add(task)
            status, body = await self._answer(reader)
            await _send(writer, status, body)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            # A client that went away or was too slow, or the server closing: nothing to report.
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str]:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return 408, "request not complete in time\n"
        except asyncio.LimitOverrunError:
            return 431, f"request headers over {MAX_REQUEST_BYTES} bytes\n"
        except asyncio.IncompleteReadError:
            raise ConnectionError("client closed before a whole request") from None
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "expected an HTTP/1.x request line\n"
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != PATH:
            return 404, f"only {PATH} is served here\n"
        if method != "GET":
            return 405, f"only GET {PATH}\n"
        try:
            body = self._render()
        except Exception:
            log.exception("rendering the metrics failed")
            return 500, "rendering the metrics failed; see the node's log\n"
        return 200, body


async def _send(writer: asyncio.StreamWriter, status: int, body: str) -> None:
    data = body.encode()
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    headers = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
               f"Content-Length: {len(data)}", "Connection: close"]
    if status == 405:
        headers.append("Allow: GET")
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + data)
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await writer.drain()


def _bind_error(host: str, port: int, e: OSError) -> str:
    where = f"cannot serve metrics on {format_address(host, port)}"
    if e.errno == errno.EADDRINUSE:
        return f"{where}: address already in use (choose another port with --metrics-listen)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this host (see --metrics-listen)"
    if e.errno == errno.EACCES:
        return f"{where}: permission denied (see --metrics-listen)"
    return f"{where}: {(e.strerror or str(e)).lower()}"
