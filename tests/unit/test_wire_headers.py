"""The 16-byte peer manager header and the 14-byte KCP proxy header."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytier.wire.errors import WireError
from pytier.wire.kcp_header import KCP_HEADER_LEN, KcpFlag, pack_kcp_header, unpack_kcp_header
from pytier.wire.peer_header import HEADER, HEADER_LEN, HeaderFlags, PacketType, pack_header, unpack_header

u8 = st.integers(0, 255)
u32 = st.integers(0, 2**32 - 1)


def test_packet_type_and_flag_values() -> None:
    # EasyTier 2.6's types, and pytier's own FEC type, which only capable pytier peers receive.
    assert [t.value for t in PacketType] == [*range(22), 200]
    assert PacketType.PytierFec == 200
    assert PacketType.KcpSrc == 11 and PacketType.QuicDst == 17 and PacketType.RelayHandshakeAck == 21
    assert HeaderFlags.ENCRYPTED == 1 and HeaderFlags.COMPRESSED == 0x10
    assert HeaderFlags.NOT_SEND_TO_TUN == 0x40
    assert HEADER.size == HEADER_LEN == 16


def test_header_bytes_match_doc_example() -> None:
    header = pack_header(0x11223344, 0, PacketType.HandShake, 0, 1, 0x37)
    assert header == bytes.fromhex("44332211 00000000 02 00 01 00 37000000")


@given(u32, u32, u8, u8, u8, u32)
def test_header_round_trip(src: int, dst: int, ptype: int, flags: int, fwd: int, length: int) -> None:
    packed = pack_header(src, dst, ptype, flags, fwd, length)
    assert unpack_header(packed) == (src, dst, ptype, flags, fwd, length)
    assert unpack_header(memoryview(packed + b"payload")) == (src, dst, ptype, flags, fwd, length)


def test_header_reserved_byte_is_ignored() -> None:
    raw = bytearray(pack_header(1, 2, 1, 0, 1, 0))
    raw[11] = 0xAA
    assert unpack_header(raw) == (1, 2, 1, 0, 1, 0)


@given(st.binary(max_size=15))
def test_short_header_raises(data: bytes) -> None:
    with pytest.raises(WireError):
        unpack_header(data)


def test_kcp_flags() -> None:
    assert KcpFlag.ACK | KcpFlag.DATA == 0x0A
    assert KcpFlag.PING | KcpFlag.PONG == 0x60
    assert KcpFlag.SYN | KcpFlag.ACK == 0x03


@given(u32, u32, u32, u8)
def test_kcp_header_round_trip(conv: int, src: int, dst: int, flag: int) -> None:
    packed = pack_kcp_header(conv, src, dst, flag)
    assert len(packed) == KCP_HEADER_LEN
    assert packed[13] == 0
    assert unpack_kcp_header(packed + b"body") == (conv, src, dst, flag)


def test_kcp_header_layout() -> None:
    packed = pack_kcp_header(0x01020304, 0xAABBCCDD, 7, KcpFlag.SYN)
    assert packed == bytes.fromhex("04030201 ddccbbaa 07000000 01 00")


@given(st.binary(max_size=13))
def test_short_kcp_header_raises(data: bytes) -> None:
    with pytest.raises(WireError):
        unpack_kcp_header(data)
