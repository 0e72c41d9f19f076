"""UDP tunnel datagrams and TCP stream framing."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytier.wire.errors import WireError
from pytier.wire.peer_header import pack_header
from pytier.wire.tunnel_frame import (
    MAX_TCP_FRAME_BODY,
    UDP_HEADER_LEN,
    TcpFrameDecoder,
    UdpMsgType,
    encode_tcp_frame,
    is_stun,
    pack_udp,
    parse_udp,
)


def test_udp_syn_matches_doc_example() -> None:
    magic = bytes.fromhex("0807060504030201")
    syn = pack_udp(0xDEADBEEF, UdpMsgType.Syn, magic)
    assert syn == bytes.fromhex("efbeadde 01 00 0800 0807060504030201")
    conn_id, msg_type, body = parse_udp(syn)
    assert (conn_id, msg_type, bytes(body)) == (0xDEADBEEF, UdpMsgType.Syn, magic)


@given(st.integers(0, 2**32 - 1), st.sampled_from(list(UdpMsgType)), st.binary(max_size=1500))
def test_udp_round_trip(conn_id: int, msg_type: int, body: bytes) -> None:
    conn, mtype, got = parse_udp(pack_udp(conn_id, msg_type, body))
    assert (conn, mtype, bytes(got)) == (conn_id, msg_type, body)


def test_udp_length_mismatch_and_short() -> None:
    good = pack_udp(1, UdpMsgType.Data, b"abcd")
    with pytest.raises(WireError):
        parse_udp(good + b"x")
    with pytest.raises(WireError):
        parse_udp(good[:-1])
    with pytest.raises(WireError):
        parse_udp(good[: UDP_HEADER_LEN - 1])
    with pytest.raises(ValueError):
        pack_udp(1, UdpMsgType.Data, bytes(0x10000))


@given(st.binary(max_size=64))
def test_parse_udp_arbitrary_bytes_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        parse_udp(data)


def test_stun_detection() -> None:
    binding = bytes.fromhex("0001 0000 2112a442 deadbeef0102030405060708")
    assert is_stun(binding)
    assert not is_stun(bytes([0x40]) + binding[1:])  # top bits set
    assert not is_stun(binding[:7])
    for msg_type in UdpMsgType:
        assert not is_stun(pack_udp(0x42A41221, msg_type, b"\x00" * 12))


def _packet(payload: bytes) -> bytes:
    return pack_header(1, 2, 1, 0, 1, len(payload)) + payload


def test_tcp_frame_prefix_and_limits() -> None:
    pkt = _packet(b"hi")
    assert encode_tcp_frame(pkt) == (18).to_bytes(4, "little") + pkt
    encode_tcp_frame(b"\x00" * MAX_TCP_FRAME_BODY)
    with pytest.raises(WireError):
        encode_tcp_frame(b"\x00" * (MAX_TCP_FRAME_BODY + 1))
    with pytest.raises(WireError):
        encode_tcp_frame(b"\x00" * 15)


@given(
    st.lists(st.binary(max_size=MAX_TCP_FRAME_BODY - 16), max_size=6),
    st.lists(st.integers(1, 3000), max_size=20),
)
def test_tcp_decoder_any_chunking(payloads: list[bytes], chunk_sizes: list[int]) -> None:
    packets = [_packet(p) for p in payloads]
    stream = b"".join(encode_tcp_frame(p) for p in packets)
    decoder = TcpFrameDecoder()
    got: list[bytes] = []
    pos = 0
    for size in chunk_sizes:
        got += decoder.feed(stream[pos : pos + size])
        pos += size
    got += decoder.feed(stream[pos:])
    assert got == packets
    assert decoder.pending == 0


@pytest.mark.parametrize("length", [0, 15, MAX_TCP_FRAME_BODY + 1, 2**32 - 1])
def test_tcp_decoder_rejects_bad_length_before_body_arrives(length: int) -> None:
    with pytest.raises(WireError):
        TcpFrameDecoder().feed(length.to_bytes(4, "little"))


@given(st.lists(st.binary(max_size=100), max_size=10))
def test_tcp_decoder_arbitrary_bytes_only_wire_error(chunks: list[bytes]) -> None:
    decoder = TcpFrameDecoder()
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert 16 <= len(frame) <= MAX_TCP_FRAME_BODY
    except WireError:
        pass
