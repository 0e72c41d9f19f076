"""The 10-byte header on each FEC-protected packet between pytier nodes.

    0      1          5       6   7   8        10
    | ver/kind | group u32 | index | k | m | length u16 | payload (length bytes)

All fields big-endian. ver/kind: version 1 in the high nibble, kind in the low one (0 data, 1
parity). A group has k data frames (index 0..k-1) and m parity frames (index k..k+m-1). A data
frame's payload is the original packet, unchanged; its k and m are the group's nominal size at send
time. A parity frame's payload is one erasure-coded symbol, and its k and m are the group's actual
size (a group closed by the flush deadline has fewer data frames than nominal), so a receiver takes
a group's shape from its parity frames only. `length` must equal the bytes that follow, which
catches a truncated frame before it reaches the erasure decoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pytier.wire.errors import WireError

__all__ = [
    "HEADER_LEN",
    "MAX_GROUP_SIZE",
    "MAX_PAYLOAD",
    "FecFrameError",
    "FecHeader",
    "FrameKind",
    "emit_frame",
    "parse_frame",
]

VERSION = 1
HEADER = struct.Struct(">BIBBBH")
HEADER_LEN = HEADER.size
# zfec codes at most 256 symbols a group; one index value stays free so k + m fits a byte.
MAX_GROUP_SIZE = 255
MAX_PAYLOAD = 0xFFFF

_pack_into = HEADER.pack_into
_unpack_from = HEADER.unpack_from


class FecFrameError(WireError):
    """An FEC frame that does not parse: short, unknown version or kind, or fields out of range."""


class FrameKind(IntEnum):
    DATA = 0
    PARITY = 1


@dataclass(frozen=True, slots=True)
class FecHeader:
    kind: FrameKind
    group: int
    index: int
    k: int
    m: int
    length: int


def emit_frame(kind: FrameKind, group: int, index: int, k: int, m: int, payload: bytes) -> bytes:
    """Header plus payload as one frame; ValueError for fields the header cannot carry."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"FEC payload of {n} bytes exceeds {MAX_PAYLOAD}")
    if not (k >= 1 and m >= 1 and k + m <= MAX_GROUP_SIZE):
        raise ValueError(f"FEC group k={k} m={m} must have k, m >= 1 and k + m <= {MAX_GROUP_SIZE}")
    buf = bytearray(HEADER_LEN + n)
    _pack_into(buf, 0, (VERSION << 4) | kind, group & 0xFFFFFFFF, index, k, m, n)
    buf[HEADER_LEN:] = payload
    return bytes(buf)


def parse_frame(frame: bytes | bytearray | memoryview) -> tuple[FecHeader, memoryview]:
    """The header and a view of the payload; FecFrameError for anything malformed."""
    if len(frame) < HEADER_LEN:
        raise FecFrameError(f"FEC frame needs {HEADER_LEN} header bytes, got {len(frame)}")
    ver_kind, group, index, k, m, length = _unpack_from(frame)
    if ver_kind >> 4 != VERSION:
        raise FecFrameError(f"FEC frame version {ver_kind >> 4}, expected {VERSION}")
    kind_value = ver_kind & 0x0F
    if kind_value > FrameKind.PARITY:
        raise FecFrameError(f"FEC frame kind {kind_value} is unknown")
    kind = FrameKind(kind_value)
    if k == 0 or m == 0 or k + m > MAX_GROUP_SIZE:
        raise FecFrameError(f"FEC group k={k} m={m} out of range")
    if kind is FrameKind.DATA:
        if index >= k:
            raise FecFrameError(f"FEC data index {index} not below k={k}")
    elif not k <= index < k + m:
        raise FecFrameError(f"FEC parity index {index} outside {k}..{k + m - 1}")
    payload = memoryview(frame)[HEADER_LEN:]
    if len(payload) != length:
        raise FecFrameError(f"FEC frame says {length} payload bytes, carries {len(payload)}")
    if kind is FrameKind.PARITY and length < 2:
        raise FecFrameError("FEC parity symbol shorter than its 2-byte length prefix")
    return FecHeader(kind, group, index, k, m, length), payload
