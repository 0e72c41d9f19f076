"""TCP over IPv4 segmentation (GSO) and coalescing (GRO) for a TUN device with a virtio header.

`split` turns what the kernel hands over (a header plus a packet that may be a 64 KB TCP
super-segment, or carry a partial checksum) into the ordinary, fully checksummed packets a peer
expects on the wire, cut the way the kernel's own TSO cuts them: the IP id counts up per segment,
every segment repeats the IP and TCP headers and options, the sequence number advances by the
payload, FIN and PSH stay on the last segment only and CWR on the first only.

`coalesce` goes the other way for packets about to be written to the TUN: runs of in-order
segments of one TCP flow become one super-segment, which the kernel delivers to a local socket as
one buffer (or cuts again on its way out when it forwards). It merges only what the kernel's GRO
would merge, and more strictly, so that `split` gives back exactly the packets that went in:
IPv4 without options, ACK with at most PSH and ECE set, contiguous sequence numbers, IP ids
counting up by one, and the same TOS, TTL, DF, ack number, window, urgent pointer and TCP options
(timestamps included) as the run's first packet. All segments but the last carry `gso_size`
payload bytes; a shorter one or one with PSH ends the run. The super-segment's checksum is left
partial (NEEDS_CSUM) for the kernel, so every merged segment's own checksums are verified first:
a damaged one is written alone, for the kernel to drop.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pytier.wire import checksum, ipv4
from pytier.wire.errors import WireError
from pytier.wire.ipv4 import PROTO_TCP
from pytier.wire.virtio import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    NO_OFFLOAD,
    VirtioNetHdr,
    complete_checksum,
)

__all__ = ["MAX_RUN_SEGMENTS", "Vector", "coalesce", "split", "split_tcp4"]

MAX_RUN_SEGMENTS = 64  # segments per super-segment; far below IOV_MAX, and 64 KB caps it first anyway
_MAX_IP_LEN = 0xFFFF

_FIN = 0x01
_PSH = 0x08
_ACK = 0x10
_ECE = 0x40
_CWR = 0x80

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IP_VARYING = struct.Struct("!HH")  # total length, identification
_TCP_VARYING = _U32  # sequence number
_VNET_TCP4 = struct.Struct("=BBHHHH")

_TAKEN = object()
_REFUSED = object()
_DAMAGED = object()

# One packet for the TUN as os.writev takes it: the virtio header, then the packet in pieces.
Vector = list[bytes | bytearray | memoryview]


def split(hdr: VirtioNetHdr, packet: bytes | bytearray | memoryview) -> list[bytes]:
    """The wire packets that one TUN read (`hdr` and the `packet` after it) stands for."""
    gso = hdr.gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if hdr.flags & F_NEEDS_CSUM:
            buf = bytearray(packet)
            complete_checksum(buf, hdr.csum_start, hdr.csum_offset)
            return [bytes(buf)]
        return [bytes(packet)]
    if gso != GSO_TCPV4:
        raise WireError(f"super-segment of GSO type {hdr.gso_type:#x}; only TCPv4 was negotiated")
    return split_tcp4(packet, hdr.gso_size)


def _words(data: bytes, start: int = 0) -> int:
    """A number congruent (mod 0xFFFF) to the sum of the big-endian 16-bit words of `data[start:]`.

    As `checksum.ones_sum`, but the remainder is taken of two half-length numbers added: CPython's
    long division costs per digit, and this halves the digits it divides.
    """
    n = len(data) - start
    mid = start + ((n >> 2) << 1)
    tail = int.from_bytes(data[mid:], "big")
    if n & 1:
        tail <<= 8
    return int.from_bytes(data[start:mid], "big") + tail


def _fold(s: int) -> int:
    """The one's complement checksum of words whose sum is congruent to `s` (not all zero)."""
    return 0xFFFF - (s % 0xFFFF or 0xFFFF)


