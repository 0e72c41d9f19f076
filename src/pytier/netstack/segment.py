"""Building the packets a connection sends.

Every data segment, ACK and RST of a connection comes from a per-connection `SegmentWriter`: one
`struct` call for both headers, with both checksums finished from sums of the fixed fields taken once
per connection, so a segment costs one sum over its payload and one concatenation. The only option
these segments carry is SACK, prebuilt by the caller. SYN and SYN|ACK (with their options) and answers
to packets of unknown connections are rare and go through the validated codecs in `pytier.wire`.
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

    def segment(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | bytearray = b"",
        options: bytes = b"",
    ) -> bytes:
        """One packet; `seq` and `ack` are 32-bit, `flags` the low 8 flag bits, `window` the raw field.

        `options` is laid out already (a multiple of 4 bytes, at most 40).
        """
        n = len(payload)
        olen = len(options)
        tcp_len = 20 + olen + n
        ip_sum = (self._ip_sum + _HEADERS_LEN + olen + n) % 0xFFFF
        offset = (20 + olen) << 2  # data offset in 32-bit words, in the high nibble
        s = (
            self._tcp_sum
            + tcp_len
            + (seq >> 16)
            + (seq & 0xFFFF)
            + (ack >> 16)
            + (ack & 0xFFFF)
            + (offset << 8 | flags)
            + window
        )
        if olen:
            s += int.from_bytes(options, "big")  # an even length: its words line up with the header's
        if n:
            # The payload read as one big-endian number is congruent to the sum of its words mod
            # 0xFFFF (see wire.checksum); an odd tail byte is the high byte of a padded word.
            s += int.from_bytes(payload, "big") << 8 if n & 1 else int.from_bytes(payload, "big")
        s %= 0xFFFF
        # The data are never all zero (the protocol word is not), so a remainder of 0 is a sum of
        # 0xFFFF, whose complement is 0.
        header = _HEADERS.pack(
            0x45,
            0,
            _HEADERS_LEN + olen + n,
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
            offset,
            flags,
            window,
            0xFFFF - s if s else 0,
            0,
        )
        return header + options + payload if olen else header + payload


def emit_packet(src: IPv4Address, dst: IPv4Address, segment: TcpRepr, ttl: int) -> bytes:
    """An IPv4 packet (DF set) around `segment`, through the codecs; for the rare segments with options."""
    body = segment.emit(src, dst)
    return Ipv4Repr(src, dst, PROTO_TCP, len(body), ttl=ttl, dont_fragment=True).emit(body)
