"""Underlay framing: the 8-byte UDP tunnel header and the length-prefixed TCP stream."""

from __future__ import annotations

import struct
from enum import IntEnum

from pytier.wire.errors import WireError
from pytier.wire.peer_header import HEADER_LEN


class UdpMsgType(IntEnum):
    Invalid = 0
    Syn = 1
    Sack = 2
    Data = 3
    Fin = 4
    HolePunch = 5
    V4HolePunch = 6
    V6HolePunch = 7


# conn_id, msg_type, padding, body length
UDP_HEADER = struct.Struct("<IBBH")
UDP_HEADER_LEN = 8
_STUN_MAGIC = b"\x21\x12\xa4\x42"

_udp_pack = UDP_HEADER.pack
_udp_unpack_from = UDP_HEADER.unpack_from


def pack_udp(conn_id: int, msg_type: int, body: bytes | bytearray | memoryview) -> bytes:
    n = len(body)
    if n > 0xFFFF:
        raise ValueError(f"UDP tunnel body of {n} bytes does not fit the u16 length field")
    return _udp_pack(conn_id, msg_type, 0, n) + body


def parse_udp(datagram: bytes | bytearray | memoryview) -> tuple[int, int, memoryview]:
    """(conn_id, msg_type, body). The length field must equal the datagram length minus 8."""
    n = len(datagram)
    if n < UDP_HEADER_LEN:
        raise WireError(f"UDP tunnel datagram of {n} bytes is shorter than its header")
    conn_id, msg_type, _padding, length = _udp_unpack_from(datagram)
    if length != n - UDP_HEADER_LEN:
        raise WireError(f"UDP tunnel length field {length} does not match body of {n - UDP_HEADER_LEN}")
    return conn_id, msg_type, memoryview(datagram)[UDP_HEADER_LEN:]


def is_stun(datagram: bytes | bytearray | memoryview) -> bool:
    """A STUN message shares the listener's port; tunnel headers can never match this pattern."""
    return len(datagram) >= 8 and datagram[0] & 0xC0 == 0 and bytes(datagram[4:8]) == _STUN_MAGIC


MAX_TCP_FRAME_BODY = 2000
_TCP_LEN = struct.Struct("<I")
_tcp_len_pack = _TCP_LEN.pack
_tcp_len_unpack_from = _TCP_LEN.unpack_from


def _check_body_len(n: int) -> None:
    if n > MAX_TCP_FRAME_BODY:
        raise WireError(f"TCP frame body of {n} bytes is longer than {MAX_TCP_FRAME_BODY}")
    if n < HEADER_LEN:
        raise WireError(f"TCP frame body of {n} bytes is shorter than the peer header")


def encode_tcp_frame(packet: bytes | bytearray | memoryview) -> bytes:
    """u32 LE length ‖ packet, where packet is a peer header plus its payload."""
    n = len(packet)
    _check_body_len(n)
    return _tcp_len_pack(n) + packet


class TcpFrameDecoder:
    """Splits a TCP byte stream into peer packets.

    A WireError means the stream is broken beyond repair; the caller must close the connection.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        # Frames are copied out of a view of the buffer once, not sliced into a bytearray first;
        # the view must be gone before the buffer shrinks.
        with memoryview(buf) as view:
            while end - pos >= 4:
                (n,) = _tcp_len_unpack_from(buf, pos)
                _check_body_len(n)
                if end - pos - 4 < n:
                    break
                frames.append(bytes(view[pos + 4 : pos + 4 + n]))
                pos += 4 + n
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes buffered toward an incomplete frame."""
        return len(self._buf)
