"""Internet checksum, IPv4 and TCP codecs, checked against hand-built packets and a word-by-word sum."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pytier.wire import checksum, ipv4, tcp
from pytier.wire.errors import WireError
from pytier.wire.ipv4 import Ipv4Repr
from pytier.wire.tcp import TcpFlags, TcpRepr

SRC = IPv4Address("10.144.144.1")
DST = IPv4Address("10.144.144.2")


def ref_sum(data: bytes) -> int:
    """RFC 1071 the slow way: add 16-bit words, fold carries back in."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def pseudo(src: IPv4Address, dst: IPv4Address, length: int) -> bytes:
    return src.packed + dst.packed + struct.pack("!BBH", 0, 6, length)


def ip_header(
    src: IPv4Address,
    dst: IPv4Address,
    payload_len: int,
    *,
    proto: int = 6,
    frag: int = 0x4000,
    options: bytes = b"",
    ttl: int = 64,
    ident: int = 0x1234,
) -> bytes:
    hlen = 20 + len(options)
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | hlen // 4,
            0,
            hlen + payload_len,
            ident,
            frag,
            ttl,
            proto,
            0,
            src.packed,
            dst.packed,
        )
        + options
    )
    return hdr[:10] + struct.pack("!H", ref_checksum(hdr)) + hdr[12:]


