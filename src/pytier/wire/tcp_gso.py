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


def split_tcp4(packet: bytes | bytearray | memoryview, mss: int) -> list[bytes]:
    """Cut a TCP/IPv4 super-segment into packets of at most `mss` payload bytes, checksums complete.

    The TCP checksum is computed afresh for every segment: what the kernel left in the field (a
    pseudo-header sum, with or without the length) is never relied on.
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
    view = memoryview(packet)
    payload = view[hlen:tlen]
    n = len(payload)
    ip_h = bytearray(view[:ihl])
    tcp_h = bytearray(view[ihl:hlen])
    src, dst = bytes(ip_h[12:16]), bytes(ip_h[16:20])
    ident = (ip_h[4] << 8) | ip_h[5]
    seq = _U32.unpack_from(tcp_h, 4)[0]
    flags = tcp_h[13]
    count = max(1, -(-n // mss))
    full_pseudo = checksum.pseudo_header_sum(src, dst, PROTO_TCP, thl + mss)
    out: list[bytes] = []
    for i in range(count):
        off = i * mss
        chunk = payload[off : off + mss]
        last = i == count - 1
        seg_flags = flags
        if not last:
            seg_flags &= ~(_FIN | _PSH)
        if i:
            seg_flags &= ~_CWR
        _U16.pack_into(ip_h, 2, hlen + len(chunk))
        _U16.pack_into(ip_h, 4, (ident + i) & 0xFFFF)
        ip_h[10] = ip_h[11] = 0
        _U16.pack_into(ip_h, 10, checksum.checksum(ip_h))
        _U32.pack_into(tcp_h, 4, (seq + off) & 0xFFFFFFFF)
        tcp_h[13] = seg_flags
        tcp_h[16] = tcp_h[17] = 0
        pseudo = full_pseudo if len(chunk) == mss else checksum.pseudo_header_sum(src, dst, PROTO_TCP,
                                                                                  thl + len(chunk))
        _U16.pack_into(tcp_h, 16, checksum.checksum(chunk, checksum.add(pseudo, checksum.ones_sum(tcp_h))))
        out.append(b"".join((ip_h, tcp_h, chunk)))
    return out


class _Run:
    """The super-segment being gathered for one flow."""

    __slots__ = ("checked", "closed", "count", "first", "gso_size", "hlen", "next_id", "next_seq", "psh",
                 "sig", "total", "vector")

    def __init__(self, pkt: bytes | bytearray | memoryview, hlen: int, plen: int, sig: bytes,
                 vector: Vector) -> None:
        self.first = pkt
        self.hlen = hlen
        self.sig = sig
        self.vector = vector
        self.gso_size = plen
        self.total = plen
        self.count = 1
        self.next_seq = (_U32.unpack_from(pkt, 24)[0] + plen) & 0xFFFFFFFF
        self.next_id = (((pkt[4] << 8) | pkt[5]) + 1) & 0xFFFF
        self.psh = bool(pkt[33] & _PSH)
        self.closed = self.psh
        self.checked = False  # the first packet's checksums, verified once a second one joins

    def take(self, pkt: bytes | bytearray | memoryview, plen: int, flags: int, sig: bytes) -> object:
        """Append `pkt` if it continues this run: _TAKEN, _REFUSED (it starts a run of its own), or
        _DAMAGED (a bad checksum: it goes out alone and the run ends before it)."""
        if not (
            not self.closed
            and self.sig == sig
            and flags & ~_PSH == self.first[33]
            and plen <= self.gso_size
            and _U32.unpack_from(pkt, 24)[0] == self.next_seq
            and ((pkt[4] << 8) | pkt[5]) == self.next_id
            and self.hlen + self.total + plen <= _MAX_IP_LEN
            and self.count < MAX_RUN_SEGMENTS
        ):
            return _REFUSED
        if not self.checked:
            if not _segment_ok(self.first):
                return _REFUSED
            self.checked = True
        if not _segment_ok(pkt):
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
        if self.count == 1:
            return
        first, hlen = self.first, self.hlen
        view = memoryview(first)
        ip_h = bytearray(view[:20])
        tcp_h = bytearray(view[20:hlen])
        _U16.pack_into(ip_h, 2, hlen + self.total)
        ip_h[10] = ip_h[11] = 0
        _U16.pack_into(ip_h, 10, checksum.checksum(ip_h))
        if self.psh:
            tcp_h[13] |= _PSH
        partial = checksum.pseudo_header_sum(bytes(ip_h[12:16]), bytes(ip_h[16:20]), PROTO_TCP,
                                             hlen - 20 + self.total)
        _U16.pack_into(tcp_h, 16, partial)
        vnet = _VNET_TCP4.pack(F_NEEDS_CSUM, GSO_TCPV4, hlen, self.gso_size, 20, 16)
        self.vector[0:2] = [vnet, ip_h + tcp_h, view[hlen:]]


def _segment_ok(pkt: bytes | bytearray | memoryview) -> bool:
    """Both checksums of a segment that is about to lose them to a merged, partial checksum."""
    if not checksum.verify(memoryview(pkt)[:20]):
        return False
    pseudo = checksum.pseudo_header_sum(bytes(pkt[12:16]), bytes(pkt[16:20]), PROTO_TCP, len(pkt) - 20)
    return checksum.verify(memoryview(pkt)[20:], pseudo)


def coalesce(packets: Sequence[bytes | bytearray | memoryview]) -> list[Vector]:
    """Write vectors for `packets`: merged runs where allowed, every other packet alone.

    Each flow's packets keep their order; packets of different flows may be reordered against
    each other (a run goes out where its first packet was).
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
                runs.pop(bytes(pkt[12:20]) + bytes(pkt[ihl : ihl + 4]), None)
            out.append([NO_OFFLOAD, pkt])
            continue
        key = bytes(pkt[12:24])
        hlen = 20 + ((pkt[32] >> 4) << 2)
        plen = n - hlen
        flags = pkt[33]
        if plen <= 0 or hlen < 40 or flags & ~(_PSH | _ECE) != _ACK:
            runs.pop(key, None)
            out.append([NO_OFFLOAD, pkt])
            continue
        sig = bytes(pkt[1:2]) + bytes(pkt[6:9]) + bytes(pkt[28:33]) + bytes(pkt[34:36]) + bytes(pkt[38:hlen])
        run = runs.get(key)
        if run is not None:
            took = run.take(pkt, plen, flags, sig)
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
        runs[key] = _Run(pkt, hlen, plen, sig, vector)
    for run in merged:
        run.finish()
    return out
