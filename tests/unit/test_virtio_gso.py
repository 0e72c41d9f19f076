"""The virtio net header codec, and TCP/IPv4 super-segments cut (split) and built (coalesce) by pytier.

Every packet that comes out is checked with the existing codecs (`Ipv4Repr.parse` and
`TcpRepr.parse` verify both checksums), and coalescing then splitting must give back exactly the
packets that went in.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytier.wire import checksum
from pytier.wire.errors import WireError
from pytier.wire.ipv4 import PROTO_TCP, PROTO_UDP, Ipv4Repr
from pytier.wire.tcp import TcpFlags, TcpRepr
from pytier.wire.tcp_gso import MAX_RUN_SEGMENTS, Vector, coalesce, split, split_tcp4
from pytier.wire.virtio import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    HDR_LEN,
    NO_OFFLOAD,
    VirtioNetHdr,
    complete_checksum,
)

A = IPv4Address("10.144.144.1")
B = IPv4Address("10.144.144.2")
C = IPv4Address("10.144.144.3")
ACK, PSH, FIN, CWR, ECE, SYN, URG = (TcpFlags.ACK, TcpFlags.PSH, TcpFlags.FIN, TcpFlags.CWR, TcpFlags.ECE,
                                     TcpFlags.SYN, TcpFlags.URG)


def packet(seq: int, payload: bytes, ident: int, *, flags: TcpFlags = ACK, src: IPv4Address = A,
           dst: IPv4Address = B, sport: int = 40000, dport: int = 5201, ack: int = 777, window: int = 512,
           timestamps: tuple[int, int] | None = (11, 22), ttl: int = 64, ip_options: bytes = b"",
           urgent: int = 0) -> bytes:
    seg = TcpRepr(sport, dport, seq & 0xFFFFFFFF, ack, flags, window, urgent=urgent, timestamps=timestamps,
                  payload=payload).emit(src, dst)
    return Ipv4Repr(src, dst, PROTO_TCP, len(seg), ttl=ttl, ident=ident & 0xFFFF, dont_fragment=True,
                    options=ip_options).emit(seg)


def parsed(pkt: bytes) -> tuple[Ipv4Repr, TcpRepr]:
    """Both headers, both checksums verified."""
    ip = Ipv4Repr.parse(pkt)
    return ip, TcpRepr.parse(ip.src_addr, ip.dst_addr, pkt[ip.header_len : ip.total_len])


def flow(count: int, mss: int, last: int, *, seq: int = 1000, ident: int = 40, psh: bool = False,
         **kw: object) -> list[bytes]:
    """`count` segments of one flow as a sender's kernel cuts them: `mss` bytes each, `last` in the last."""
    out = []
    for i in range(count):
        size = last if i == count - 1 else mss
        flags = ACK | PSH if psh and i == count - 1 else ACK
        out.append(packet(seq + i * mss, bytes((i + j) & 0xFF for j in range(size)), ident + i, flags=flags,
                          **kw))  # type: ignore[arg-type]
    return out


def frame(vector: Vector) -> tuple[VirtioNetHdr, bytes]:
    data = b"".join(vector)
    return VirtioNetHdr.parse(data), data[HDR_LEN:]


def unsplit(vectors: list[Vector]) -> list[bytes]:
    return [p for v in vectors for p in split(*frame(v))]


def super_segment(payload: bytes, *, seq: int = 5000, ident: int = 9, flags: TcpFlags = ACK | PSH,
                  partial: bool = True, **kw: object) -> bytes:
    """A super-segment as the kernel hands it: one IP packet over the whole payload, checksum partial."""
    pkt = bytearray(packet(seq, payload, ident, flags=flags, **kw))  # type: ignore[arg-type]
    if partial:
        ihl = (pkt[0] & 0x0F) * 4
        struct.pack_into("!H", pkt, ihl + 16, checksum.pseudo_header_sum(pkt[12:16], pkt[16:20], PROTO_TCP,
                                                                          len(pkt) - ihl))
    return bytes(pkt)