def tcp_segment(
    src: IPv4Address,
    dst: IPv4Address,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
    urgent: int = 0,
) -> bytes:
    hlen = 20 + len(options)
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (hlen // 4) << 4, flags, window, 0, urgent)
    seg += options + payload
    check = ref_checksum(pseudo(src, dst, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", check) + seg[18:]


# A Linux-style SYN's options: MSS 1460, SACK-permitted, timestamps, NOP, window scale 7.
LINUX_SYN_OPTIONS = bytes.fromhex("020405b40402080a0001e2400000000001030307")


# ---------------------------------------------------------------- checksum


def test_rfc1071_example() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum.ones_sum(data) == 0xDDF2
    assert checksum.checksum(data) == 0x220D


def test_known_ipv4_header_checksum() -> None:
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum.checksum(header) == 0xB861
    assert checksum.verify(header[:10] + b"\xb8\x61" + header[12:])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0",
        b"\0\0\0\0",
        b"\xff\xff",
        b"\xff\xff\xff\xff",
        b"\xff",
        b"\x00\x01\xff\xfe",
        b"\x80\x00\x80\x00",
    ],
)
def test_ones_sum_edges(data: bytes) -> None:
    assert checksum.ones_sum(data) == ref_sum(data)


@given(st.binary(max_size=3000))
def test_ones_sum_matches_word_by_word(data: bytes) -> None:
    assert checksum.ones_sum(data) == ref_sum(data)
    assert checksum.checksum(data) == ref_checksum(data)


@given(
    st.binary(max_size=200),
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
)
def test_checksum_with_pseudo_header(data: bytes, src: bytes, dst: bytes, proto: int, length: int) -> None:
    header = src + dst + struct.pack("!BBH", 0, proto, length)
    assert checksum.pseudo_header_sum(src, dst, proto, length) == ref_sum(header)
    initial = checksum.pseudo_header_sum(src, dst, proto, length)
    assert checksum.checksum(data, initial) == ref_checksum(header + data)


@given(st.binary(min_size=2, max_size=100).filter(lambda b: any(b)), st.data())
def test_verify_accepts_its_own_checksum(data: bytes, draw: st.DataObject) -> None:
    data = data + b"\0" * (len(data) % 2)
    pos = draw.draw(st.integers(0, len(data) // 2 - 1)) * 2
    zeroed = data[:pos] + b"\0\0" + data[pos + 2 :]
    filled = zeroed[:pos] + struct.pack("!H", checksum.checksum(zeroed)) + zeroed[pos + 2 :]
    assert checksum.verify(filled)


@given(st.binary(min_size=8, max_size=200), st.data())
def test_incremental_update_equals_recompute(data: bytes, draw: st.DataObject) -> None:
    """RFC 1624 eqn. 3 gives exactly what a full recomputation gives, 0x0000/0xFFFF included."""
    data = data + b"\0" * (len(data) % 2)
    words = len(data) // 2
    check_pos = draw.draw(st.integers(0, words - 1)) * 2
    data = data[:check_pos] + b"\0\0" + data[check_pos + 2 :]
    assume(any(data))
    check = checksum.checksum(data)
    field = draw.draw(st.integers(0, words - 1).filter(lambda w: w * 2 != check_pos)) * 2
    old = struct.unpack_from("!H", data, field)[0]
    new = draw.draw(st.integers(0, 0xFFFF))
    changed = data[:field] + struct.pack("!H", new) + data[field + 2 :]
    assume(any(changed))
    assert checksum.update16(check, old, new) == checksum.checksum(changed)


@given(st.binary(min_size=12, max_size=200), st.data())
def test_incremental_update32_equals_recompute(data: bytes, draw: st.DataObject) -> None:
    data = data[: len(data) - len(data) % 4]
    data = b"\0\0" + data[2:]  # the checksum field is the first word
    assume(any(data))
    check = checksum.checksum(data)
    field = draw.draw(st.integers(1, len(data) // 4 - 1)) * 4
    old = struct.unpack_from("!I", data, field)[0]
    new = draw.draw(st.integers(0, 0xFFFFFFFF))
    changed = data[:field] + struct.pack("!I", new) + data[field + 4 :]
    assume(any(changed))
    assert checksum.update32(check, old, new) == checksum.checksum(changed)
    delta = checksum.delta32(old, new)
    assert checksum.apply_delta(check, delta) == checksum.checksum(changed)


# ---------------------------------------------------------------- IPv4


def test_ipv4_parse_hand_built() -> None:
    packet = ip_header(SRC, DST, 4, proto=17, ttl=33) + b"abcd"
    repr_ = Ipv4Repr.parse(packet)
    assert repr_ == Ipv4Repr(
        src_addr=SRC, dst_addr=DST, protocol=17, payload_len=4, ttl=33, ident=0x1234, dont_fragment=True
    )
    assert repr_.header_len == 20 and repr_.total_len == 24 and not repr_.is_fragment
    assert repr_.emit(b"abcd") == packet


def test_ipv4_accessors() -> None:
    packet = ip_header(SRC, DST, 3, proto=6, options=b"\x01\x01\x01\x00") + b"xyz"
    assert ipv4.check(packet) == 24
    assert ipv4.version(packet) == 4
    assert ipv4.header_len(packet) == 24
    assert ipv4.total_len(packet) == 27
    assert ipv4.protocol(packet) == ipv4.PROTO_TCP
    assert ipv4.src_addr(packet) == SRC.packed
    assert ipv4.dst_addr(packet) == DST.packed
    assert not ipv4.is_fragment(packet)
    assert ipv4.payload(packet + b"\0\0") == b"xyz"
    repr_ = Ipv4Repr.parse(packet + b"\0\0")  # trailing link-layer padding is not payload
    assert repr_.options == b"\x01\x01\x01\x00" and repr_.payload_len == 3


def test_ipv4_fragments_are_flagged() -> None:
    more = ip_header(SRC, DST, 8, frag=0x2000) + bytes(8)
    assert ipv4.is_fragment(more)
    r = Ipv4Repr.parse(more)
    assert r.more_fragments and r.frag_offset == 0 and r.is_fragment
    last = ip_header(SRC, DST, 8, frag=0x0003) + bytes(8)
    assert ipv4.is_fragment(last)
    r = Ipv4Repr.parse(last)
    assert not r.more_fragments and r.frag_offset == 24 and r.is_fragment and not r.dont_fragment


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p[:19], "shorter"),
        (lambda p: b"\x65" + p[1:], "version"),
        (lambda p: b"\x44" + p[1:], "header length"),
        (lambda p: p[:2] + struct.pack("!H", 100) + p[4:], "exceeds"),
        (lambda p: p[:2] + struct.pack("!H", 19) + p[4:], "shorter than its header"),
        (lambda p: b"\x47" + p[1:], "shorter than its header"),
        (lambda p: p[:8] + b"\x41" + p[9:], "checksum"),
    ],
)
def test_ipv4_malformed(mutate: object, message: str) -> None:
    packet = ip_header(SRC, DST, 4) + b"abcd"
    bad = mutate(packet)  # type: ignore[operator]
    with pytest.raises(WireError, match=message):
        Ipv4Repr.parse(bad)


def test_ipv4_checksum_check_is_optional() -> None:
    packet = bytearray(ip_header(SRC, DST, 0))
    packet[10] ^= 0xFF
    assert Ipv4Repr.parse(bytes(packet), verify_checksum=False).src_addr == SRC


def test_ipv4_emit_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="options"):
        Ipv4Repr(SRC, DST, 6, 0, options=b"\x01").emit()
    with pytest.raises(ValueError, match="fragment offset"):
        Ipv4Repr(SRC, DST, 6, 0, frag_offset=3).emit()
    with pytest.raises(ValueError, match="out of range"):
        Ipv4Repr(SRC, DST, 6, 0, ttl=256).emit()


addresses = st.builds(IPv4Address, st.integers(0, 0xFFFFFFFF))
ipv4_reprs = st.builds(
    Ipv4Repr,
    src_addr=addresses,
    dst_addr=addresses,
    protocol=st.integers(0, 255),
    payload_len=st.integers(0, 65535 - 60),
    ttl=st.integers(0, 255),
    tos=st.integers(0, 255),
    ident=st.integers(0, 0xFFFF),
    dont_fragment=st.booleans(),
    more_fragments=st.booleans(),
    frag_offset=st.integers(0, 0x1FFF).map(lambda x: x * 8),
    options=st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
)


@given(ipv4_reprs)
def test_ipv4_round_trip(repr_: Ipv4Repr) -> None:
    payload = bytes(repr_.payload_len)
    packet = repr_.emit(payload)
    assert len(packet) == repr_.total_len
    assert ref_sum(packet[: repr_.header_len]) == 0xFFFF
    assert Ipv4Repr.parse(packet) == repr_


@given(st.binary(max_size=100))
def test_ipv4_arbitrary_bytes_only_raise_wire_error(data: bytes) -> None:
    for verify in (True, False):
        with contextlib.suppress(WireError):
            Ipv4Repr.parse(data, verify_checksum=verify)


@given(st.binary(min_size=20, max_size=80))
def test_ipv4_arbitrary_header_with_good_checksum(data: bytes) -> None:
    """Past the checksum, the structural checks alone must refuse everything malformed."""
    data = b"\x45" + data[1:10] + b"\0\0" + data[12:]
    data = data[:10] + struct.pack("!H", ref_checksum(data[:20])) + data[12:]
    try:
        repr_ = Ipv4Repr.parse(data)
    except WireError:
        return
    assert repr_.total_len <= len(data)


# ---------------------------------------------------------------- TCP


def test_tcp_parse_linux_syn() -> None:
    seg = tcp_segment(SRC, DST, 40000, 80, 0x01020304, 0, 0x02, 64240, LINUX_SYN_OPTIONS)
    r = TcpRepr.parse(SRC, DST, seg)
    assert r == TcpRepr(
        src_port=40000,
        dst_port=80,
        seq=0x01020304,
        ack=0,
        flags=TcpFlags.SYN,
        window=64240,
        mss=1460,
        window_scale=7,
        sack_permitted=True,
        timestamps=(123456, 0),
    )
    assert r.segment_len() == 1
    assert tcp.src_port(seg) == 40000 and tcp.dst_port(seg) == 80
    assert tcp.flags(seg) == TcpFlags.SYN and tcp.header_len(seg) == 40
    # Our layout differs from Linux's (window scale NOP-aligned elsewhere) but must mean the same.
    again = r.emit(SRC, DST)
    assert ref_sum(pseudo(SRC, DST, len(again)) + again) == 0xFFFF
    assert TcpRepr.parse(SRC.packed, DST.packed, again) == r


def test_tcp_data_fin_rst() -> None:
    data = tcp_segment(SRC, DST, 40000, 80, 1001, 2002, 0x18, 502, payload=b"hello, world")
    r = TcpRepr.parse(SRC, DST, data)
    assert r.flags == TcpFlags.PSH | TcpFlags.ACK and r.payload == b"hello, world" and r.ack == 2002
    assert r.segment_len() == 12
    assert r.emit(SRC, DST) == data

    fin = tcp_segment(SRC, DST, 40000, 80, 1013, 2002, 0x11)
    r = TcpRepr.parse(SRC, DST, fin)
    assert r.flags == TcpFlags.FIN | TcpFlags.ACK and r.segment_len() == 1
    assert r.emit(SRC, DST) == fin

    rst = tcp_segment(DST, SRC, 80, 40000, 2002, 0, 0x04, 0)
    r = TcpRepr.parse(DST, SRC, rst)
    assert r.flags == TcpFlags.RST and r.window == 0
    assert r.emit(DST, SRC) == rst


def test_tcp_all_flags_and_urgent() -> None:
    seg = bytearray(tcp_segment(SRC, DST, 1, 2, 3, 4, 0xFF, urgent=7, payload=b"!"))
    seg[12] |= 0x01  # AE
    seg[16:18] = b"\0\0"
    seg[16:18] = struct.pack("!H", ref_checksum(pseudo(SRC, DST, len(seg)) + bytes(seg)))
    r = TcpRepr.parse(SRC, DST, bytes(seg))
    assert r.flags == TcpFlags(0x1FF) and r.urgent == 7
    assert tcp.flags(seg) == 0x1FF
    assert r.emit(SRC, DST) == bytes(seg)


def test_tcp_sack_and_unknown_options() -> None:
    options = bytes.fromhex("0101050a00000064000000c8") + bytes.fromhex("1e0401020000")
    options += bytes(-len(options) % 4)
    seg = tcp_segment(SRC, DST, 5000, 6000, 1, 2, 0x10, options=options)
    r = TcpRepr.parse(SRC, DST, seg)
    assert r.sack_ranges == ((100, 200),)
    assert r.other_options == ((30, b"\x01\x02"),)
    assert TcpRepr.parse(SRC, DST, r.emit(SRC, DST)) == r


def test_tcp_checksum_mismatch_and_optional_check() -> None:
    seg = bytearray(tcp_segment(SRC, DST, 1, 2, 3, 4, 0x10, payload=b"data"))
    seg[-1] ^= 1
    with pytest.raises(WireError, match="checksum"):
        TcpRepr.parse(SRC, DST, bytes(seg))
    with pytest.raises(WireError, match="checksum"):  # the pseudo-header counts
        TcpRepr.parse(SRC, IPv4Address("10.144.144.3"), tcp_segment(SRC, DST, 1, 2, 3, 4, 0x10))
    assert TcpRepr.parse(SRC, DST, bytes(seg), verify_checksum=False).payload == b"dat`"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (bytes.fromhex("02030000"), "length 3, expected 4"),
        (bytes.fromhex("03020000"), "length 2, expected 3"),
        (bytes.fromhex("04030000"), "length 3, expected 2"),
        (bytes.fromhex("080a0000"), "bad length 10"),
        (bytes.fromhex("08040000"), "length 4, expected 10"),
        (bytes.fromhex("05020000"), "SACK option has bad length 2"),
        (bytes.fromhex("0506000000000000"), "SACK option has bad length 6"),
        (bytes.fromhex("01010102"), "no length byte"),
        (bytes.fromhex("1e010000"), "bad length 1"),
    ],
)
def test_tcp_bad_options(options: bytes, message: str) -> None:
    seg = tcp_segment(SRC, DST, 1, 2, 3, 4, 0x02, options=options)
    with pytest.raises(WireError, match=message):
        TcpRepr.parse(SRC, DST, seg)


