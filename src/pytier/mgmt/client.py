"""Client side of the management API: one call, one connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping
from typing import Any

from pytier.mgmt.protocol import (
    DEFAULT_TIMEOUT_S,
    MAX_REPLY_BYTES,
    MgmtError,
    decode_reply,
    encode_request,
    format_address,
)


async def call(
    host: str,
    port: int,
    method: str,
    params: Mapping[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Ask pytier-core at host:port for `method` and return its result.

    Raises RemoteError (a MgmtError) when pytier-core answers with an error, and MgmtError with a
    message for the user when it cannot be reached or answers nonsense.
    """
    where = format_address(host, port)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(host, port, where)
            try:
                writer.write(encode_request(method, params))
                await writer.drain()
                line = await reader.readline()
            except ValueError:
                raise MgmtError(f"reply from pytier-core at {where} is too large") from None
            except OSError as e:
                raise MgmtError(f"connection to pytier-core at {where} failed: {_reason(e)}") from None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise MgmtError(f"no reply from pytier-core at {where} within {timeout:g} s") from None
    if not line:
        raise MgmtError(f"pytier-core at {where} closed the connection without replying")
    return decode_reply(line)


async def _connect(host: str, port: int, where: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_connection(host, port, limit=MAX_REPLY_BYTES)
    except socket.gaierror as e:
        raise MgmtError(f"cannot resolve {host!r}: {e.strerror} (see --rpc-portal)") from None
    except ConnectionRefusedError:
        raise MgmtError(
            f"cannot reach pytier-core at {where}: connection refused "
            "(is pytier-core running? see --rpc-portal)"
        ) from None
    except OSError as e:
        raise MgmtError(f"cannot reach pytier-core at {where}: {_reason(e)} (see --rpc-portal)") from None


def _reason(e: OSError) -> str:
    return (e.strerror or str(e) or type(e).__name__).lower()
