"""ikcp's segment format, read the way ikcp_input reads it, and the one segment the session writes.

A KCP packet body is a run of segments, each a 24-byte little-endian header (conv, cmd, frg, wnd,
ts, sn, una, len) and `len` bytes of data. ikcp_input stops at the first segment with a foreign
conv, an impossible length or an unknown command; `pushes` stops at the same place, so the data
segments it finds are exactly those ikcp processed.
"""

from __future__ import annotations

import struct

SEGMENT = struct.Struct("<IBBHIIII")
HEADER_LEN = SEGMENT.size  # 24
CMD_PUSH = 81
CMD_ACK = 82
CMD_WASK = 83
CMD_WINS = 84
MASK32 = 0xFFFFFFFF
_READ = struct.Struct("<IB3xII4xI")  # conv, cmd, ts, sn, len: what the readers below need
_ACK_BYTE = bytes([CMD_ACK])


def pushes(body: bytes | memoryview, conv: int, start: int = 0) -> list[tuple[int, int]]:
    """(sn, ts) of the data segments of conversation `conv` that ikcp_input would process, reading
    from offset `start`."""
    return segments(body, conv, CMD_PUSH, start)


def acks(body: bytes | memoryview, conv: int) -> list[tuple[int, int]]:
    """(sn, ts) of the ACK segments of conversation `conv` that ikcp_input would process."""
    return segments(body, conv, CMD_ACK)


def segments(body: bytes | memoryview, conv: int, kind: int, start: int = 0) -> list[tuple[int, int]]:
    """(sn, ts) of the segments with command `kind` that ikcp_input would process."""
    size = len(body)
    off = start
    unpack = _READ.unpack_from
    found: list[tuple[int, int]] = []
    while size - off >= HEADER_LEN:
        seg_conv, cmd, ts, sn, length = unpack(body, off)
        off += HEADER_LEN
        if seg_conv != conv or length > size - off or not CMD_PUSH <= cmd <= CMD_WINS:
            break
        if cmd == kind:
            found.append((sn, ts))
        off += length
    return found


def count_pushes(body: bytes, conv: int) -> int:
    """len(pushes(body, conv)) for ikcp's own output, which is well formed: a body is one data
    segment, or ACKs (24 bytes each, stepped over unread) followed by probes and data segments."""
    size = len(body)
    if size > HEADER_LEN and body[4] == CMD_PUSH and _READ.unpack_from(body, 0)[4] == size - HEADER_LEN:
        return 1
    cmds = body[4::HEADER_LEN]
    leading_acks = len(cmds) - len(cmds.lstrip(_ACK_BYTE))
    return len(pushes(body, conv, leading_acks * HEADER_LEN))


def ack_segment(conv: int, wnd: int, ts: int, sn: int, una: int) -> bytes:
    return SEGMENT.pack(conv, CMD_ACK, 0, wnd & 0xFFFF, ts & MASK32, sn & MASK32, una & MASK32, 0)


def split_resends(body: bytes, conv: int, snd_nxt: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """ikcp's output body without its resends (data segments below `snd_nxt`, the first new one
    before the flush), and the resends as (sn, segment bytes), in order."""
    size = len(body)
    off = 0
    unpack = _READ.unpack_from
    kept: list[bytes] = []
    resends: list[tuple[int, bytes]] = []
    keep_from = 0
    while size - off >= HEADER_LEN:
        seg_conv, cmd, _ts, sn, length = unpack(body, off)
        end = off + HEADER_LEN + length
        if seg_conv != conv or end > size:
            break
        if cmd == CMD_PUSH and (sn - snd_nxt) & MASK32 >= 0x80000000:
            kept.append(body[keep_from:off])
            resends.append((sn, body[off:end]))
            keep_from = end
        off = end
    if not resends:
        return body, resends
    kept.append(body[keep_from:])
    return b"".join(kept), resends


_FIELDS = struct.Struct("<HIII")  # wnd, ts, sn, una: at offset 6 of a segment


def restamp(segment: bytes, wnd: int, ts: int, una: int) -> bytes:
    """`segment` with the window, timestamp and una of a transmission now, the rest unchanged."""
    out = bytearray(segment)
    _wnd, _ts, sn, _una = _FIELDS.unpack_from(out, 6)
    _FIELDS.pack_into(out, 6, wnd & 0xFFFF, ts & MASK32, sn, una & MASK32)
    return bytes(out)