# ---- the header ----------------------------------------------------------------------------------


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


@given(u8, u8, u16, u16, u16, u16)
def test_header_round_trip(flags: int, gso_type: int, hdr_len: int, gso_size: int, start: int,
                           off: int) -> None:
    hdr = VirtioNetHdr(flags, gso_type, hdr_len, gso_size, start, off)
    data = hdr.emit()
    assert len(data) == HDR_LEN
    assert VirtioNetHdr.parse(data + b"trailing packet") == hdr


def test_header_layout_is_the_host_order_legacy_one() -> None:
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 52, 1300, 20, 16)
    assert hdr.emit() == struct.pack("=BBHHHH", 1, 0x81, 52, 1300, 20, 16)
    assert VirtioNetHdr().emit() == NO_OFFLOAD == bytes(10)


def test_header_errors() -> None:
    with pytest.raises(WireError, match="shorter than 10"):
        VirtioNetHdr.parse(b"\x01" * 9)
    with pytest.raises(ValueError, match="out of range"):
        VirtioNetHdr(gso_size=70000).emit()


@given(st.binary(max_size=80), st.binary(min_size=HDR_LEN, max_size=HDR_LEN))
def test_split_of_garbage_raises_only_wire_errors(data: bytes, hdr: bytes) -> None:
    try:
        out = split(VirtioNetHdr.parse(hdr), data)
    except WireError:
        return
    assert b"".join(out) or not data


# ---- partial checksums -----------------------------------------------------------------------------


def test_partial_tcp_checksum_is_completed() -> None:
    pkt = bytearray(super_segment(b"odd length payload!", flags=ACK))
    assert len(pkt) % 2
    with pytest.raises(WireError, match="checksum"):
        parsed(bytes(pkt))
    out = split(VirtioNetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16), pkt)
    assert len(out) == 1
    _, seg = parsed(out[0])
    assert seg.payload == b"odd length payload!"


def test_partial_checksum_that_sums_to_zero_is_written_as_ffff() -> None:
    payload = bytearray(b"\0\0" + b"dns?" * 5)
    length = 8 + len(payload)
    pseudo = checksum.pseudo_header_sum(A.packed, B.packed, PROTO_UDP, length)
    udp = bytearray(struct.pack("!HHHH", 53, 53, length, pseudo)) + payload
    # Choose the first payload word so that the whole sum is 0xFFFF: the checksum would be 0.
    struct.pack_into("!H", udp, 8, 0xFFFF - checksum.ones_sum(udp))
    assert checksum.checksum(udp) == 0
    pkt = bytearray(Ipv4Repr(A, B, PROTO_UDP, len(udp)).emit(udp))
    complete_checksum(pkt, 20, 6)
    assert pkt[26:28] == b"\xff\xff"
    assert checksum.verify(pkt[20:], checksum.pseudo_header_sum(A.packed, B.packed, PROTO_UDP, length))


def test_partial_checksum_outside_the_packet_is_refused() -> None:
    with pytest.raises(WireError, match="outside"):
        split(VirtioNetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 60), packet(1, b"abc", 1))


def test_whole_packets_pass_unchanged() -> None:
    pkt = packet(1, b"abc", 1)
    assert split(VirtioNetHdr(), pkt) == [pkt]
    assert split(VirtioNetHdr(F_DATA_VALID), pkt) == [pkt]


# ---- split ---------------------------------------------------------------------------------------