def test_tcp_options_stop_at_end_of_list() -> None:
    seg = tcp_segment(SRC, DST, 1, 2, 3, 4, 0x02, options=bytes.fromhex("00ffffff"))
    assert TcpRepr.parse(SRC, DST, seg).other_options == ()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[:19], "shorter"),
        (lambda s: s[:12] + b"\x40" + s[13:], "data offset 16"),
        (lambda s: s[:12] + b"\x60" + s[13:], "exceeds"),
        (lambda s: b"\0\0" + s[2:], "port 0"),
        (lambda s: s[:2] + b"\0\0" + s[4:], "port 0"),
    ],
)
def test_tcp_malformed(mutate: object, message: str) -> None:
    seg = tcp_segment(SRC, DST, 1, 2, 3, 4, 0x10)
    with pytest.raises(WireError, match=message):
        TcpRepr.parse(SRC, DST, mutate(seg), verify_checksum=False)  # type: ignore[operator]


def test_tcp_emit_rejects_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="more than 40"):
        TcpRepr(1, 2, 3, 4, TcpFlags.ACK, 5, mss=1460, timestamps=(1, 2), sack_ranges=((1, 2),) * 3).emit(
            SRC, DST
        )
    with pytest.raises(ValueError, match="at most 4"):
        TcpRepr(1, 2, 3, 4, TcpFlags.ACK, 5, sack_ranges=((1, 2),) * 5).emit(SRC, DST)
    with pytest.raises(ValueError, match="cannot be emitted raw"):
        TcpRepr(1, 2, 3, 4, TcpFlags.ACK, 5, other_options=((2, b"\x05\xb4"),)).emit(SRC, DST)
    with pytest.raises(ValueError, match="out of range"):
        TcpRepr(1, 2, 1 << 32, 4, TcpFlags.ACK, 5).emit(SRC, DST)
    with pytest.raises(ValueError, match="reserved"):
        TcpRepr(1, 2, 3, 4, TcpFlags(0x1FF) | 0x200, 5).emit(SRC, DST)


