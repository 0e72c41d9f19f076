"""ikcp's segment format, read the way ikcp_input reads it.

A KCP packet body is a run of segments, each a 24-byte little-endian header (conv, cmd, frg, wnd,
ts, sn, una, len) and `len` bytes of data. ikcp_input stops at the first segment with a foreign
conv, an impossible length or an unknown command; `segments` stops at the same place, so what it
yields is exactly what ikcp processed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

SEGMENT = struct.Struct("<IBBHIIII")
HEADER_LEN = SEGMENT.size  # 24
CMD_PUSH = 81
CMD_ACK = 82
CMD_WASK = 83
CMD_WINS = 84


def segments(body: bytes | memoryview, conv: int) -> Iterator[tuple[int, int, int]]:
    """(cmd, sn, ts) of each segment of conversation `conv` that ikcp_input would process."""
    size = len(body)
    off = 0
    unpack = SEGMENT.unpack_from
    while size - off >= HEADER_LEN:
        seg_conv, cmd, _frg, _wnd, ts, sn, _una, length = unpack(body, off)
        off += HEADER_LEN
        if seg_conv != conv or length > size - off or not CMD_PUSH <= cmd <= CMD_WINS:
            return
        yield cmd, sn, ts
        off += length


def count_pushes(body: bytes | memoryview, conv: int) -> int:
    return sum(1 for cmd, _, _ in segments(body, conv) if cmd == CMD_PUSH)