def check_split(whole: bytes, mss: int, out: list[bytes]) -> None:
    """What the kernel's TSO would have sent for `whole` (a super-segment whose headers are sound)."""
    ip0 = Ipv4Repr.parse(whole, verify_checksum=False)
    seg0 = TcpRepr.parse(ip0.src_addr, ip0.dst_addr, whole[ip0.header_len : ip0.total_len],
                         verify_checksum=False)
    assert len(out) == max(1, -(-len(seg0.payload) // mss))
    seq = seg0.seq
    for i, pkt in enumerate(out):
        ip, seg = parsed(pkt)
        last = i == len(out) - 1
        assert ip.ident == (ip0.ident + i) & 0xFFFF
        assert (ip.options, ip.ttl, ip.tos, ip.dont_fragment) == (ip0.options, ip0.ttl, ip0.tos,
                                                                  ip0.dont_fragment)
        assert seg.seq == seq
        assert len(seg.payload) == mss or last
        want = seg0.flags
        if not last:
            want &= ~(FIN | PSH)
        if i:
            want &= ~CWR
        assert seg.flags == want
        assert (seg.ack, seg.window, seg.timestamps, seg.sack_ranges, seg.src_port, seg.dst_port) == (
            seg0.ack, seg0.window, seg0.timestamps, seg0.sack_ranges, seg0.src_port, seg0.dst_port)
        seq = (seq + len(seg.payload)) & 0xFFFFFFFF
    assert b"".join(parsed(p)[1].payload for p in out) == seg0.payload


flag_sets = st.sets(st.sampled_from([PSH, FIN, CWR, ECE])).map(lambda fs: sum(fs, ACK))


@settings(max_examples=150)
@given(
    payload=st.binary(max_size=6000),
    mss=st.integers(1, 1500),
    seq=st.integers(0, 0xFFFFFFFF),
    ident=u16,
    flags=flag_sets,
    timestamps=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    ip_options=st.sampled_from([b"", b"\x01" * 4, b"\x01" * 8]),
    partial=st.booleans(),
)
def test_split_cuts_like_the_kernel(payload: bytes, mss: int, seq: int, ident: int, flags: TcpFlags,
                                    timestamps: tuple[int, int] | None, ip_options: bytes,
                                    partial: bool) -> None:
    assume(len(payload) // mss < 600)
    whole = super_segment(payload, seq=seq, ident=ident, flags=flags, timestamps=timestamps,
                          ip_options=ip_options, partial=partial)
    gso = GSO_TCPV4 | (GSO_ECN if flags & CWR else 0)
    hdr = VirtioNetHdr(F_NEEDS_CSUM, gso, len(whole) - len(payload), mss, 20 + len(ip_options), 16)
    check_split(whole, mss, split(hdr, whole))


def test_split_edges() -> None:
    # A payload that is an exact multiple of the MSS leaves no short tail segment.
    whole = super_segment(bytes(3000), flags=ACK | PSH | FIN)
    out = split_tcp4(whole, 1000)
    check_split(whole, 1000, out)
    assert [len(parsed(p)[1].payload) for p in out] == [1000, 1000, 1000]
    assert [parsed(p)[1].flags for p in out] == [ACK, ACK, ACK | PSH | FIN]
    # The IP id and the sequence number wrap.
    whole = super_segment(bytes(2500), seq=0xFFFFFF00, ident=0xFFFF)
    out = split_tcp4(whole, 1000)
    check_split(whole, 1000, out)
    assert [parsed(p)[0].ident for p in out] == [0xFFFF, 0, 1]
    # One segment's worth (or nothing at all) comes out as one packet, its checksum completed.
    for size in (0, 999, 1000):
        whole = super_segment(bytes(size))
        out = split_tcp4(whole, 1000)
        assert len(out) == 1
        check_split(whole, 1000, out)


def test_split_refuses_what_was_not_negotiated_or_does_not_fit() -> None:
    whole = super_segment(bytes(3000))
    with pytest.raises(WireError, match="only TCPv4"):
        split(VirtioNetHdr(F_NEEDS_CSUM, GSO_UDP_L4, 28, 1000, 20, 6), whole)
    with pytest.raises(WireError, match="gso_size 0"):
        split(VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 52, 0, 20, 16), whole)
    udp = Ipv4Repr(A, B, PROTO_UDP, 8).emit(bytes(8))
    with pytest.raises(WireError, match="protocol 17"):
        split_tcp4(udp, 1000)
    with pytest.raises(WireError, match="exceeds"):
        split_tcp4(whole[:-1], 1000)
    frag = bytearray(whole)
    frag[6] |= 0x20
    with pytest.raises(WireError, match="fragment"):
        split_tcp4(bytes(frag), 1000)


# ---- coalesce ------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(
    count=st.integers(1, 80),
    mss=st.integers(1, 1460),
    last=st.integers(1, 1460),
    seq=st.integers(0, 0xFFFFFFFF),
    ident=u16,
    psh=st.booleans(),
    timestamps=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
def test_split_of_coalesce_is_identity(count: int, mss: int, last: int, seq: int, ident: int, psh: bool,
                                       timestamps: tuple[int, int] | None) -> None:
    last = min(last, mss)
    packets = flow(count, mss, last, seq=seq, ident=ident, psh=psh, timestamps=timestamps)
    vectors = coalesce(packets)
    assert unsplit(vectors) == packets
    for vector in vectors:
        hdr, pkt = frame(vector)
        if hdr.gso_type:
            # What the kernel does with the partial checksum must give a valid packet.
            assert (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset) == (F_NEEDS_CSUM, GSO_TCPV4,
                                                                                  20, 16)
            assert hdr.gso_size == mss
            done = bytearray(pkt)
            complete_checksum(done, 20, 16)
            ip, _ = parsed(bytes(done))
            assert ip.total_len == len(pkt) <= 0xFFFF
        else:
            assert hdr == VirtioNetHdr()
    # One run per 64 segments or 64 KB, whichever comes first: nothing is left unmerged needlessly.
    per_run = min(MAX_RUN_SEGMENTS, (0xFFFF - 52) // mss)
    assert len(vectors) == -(-count // max(1, per_run))


@st.composite
def mixed_traffic(draw: st.DrawFn) -> list[bytes]:
    """Packets of three flows interleaved, with every kind of reason not to merge sprinkled in."""
    flows = {key: {"seq": draw(st.integers(0, 0xFFFFFFFF)), "ident": draw(u16)} for key in range(3)}
    out = []
    for _ in range(draw(st.integers(0, 60))):
        key = draw(st.integers(0, 2))
        state = flows[key]
        size = draw(st.sampled_from([500, 500, 500, 500, 200, 0]))
        kw: dict[str, object] = {"src": A, "dst": (B, C, B)[key], "sport": 40000 + (key == 2)}
        flags = ACK
        quirk = draw(st.sampled_from(["none"] * 8 + ["psh", "fin", "syn", "urg", "cwr", "ttl", "window", "ts",
                                                     "gap", "id", "bad", "ipopt", "ack"]))
        if quirk in ("psh", "fin", "syn", "urg", "cwr"):
            flags |= {"psh": PSH, "fin": FIN, "syn": SYN, "urg": URG, "cwr": CWR}[quirk]
        elif quirk == "ttl":
            kw["ttl"] = 3
        elif quirk == "window":
            kw["window"] = 9
        elif quirk == "ts":
            kw["timestamps"] = (12, 22)
        elif quirk == "gap":
            state["seq"] += 1
        elif quirk == "id":
            state["ident"] += 5
        elif quirk == "ipopt":
            kw["ip_options"] = b"\x01" * 4
        elif quirk == "ack":
            kw["ack"] = 778
        pkt = packet(state["seq"], bytes([key]) * size, state["ident"], flags=flags, **kw)  # type: ignore[arg-type]
        if quirk == "bad":
            damaged = bytearray(pkt)
            damaged[-1] ^= 0xFF
            pkt = bytes(damaged)
        out.append(pkt)
        state["seq"] += size
        state["ident"] += 1
    return out


def flow_of(pkt: bytes) -> bytes:
    ihl = (pkt[0] & 0x0F) * 4
    return pkt[12:20] + pkt[ihl : ihl + 4]


@settings(max_examples=200)
@given(mixed_traffic())
def test_coalesce_keeps_every_packet_and_each_flows_order(packets: list[bytes]) -> None:
    out = unsplit(coalesce(packets))
    assert sorted(out) == sorted(packets)
    for key in {flow_of(p) for p in packets}:
        assert [p for p in out if flow_of(p) == key] == [p for p in packets if flow_of(p) == key]


def test_what_the_kernel_would_not_merge_stays_apart() -> None:
    base = flow(3, 1000, 1000)

    def runs(packets: list[bytes]) -> list[int]:
        vectors = coalesce(packets)
        assert unsplit(vectors) == packets
        return [1 if v[0] is NO_OFFLOAD else len(v) - 2 for v in vectors]

    assert runs(base) == [3]
    # A shorter segment ends its run; so does PSH.
    assert runs(flow(2, 1000, 400) + flow(2, 1000, 1000, seq=2400, ident=42)) == [2, 2]
    assert runs(flow(2, 1000, 1000, psh=True) + flow(2, 1000, 1000, seq=3000, ident=42)) == [2, 2]
    # A larger segment than the first cannot follow it.
    assert runs([packet(0, bytes(500), 1), packet(500, bytes(1000), 2)]) == [1, 1]
    # Options that differ (a new timestamp) start a new run.
    assert runs([*base[:2], packet(3000, bytes(1000), 42, timestamps=(12, 22))]) == [2, 1]
    # FIN, SYN, CWR and pure ACKs are written alone, and runs of their flow do not overtake them.
    for flags in (ACK | FIN, ACK | CWR, SYN):
        after = flow(2, 1000, 1000, seq=4000, ident=43)
        assert runs([*base[:2], packet(3000, bytes(1000), 42, flags=flags), *after]) == [2, 1, 2]
    after = flow(2, 1000, 1000, seq=3000, ident=43)
    assert runs([*base[:2], packet(3000, b"", 42), *after]) == [2, 1, 2]
    # A damaged segment goes out alone, for the kernel to drop.
    damaged = bytearray(base[1])
    damaged[60] ^= 1
    assert runs([base[0], bytes(damaged), base[2]]) == [1, 1, 1]
    assert runs([bytes(damaged), *base[1:]]) == [1, 2]
    # Other flows interleaved do not break a run; their packets follow it.
    other = flow(2, 1000, 1000, dst=C)
    vectors = coalesce([base[0], other[0], base[1], other[1], base[2]])
    assert unsplit(vectors) == [*base, *other]
    # Non-TCP packets pass as they are.
    udp = Ipv4Repr(A, B, PROTO_UDP, 8).emit(bytes(8))
    assert coalesce([udp]) == [[NO_OFFLOAD, udp]]


def test_trusted_checksums_are_not_verified() -> None:
    """Over an authenticated tunnel the node trusts what the sender's kernel checksummed, as the
    kernel's WireGuard does: a segment with a wrong checksum is merged like any other."""
    base = flow(3, 1000, 1000)
    damaged = bytearray(base[1])
    damaged[60] ^= 1
    packets = [base[0], bytes(damaged), base[2]]
    assert len(coalesce(packets)) == 3
    vectors = coalesce(packets, verify=False)
    assert len(vectors) == 1
    assert unsplit(vectors)[1][60:] == bytes(damaged)[60:]


@given(st.lists(st.binary(max_size=120) | st.builds(lambda p, cut: p[:cut], st.just(packet(1, bytes(60), 1)),
                                                    st.integers(0, 120)), max_size=8))
def test_coalesce_of_garbage_passes_it_through(packets: list[bytes]) -> None:
    assert sorted(unsplit(coalesce(packets))) == sorted(packets)
