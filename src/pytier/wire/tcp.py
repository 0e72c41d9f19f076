"""TCP segments (RFC 9293): raw accessors for the per-packet path, and a validated representation.

`TcpRepr` carries the options a TCP endpoint acts on (MSS, window scale, SACK-permitted, SACK
blocks, timestamps) as fields, and any other option raw, so a user-space stack can be built on it.
The accessors read fields straight out of a segment and assume at least `MIN_HEADER_LEN` bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag
from ipaddress import IPv4Address

from pytier.wire import checksum
from pytier.wire.errors import WireError
from pytier.wire.ipv4 import PROTO_TCP

__all__ = [
    "CHECKSUM_OFFSET",
    "DST_PORT_OFFSET",
    "FLAGS_OFFSET",
    "MAX_OPTIONS_LEN",
    "MIN_HEADER_LEN",
    "SRC_PORT_OFFSET",
    "TcpFlags",
    "TcpRepr",
    "dst_port",
    "flags",
    "header_len",
    "src_port",
]

MIN_HEADER_LEN = 20  # bytes
MAX_OPTIONS_LEN = 40  # bytes; the data offset is 4 bits of 32-bit words
SRC_PORT_OFFSET = 0
DST_PORT_OFFSET = 2
FLAGS_OFFSET = 13
CHECKSUM_OFFSET = 16


class TcpFlags(IntFlag):
    FIN = 0x001
    SYN = 0x002
    RST = 0x004
    PSH = 0x008
    ACK = 0x010
    URG = 0x020
    ECE = 0x040
    CWR = 0x080
    AE = 0x100  # accurate ECN (RFC 9768); the bit that was once NS


_OPT_EOL = 0
_OPT_NOP = 1
_OPT_MSS = 2
_OPT_WSCALE = 3
_OPT_SACK_PERMITTED = 4
_OPT_SACK = 5
_OPT_TIMESTAMPS = 8
_KNOWN_OPTIONS = frozenset(
    {_OPT_EOL, _OPT_NOP, _OPT_MSS, _OPT_WSCALE, _OPT_SACK_PERMITTED, _OPT_SACK, _OPT_TIMESTAMPS}
)
_MAX_SACK_BLOCKS = 4  # 2 + 4 * 8 = 34 bytes, the most that fits in 40 bytes of options

# src port, dst port, seq, ack, data offset/reserved/AE, flags, window, checksum, urgent pointer
HEADER = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_U32x2 = struct.Struct("!II")


def src_port(segment: bytes | bytearray | memoryview) -> int:
    return (segment[0] << 8) | segment[1]


def dst_port(segment: bytes | bytearray | memoryview) -> int:
    return (segment[2] << 8) | segment[3]


def flags(segment: bytes | bytearray | memoryview) -> int:
    """The flag bits as a plain int (see TcpFlags), AE included."""
    return ((segment[12] & 1) << 8) | segment[13]


def header_len(segment: bytes | bytearray | memoryview) -> int:
    """Header length in bytes, from the data offset field."""
    return (segment[12] >> 4) << 2


def _addr(a: IPv4Address | bytes) -> bytes:
    return a.packed if isinstance(a, IPv4Address) else a


@dataclass(frozen=True, slots=True)
class TcpRepr:
    """A validated TCP segment.

    `timestamps` is (TSval, TSecr); `sack_ranges` holds (left, right) edges; `other_options` holds
    (kind, data) for every option not given a field, in the order they appeared. NOP and EOL are
    layout, not content, and are not kept.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: TcpFlags
    window: int
    urgent: int = 0
    mss: int | None = None
    window_scale: int | None = None
    sack_permitted: bool = False
    sack_ranges: tuple[tuple[int, int], ...] = ()
    timestamps: tuple[int, int] | None = None
    other_options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""

    @classmethod
    def parse(
        cls,
        ip_src: IPv4Address | bytes,
        ip_dst: IPv4Address | bytes,
        segment: bytes | bytearray | memoryview,
        verify_checksum: bool = True,
    ) -> TcpRepr:
        """Parse `segment` (exactly the IP payload) carried from `ip_src` to `ip_dst`."""
        n = len(segment)
        if n < MIN_HEADER_LEN:
            raise WireError(f"TCP segment of {n} bytes is shorter than a {MIN_HEADER_LEN}-byte header")
        sport, dport, seq, ack, offset, flag_bits, window, _, urgent = HEADER.unpack_from(segment)
        hlen = (offset >> 4) << 2
        if hlen < MIN_HEADER_LEN:
            raise WireError(f"TCP data offset {hlen} is below {MIN_HEADER_LEN}")
        if hlen > n:
            raise WireError(f"TCP header length {hlen} exceeds the {n}-byte segment")
        if sport == 0 or dport == 0:
            raise WireError(f"TCP port 0 in {sport} -> {dport}")
        if verify_checksum:
            pseudo = checksum.pseudo_header_sum(_addr(ip_src), _addr(ip_dst), PROTO_TCP, n)
            if not checksum.verify(segment, pseudo):
                raise WireError("TCP checksum mismatch")
        mss: int | None = None
        wscale: int | None = None
        sack_permitted = False
        sack_ranges: tuple[tuple[int, int], ...] = ()
        timestamps: tuple[int, int] | None = None
        others: list[tuple[int, bytes]] = []
        i = MIN_HEADER_LEN
        while i < hlen:
            kind = segment[i]
            if kind == _OPT_EOL:
                break
            if kind == _OPT_NOP:
                i += 1
                continue
            if i + 1 >= hlen:
                raise WireError(f"TCP option {kind} has no length byte")
            length = segment[i + 1]
            if length < 2 or i + length > hlen:
                raise WireError(f"TCP option {kind} has bad length {length}")
            start = i + 2
            if kind == _OPT_MSS:
                _need(kind, length, 4)
                mss = _U16.unpack_from(segment, start)[0]
            elif kind == _OPT_WSCALE:
                _need(kind, length, 3)
                wscale = segment[start]
            elif kind == _OPT_SACK_PERMITTED:
                _need(kind, length, 2)
                sack_permitted = True
            elif kind == _OPT_SACK:
                if (length - 2) % 8 or length == 2:
                    raise WireError(f"TCP SACK option has bad length {length}")
                sack_ranges = tuple(_U32x2.unpack_from(segment, j) for j in range(start, i + length, 8))
            elif kind == _OPT_TIMESTAMPS:
                _need(kind, length, 10)
                timestamps = _U32x2.unpack_from(segment, start)
            else:
                others.append((kind, bytes(segment[start : i + length])))
            i += length
        return cls(
            src_port=sport,
            dst_port=dport,
            seq=seq,
            ack=ack,
            flags=TcpFlags(((offset & 1) << 8) | flag_bits),
            window=window,
            urgent=urgent,
            mss=mss,
            window_scale=wscale,
            sack_permitted=sack_permitted,
            sack_ranges=sack_ranges,
            timestamps=timestamps,
            other_options=tuple(others),
            payload=bytes(segment[hlen:]),
        )

    def options_bytes(self) -> bytes:
        """The options as laid out on the wire: NOP-aligned, zero-padded to a multiple of 4 bytes."""
        out = bytearray()
        if self.mss is not None:
            out += b"\x02\x04" + _U16.pack(self.mss)
        if self.timestamps is not None:
            out += b"\x04\x02" if self.sack_permitted else b"\x01\x01"
            out += b"\x08\x0a" + _U32x2.pack(*self.timestamps)
        elif self.sack_permitted:
            out += b"\x01\x01\x04\x02"
        if self.window_scale is not None:
            out += b"\x01\x03\x03" + bytes((self.window_scale,))
        if self.sack_ranges:
            if len(self.sack_ranges) > _MAX_SACK_BLOCKS:
                raise ValueError(f"{len(self.sack_ranges)} SACK blocks: at most {_MAX_SACK_BLOCKS} fit")
            out += b"\x01\x01" + bytes((_OPT_SACK, 2 + 8 * len(self.sack_ranges)))
            for left, right in self.sack_ranges:
                out += _U32x2.pack(left, right)
        for kind, data in self.other_options:
            if kind in _KNOWN_OPTIONS or not 0 <= kind <= 255 or len(data) > MAX_OPTIONS_LEN - 2:
                raise ValueError(f"TCP option kind {kind} with {len(data)} bytes cannot be emitted raw")
            out += bytes((kind, 2 + len(data))) + data
        out += bytes(-len(out) & 3)
        if len(out) > MAX_OPTIONS_LEN:
            raise ValueError(f"TCP options need {len(out)} bytes, more than {MAX_OPTIONS_LEN}")
        return bytes(out)

    @property
    def header_len(self) -> int:
        return MIN_HEADER_LEN + len(self.options_bytes())

    def emit(self, ip_src: IPv4Address | bytes, ip_dst: IPv4Address | bytes) -> bytes:
        """The segment with its checksum over the pseudo-header of `ip_src` -> `ip_dst`."""
        options = self.options_bytes()
        hlen = MIN_HEADER_LEN + len(options)
        if self.flags & ~0x1FF:
            raise ValueError(f"TCP flags {self.flags:#x} use reserved bits")
        try:
            out = bytearray(
                HEADER.pack(
                    self.src_port,
                    self.dst_port,
                    self.seq,
                    self.ack,
                    ((hlen >> 2) << 4) | ((self.flags >> 8) & 1),
                    self.flags & 0xFF,
                    self.window,
                    0,
                    self.urgent,
                )
            )
        except struct.error as exc:
            raise ValueError(f"TCP field out of range in {self!r}: {exc}") from exc
        out += options
        out += self.payload
        pseudo = checksum.pseudo_header_sum(_addr(ip_src), _addr(ip_dst), PROTO_TCP, len(out))
        _U16.pack_into(out, CHECKSUM_OFFSET, checksum.checksum(out, pseudo))
        return bytes(out)

    def segment_len(self) -> int:
        """Sequence space this segment occupies: payload bytes, plus one each for SYN and FIN."""
        return len(self.payload) + bool(self.flags & TcpFlags.SYN) + bool(self.flags & TcpFlags.FIN)


def _need(kind: int, length: int, want: int) -> None:
    if length != want:
        raise WireError(f"TCP option {kind} has length {length}, expected {want}")