u32 = st.integers(0, 0xFFFFFFFF)
_unknown_kinds = st.integers(6, 255).filter(lambda k: k != 8)


@st.composite
def tcp_reprs(draw: st.DrawFn) -> TcpRepr:
    """TcpReprs whose options fit in 40 bytes."""
    while True:
        r = TcpRepr(
            src_port=draw(st.integers(1, 65535)),
            dst_port=draw(st.integers(1, 65535)),
            seq=draw(u32),
            ack=draw(u32),
            flags=TcpFlags(draw(st.integers(0, 0x1FF))),
            window=draw(st.integers(0, 0xFFFF)),
            urgent=draw(st.integers(0, 0xFFFF)),
            mss=draw(st.none() | st.integers(0, 0xFFFF)),
            window_scale=draw(st.none() | st.integers(0, 255)),
            sack_permitted=draw(st.booleans()),
            sack_ranges=tuple(draw(st.lists(st.tuples(u32, u32), max_size=4))),
            timestamps=draw(st.none() | st.tuples(u32, u32)),
            other_options=tuple(
                draw(st.lists(st.tuples(_unknown_kinds, st.binary(max_size=12)), max_size=3))
            ),
            payload=draw(st.binary(max_size=64)),
        )
        try:
            r.options_bytes()
        except ValueError:
            continue
        return r


