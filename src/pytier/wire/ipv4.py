"""IPv4 headers (RFC 791): raw accessors for the per-packet path, and a validated representation.

The accessors (`version`, `header_len`, `protocol`, ...) read fields straight out of a packet and
assume at least `MIN_HEADER_LEN` bytes; call `check(packet)` (or `Ipv4Repr.parse`) first when the
bytes come from outside. `Ipv4Repr.parse` refuses anything malformed with a `WireError`, so code that
holds a repr never meets a bad header later.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from pytier.wire import checksum
from pytier.wire.errors import WireError

__all__ = [
    "FLAG_DF",
    "FLAG_MF",
    "MAX_OPTIONS_LEN",
    "MIN_HEADER_LEN",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "Ipv4Repr",
    "check",
    "dst_addr",
    "header_len",
    "is_fragment",
    "payload",
    "protocol",
    "src_addr",
    "total_len",
    "version",
]

MIN_HEADER_LEN = 20  # bytes
MAX_OPTIONS_LEN = 40  # bytes; IHL is 4 bits of 32-bit words
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

FLAG_DF = 0x4000
FLAG_MF = 0x2000
_FRAG_OFFSET_MASK = 0x1FFF  # in 8-byte units

# version/IHL, TOS, total length, ident, flags/fragment offset, TTL, protocol, checksum, src, dst
HEADER = struct.Struct("!BBHHHBBH4s4s")
_CHECKSUM_OFFSET = 10
_U16 = struct.Struct("!H")


def version(packet: bytes | bytearray | memoryview) -> int:
    return packet[0] >> 4


def header_len(packet: bytes | bytearray | memoryview) -> int:
    """Header length in bytes, from the IHL field."""
    return (packet[0] & 0x0F) << 2


def total_len(packet: bytes | bytearray | memoryview) -> int:
    return (packet[2] << 8) | packet[3]


def protocol(packet: bytes | bytearray | memoryview) -> int:
    return packet[9]


def src_addr(packet: bytes | bytearray | memoryview) -> bytes:
    """The source address as 4 bytes."""
    return bytes(packet[12:16])


def dst_addr(packet: bytes | bytearray | memoryview) -> bytes:
    """The destination address as 4 bytes."""
    return bytes(packet[16:20])


def is_fragment(packet: bytes | bytearray | memoryview) -> bool:
    """True for any piece of a fragmented datagram: MF set, or a non-zero fragment offset."""
    return bool(((packet[6] << 8) | packet[7]) & (FLAG_MF | _FRAG_OFFSET_MASK))


def check(packet: bytes | bytearray | memoryview) -> int:
    """Cheap structural check of an IPv4 header; return its length in bytes, or raise WireError.

    Checks the version, IHL and total length against the buffer; not the header checksum.
    """
    n = len(packet)
    if n < MIN_HEADER_LEN:
        raise WireError(f"IPv4 packet of {n} bytes is shorter than a {MIN_HEADER_LEN}-byte header")
    if packet[0] >> 4 != 4:
        raise WireError(f"IP version {packet[0] >> 4} is not 4")
    hlen = (packet[0] & 0x0F) << 2
    if hlen < MIN_HEADER_LEN:
        raise WireError(f"IPv4 header length {hlen} is below {MIN_HEADER_LEN}")
    tlen = (packet[2] << 8) | packet[3]
    if tlen < hlen:
        raise WireError(f"IPv4 total length {tlen} is shorter than its header ({hlen})")
    if tlen > n:
        raise WireError(f"IPv4 total length {tlen} exceeds the {n} bytes received")
    return hlen


def payload(packet: bytes | bytearray | memoryview) -> bytes:
    """The payload of a checked packet: after the header, up to the total length (padding dropped)."""
    return bytes(packet[header_len(packet) : total_len(packet)])


@dataclass(frozen=True, slots=True)
class Ipv4Repr:
    """A validated IPv4 header. `frag_offset` is in bytes (a multiple of 8); `options` is raw and padded."""

    src_addr: IPv4Address
    dst_addr: IPv4Address
    protocol: int
    payload_len: int
    ttl: int = 64
    tos: int = 0
    ident: int = 0
    dont_fragment: bool = False
    more_fragments: bool = False
    frag_offset: int = 0
    options: bytes = b""

    @property
    def header_len(self) -> int:
        return MIN_HEADER_LEN + len(self.options)

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len

    @property
    def is_fragment(self) -> bool:
        return self.more_fragments or self.frag_offset != 0

    @classmethod
    def parse(cls, packet: bytes | bytearray | memoryview, *, verify_checksum: bool = True) -> Ipv4Repr:
        """Parse and validate the header at the start of `packet` (trailing padding is allowed)."""
        hlen = check(packet)
        if verify_checksum and not checksum.verify(packet[:hlen]):
            raise WireError("IPv4 header checksum mismatch")
        _, tos, tlen, ident, frag, ttl, proto, _, src, dst = HEADER.unpack_from(packet)
        return cls(
            src_addr=IPv4Address(src),
            dst_addr=IPv4Address(dst),
            protocol=proto,
            payload_len=tlen - hlen,
            ttl=ttl,
            tos=tos,
            ident=ident,
            dont_fragment=bool(frag & FLAG_DF),
            more_fragments=bool(frag & FLAG_MF),
            frag_offset=(frag & _FRAG_OFFSET_MASK) << 3,
            options=bytes(packet[MIN_HEADER_LEN:hlen]),
        )

    def emit(self, payload: bytes | bytearray | memoryview = b"") -> bytes:
        """The header with its checksum, followed by `payload` (whose length should be `payload_len`)."""
        if len(self.options) > MAX_OPTIONS_LEN or len(self.options) & 3:
            raise ValueError(f"IPv4 options of {len(self.options)} bytes: need a multiple of 4, at most 40")
        if self.frag_offset & 7 or not 0 <= self.frag_offset >> 3 <= _FRAG_OFFSET_MASK:
            raise ValueError(f"IPv4 fragment offset {self.frag_offset} is not a multiple of 8 below 65536")
        hlen = self.header_len
        frag = (
            (FLAG_DF if self.dont_fragment else 0)
            | (FLAG_MF if self.more_fragments else 0)
            | (self.frag_offset >> 3)
        )
        try:
            header = bytearray(
                HEADER.pack(
                    0x40 | (hlen >> 2),
                    self.tos,
                    hlen + self.payload_len,
                    self.ident,
                    frag,
                    self.ttl,
                    self.protocol,
                    0,
                    self.src_addr.packed,
                    self.dst_addr.packed,
                )
            )
        except struct.error as exc:
            raise ValueError(f"IPv4 field out of range in {self!r}: {exc}") from exc
        header += self.options
        _U16.pack_into(header, _CHECKSUM_OFFSET, checksum.checksum(header))
        header += payload
        return bytes(header)
