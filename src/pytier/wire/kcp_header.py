"""The 14-byte header of EasyTier's KCP proxy packets (payload of KcpSrc/KcpDst peer packets)."""

from __future__ import annotations

import struct
from enum import IntFlag

from pytier.wire.errors import WireError


class KcpFlag(IntFlag):
    SYN = 0x01
    ACK = 0x02
    FIN = 0x04
    DATA = 0x08
    RST = 0x10
    PING = 0x20
    PONG = 0x40


# conv, src_session_id (initiator's peer id), dst_session_id (acceptor's peer id), flag, rsv
KCP_HEADER = struct.Struct("<IIIBB")
KCP_HEADER_LEN = 14

_pack = KCP_HEADER.pack
_unpack_from = KCP_HEADER.unpack_from


def pack_kcp_header(conv: int, src_session_id: int, dst_session_id: int, flag: int) -> bytes:
    return _pack(conv, src_session_id, dst_session_id, flag, 0)


def unpack_kcp_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(conv, src_session_id, dst_session_id, flag); the body is buf[KCP_HEADER_LEN:]."""
    if len(buf) < KCP_HEADER_LEN:
        raise WireError(f"KCP proxy header needs {KCP_HEADER_LEN} bytes, got {len(buf)}")
    conv, src, dst, flag, _rsv = _unpack_from(buf)
    return conv, src, dst, flag