@given(tcp_reprs(), addresses, addresses)
def test_tcp_round_trip(r: TcpRepr, src: IPv4Address, dst: IPv4Address) -> None:
    seg = r.emit(src, dst)
    assert len(seg) == r.header_len + len(r.payload)
    assert ref_sum(pseudo(src, dst, len(seg)) + seg) == 0xFFFF
    assert TcpRepr.parse(src, dst, seg) == r


@given(st.binary(max_size=120))
def test_tcp_arbitrary_bytes_only_raise_wire_error(data: bytes) -> None:
    for verify in (True, False):
        with contextlib.suppress(WireError):
            TcpRepr.parse(SRC, DST, data, verify_checksum=verify)


@given(st.binary(min_size=0, max_size=40), st.binary(max_size=20))
def test_tcp_arbitrary_options_only_raise_wire_error(options: bytes, payload: bytes) -> None:
    options = options[: len(options) - len(options) % 4]
    seg = tcp_segment(SRC, DST, 1, 2, 3, 4, 0x02, options=options, payload=payload)
    try:
        r = TcpRepr.parse(SRC, DST, seg)
    except WireError:
        return
    assert r.payload == payload


def test_views_and_bytearrays_parse_like_bytes() -> None:
    seg = tcp_segment(SRC, DST, 40000, 80, 7, 8, 0x18, options=LINUX_SYN_OPTIONS, payload=b"payload")
    packet = ip_header(SRC, DST, len(seg)) + seg
    for buf in (bytearray(packet), memoryview(packet)):
        ip = Ipv4Repr.parse(buf)
        assert ip == Ipv4Repr.parse(packet)
        assert TcpRepr.parse(ip.src_addr, ip.dst_addr, buf[ip.header_len : ip.total_len]) == TcpRepr.parse(
            SRC, DST, seg
        )
