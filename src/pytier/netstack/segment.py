"""Building the packets a connection sends.

Segments without options (every data segment, ACK and RST of a connection) come from a per-connection
`SegmentWriter`: one `struct` call for both headers, with both checksums finished from sums of the fixed
fields taken once per connection, so a segment costs one sum over its payload and one concatenation.
Segments with options (SYN, SYN|ACK) and answers to packets of unknown connections are rare and go
through the validated codecs in `pytier.wire` instead.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from pytier.wire.ipv4 import FLAG_DF, PROTO_TCP, Ipv4Repr
from pytier.wire.tcp import TcpRepr

__all__ = ["SegmentWriter", "emit_packet"]

# IPv4 header without options, then TCP header without options: the layout of `wire.ipv4.HEADER`
# followed by `wire.tcp.HEADER`.
_HEADERS = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_HEADERS_LEN = 40  # bytes
_TCP_OFFSET_WORD = 5 << 12  # data offset of a 20-byte header, as the high bits of the flags word


def _words(addr: bytes) -> int:
    return (addr[0] << 8 | addr[1]) + (addr[2] << 8 | addr[3])


class SegmentWriter:
    """IPv4 + TCP headers from one fixed (src, sport) to one fixed (dst, dport)."""

    __slots__ = ("_dport", "_dst", "_ip_sum", "_sport", "_src", "_tcp_sum", "_ttl")

    def __init__(self, src: bytes, sport: int, dst: bytes, dport: int, ttl: int) -> None:
        self._src = src
        self._dst = dst
        self._sport = sport
        self._dport = dport
        self._ttl = ttl
        # Sums of every word but the variable ones; one's complement addition commutes, so the
        # variable words are added per packet and the total folded once, by `% 0xFFFF`.
        self._ip_sum = 0x4500 + FLAG_DF + ((ttl << 8) | PROTO_TCP) + _words(src) + _words(dst)
        self._tcp_sum = _words(src) + _words(dst) + PROTO_TCP + sport + dport

    def segment(self, seq: int, ack: int, flags: int, window: int, payload: bytes | bytearray = b"") -> bytes:
        """One packet; `seq` and `ack` are 32-bit, `flags` the low 8 flag bits, `window` the raw field."""
        n = len(payload)
        tcp_len = 20 + n
        ip_sum = (self._ip_sum + _HEADERS_LEN + n) % 0xFFFF
        s = (
            self._tcp_sum
            + tcp_len
            + (seq >> 16)
            + (seq & 0xFFFF)
            + (ack >> 16)
            + (ack & 0xFFFF)
            + (_TCP_OFFSET_WORD | flags)
            + window
        )
        if n:
            # The payload read as one big-endian number is congruent to the sum of its words mod
            # 0xFFFF (see wire.checksum); an odd tail byte is the high byte of a padded word.
            s += int.from_bytes(payload, "big") << 8 if n & 1 else int.from_bytes(payload, "big")
        s %= 0xFFFF
        # The data are never all zero (the protocol word is not), so a remainder of 0 is a sum of
        # 0xFFFF, whose complement is 0.
        return (
            _HEADERS.pack(
                0x45,
                0,
                _HEADERS_LEN + n,
                0,
                FLAG_DF,
                self._ttl,
                PROTO_TCP,
                0xFFFF - ip_sum if ip_sum else 0,
                self._src,
                self._dst,
                self._sport,
                self._dport,
                seq,
                ack,
                0x50,
                flags,
                window,
                0xFFFF - s if s else 0,
                0,
            )
            + payload
        )


def emit_packet(src: IPv4Address, dst: IPv4Address, segment: TcpRepr, ttl: int) -> bytes:
    """An IPv4 packet (DF set) around `segment`, through the codecs; for the rare segments with options."""
    body = segment.emit(src, dst)
    return Ipv4Repr(src, dst, PROTO_TCP, len(body), ttl=ttl, dont_fragment=True).emit(body)