def split_tcp4(packet: bytes | bytearray | memoryview, mss: int) -> list[bytes]:
    """Cut a TCP/IPv4 super-segment into packets of at most `mss` payload bytes, checksums complete.

    The TCP checksum is computed afresh for every segment: what the kernel left in the field (a
    pseudo-header sum, with or without the length) is never relied on. The headers' own words are
    summed once; each segment adds what changes (lengths, IP id, sequence number, flags).
    """
    ihl = ipv4.check(packet)
    if packet[9] != PROTO_TCP:
        raise WireError(f"TCPv4 super-segment carries IP protocol {packet[9]}")
    if ipv4.is_fragment(packet):
        raise WireError("TCPv4 super-segment is an IP fragment")
    tlen = ipv4.total_len(packet)
    if tlen < ihl + 20:
        raise WireError(f"TCPv4 super-segment of {tlen} bytes has no room for a TCP header")
    thl = (packet[ihl + 12] >> 4) << 2
    hlen = ihl + thl
    if thl < 20 or hlen > tlen:
        raise WireError(f"TCP header length {thl} does not fit a {tlen}-byte super-segment")
    if mss <= 0:
        raise WireError(f"TCPv4 super-segment with gso_size {mss}")
    data = bytes(packet[:tlen])
    ip_h = bytearray(data[:ihl])
    tcp_h = bytearray(data[ihl:hlen])
    n = tlen - hlen
    ident = (ip_h[4] << 8) | ip_h[5]
    seq = _U32.unpack_from(tcp_h, 4)[0]
    flags = tcp_h[13]
    # Header sums without the fields that change per segment (kept zero in these copies).
    ip_h[2:6] = b"\0\0\0\0"
    ip_h[10:12] = b"\0\0"
    ip_base = int.from_bytes(ip_h, "big")
    tcp_h[4:8] = b"\0\0\0\0"
    tcp_h[13] = 0
    tcp_h[16:18] = b"\0\0"
    tcp_base = int.from_bytes(tcp_h, "big") + int.from_bytes(data[12:20], "big") + PROTO_TCP + thl
    count = max(1, -(-n // mss))
    out: list[bytes] = []
    append = out.append
    pack_ip = _IP_VARYING.pack_into
    pack_tcp = _TCP_VARYING.pack_into
    for i in range(count):
        off = hlen + i * mss
        chunk = data[off : off + mss]
        size = len(chunk)
        seg_flags = flags
        if i < count - 1:
            seg_flags &= ~(_FIN | _PSH)
        if i:
            seg_flags &= ~_CWR
        seg_id = (ident + i) & 0xFFFF
        seg_seq = (seq + i * mss) & 0xFFFFFFFF
        ip_check = _fold(ip_base + hlen + size + seg_id)
        tcp_check = _fold(tcp_base + _words(chunk) + size + seg_seq + seg_flags)
        pack_ip(ip_h, 2, hlen + size, seg_id)
        _U16.pack_into(ip_h, 10, ip_check)
        pack_tcp(tcp_h, 4, seg_seq)
        tcp_h[13] = seg_flags
        _U16.pack_into(tcp_h, 16, tcp_check)
        append(b"".join((ip_h, tcp_h, chunk)))
    return out


class _Run:
    """The super-segment being gathered for one flow."""

    __slots__ = ("checked", "closed", "count", "first", "flags", "gso_size", "hlen", "ip_fields", "next_id",
                 "next_seq", "opts", "psh", "tcp_fields", "total", "vector", "window")

    def __init__(self, pkt: bytes, hlen: int, plen: int, flags: int, vector: Vector) -> None:
        self.first = pkt
        self.hlen = hlen
        self.vector = vector
        self.flags = flags
        # What every later segment must repeat: TOS; DF, TTL; ack and data offset; window; urgent
        # pointer and options.
        self.ip_fields = pkt[1], pkt[6:9]
        self.tcp_fields = pkt[28:33]
        self.window = pkt[34:36]
        self.opts = pkt[38:hlen]
        self.gso_size = plen
        self.total = plen
        self.count = 1
        self.next_seq = (_U32.unpack_from(pkt, 24)[0] + plen) & 0xFFFFFFFF
        self.next_id = (((pkt[4] << 8) | pkt[5]) + 1) & 0xFFFF
        self.psh = bool(flags & _PSH)
        self.closed = self.psh
        self.checked = False  # the first packet's checksum, verified once a second one joins

    def take(self, pkt: bytes, plen: int, flags: int, verify: bool) -> object:
        """Append `pkt` if it continues this run: _TAKEN, _REFUSED (it starts a run of its own), or
        _DAMAGED (a bad checksum: it goes out alone and the run ends before it)."""
        if (
            self.closed
            or plen > self.gso_size
            or flags & ~_PSH != self.flags
            or _U32.unpack_from(pkt, 24)[0] != self.next_seq
            or ((pkt[4] << 8) | pkt[5]) != self.next_id
            or self.count >= MAX_RUN_SEGMENTS
            or self.hlen + self.total + plen > _MAX_IP_LEN
            or pkt[28:33] != self.tcp_fields
            or pkt[34:36] != self.window
            or pkt[38 : self.hlen] != self.opts
            or (pkt[1], pkt[6:9]) != self.ip_fields
        ):
            return _REFUSED
        if verify:
            if not self.checked:
                if not _tcp_checksum_ok(self.first):
                    return _REFUSED
                self.checked = True
            if not _tcp_checksum_ok(pkt):
                return _DAMAGED
        self.vector.append(memoryview(pkt)[self.hlen :])
        self.count += 1
        self.total += plen
        self.next_seq = (self.next_seq + plen) & 0xFFFFFFFF
        self.next_id = (self.next_id + 1) & 0xFFFF
        if plen < self.gso_size or flags & _PSH:
            self.psh = bool(flags & _PSH)
            self.closed = True
        return _TAKEN

    def finish(self) -> None:
        """Turn the vector into one super-segment with a partial checksum for the kernel."""
        first, hlen = self.first, self.hlen
        ip_h = bytearray(first[:20])
        tcp_h = bytearray(first[20:hlen])
        _U16.pack_into(ip_h, 2, hlen + self.total)
        ip_h[10] = ip_h[11] = 0
        _U16.pack_into(ip_h, 10, checksum.checksum(ip_h))
        if self.psh:
            tcp_h[13] |= _PSH
        partial = checksum.pseudo_header_sum(first[12:16], first[16:20], PROTO_TCP, hlen - 20 + self.total)
        _U16.pack_into(tcp_h, 16, partial)
        vnet = _VNET_TCP4.pack(F_NEEDS_CSUM, GSO_TCPV4, hlen, self.gso_size, 20, 16)
        self.vector[0:2] = [vnet, ip_h + tcp_h, memoryview(first)[hlen:]]


def _tcp_checksum_ok(pkt: bytes) -> bool:
    """The TCP checksum of an option-less IPv4 packet, pseudo-header included.

    The addresses sit right before the TCP header, so one sum over `pkt[12:]` covers both; the IP
    header's own checksum is left to the kernel, which checks it on the merged packet (every field
    of a merged segment's header is compared with the first's or follows from it).
    """
    return (_words(pkt, 12) + PROTO_TCP + len(pkt) - 20) % 0xFFFF == 0


def coalesce(packets: Sequence[bytes], verify: bool = True) -> list[Vector]:
    """Write vectors for `packets`: merged runs where allowed, every other packet alone.

    Each flow's packets keep their order; packets of different flows may be reordered against
    each other (a run goes out where its first packet was). Without `verify`, merged segments'
    TCP checksums are taken on trust: for packets an AEAD tag has authenticated since the sending
    host's kernel checksummed them, as the kernel's WireGuard marks decrypted packets
    CHECKSUM_UNNECESSARY.
    """
    out: list[Vector] = []
    runs: dict[bytes, _Run] = {}
    merged: list[_Run] = []
    for pkt in packets:
        n = len(pkt)
        if n < 40 or pkt[9] != PROTO_TCP:
            out.append([NO_OFFLOAD, pkt])
            continue
        if pkt[0] != 0x45 or (pkt[2] << 8 | pkt[3]) != n or pkt[6] & 0x3F or pkt[7]:
            # IP options, padding or a fragment: not merged, and a run of its flow must not overtake it.
            if pkt[0] >> 4 == 4 and n >= (pkt[0] & 0x0F) * 4 + 4:
                ihl = (pkt[0] & 0x0F) * 4
                runs.pop(pkt[12:20] + pkt[ihl : ihl + 4], None)
            out.append([NO_OFFLOAD, pkt])
            continue
        key = pkt[12:24]
        hlen = 20 + ((pkt[32] >> 4) << 2)
        plen = n - hlen
        flags = pkt[33]
        if plen <= 0 or hlen < 40 or flags & ~(_PSH | _ECE) != _ACK:
            runs.pop(key, None)
            out.append([NO_OFFLOAD, pkt])
            continue
        run = runs.get(key)
        if run is not None:
            took = run.take(pkt, plen, flags, verify)
            if took is _TAKEN:
                if run.count == 2:
                    merged.append(run)
                continue
            if took is _DAMAGED:
                del runs[key]
                out.append([NO_OFFLOAD, pkt])
                continue
        vector: Vector = [NO_OFFLOAD, pkt]
        out.append(vector)
        runs[key] = _Run(pkt, hlen, plen, flags, vector)
    for run in merged:
        run.finish()
    return out
