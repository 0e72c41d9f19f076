"""The transport-parameter codec of the null-crypto handshake."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytier.transport import quic_params as qp
from pytier.transport.quic_params import TransportParams
from pytier.wire.errors import WireError


def test_varint_sizes() -> None:
    assert qp.encode_varint(37) == b"\x25"
    assert qp.encode_varint(15293) == bytes.fromhex("7bbd")
    assert qp.encode_varint(494878333) == bytes.fromhex("9d7f3e7d")
    assert qp.encode_varint(151288809941952652) == bytes.fromhex("c2197c5eff14e88c")
    for value in (0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, qp.VARINT_MAX):
        assert qp.decode_varint(qp.encode_varint(value), 0) == (value, len(qp.encode_varint(value)))
    with pytest.raises(ValueError):
        qp.encode_varint(qp.VARINT_MAX + 1)


def test_what_the_real_node_sends_decodes() -> None:
    # The set §7.2 lists, with a greased reserved id (31 * N + 27) and min_ack_delay.
    real = TransportParams(
        max_idle_timeout_ms=30000, max_udp_payload_size=1200, initial_max_data=qp.VARINT_MAX,
        initial_max_stream_data_bidi_local=1250000, initial_max_stream_data_bidi_remote=1250000,
        initial_max_stream_data_uni=1250000, initial_max_streams_bidi=255, initial_max_streams_uni=0,
        active_connection_id_limit=5, max_datagram_frame_size=65535, min_ack_delay_us=1000,
        grease_quic_bit=True, initial_source_connection_id=bytes(8),
        unknown=((31 * 7 + 27, b"\x01\x02\x03"),),
    )
    wire = real.encode()
    back = TransportParams.decode(wire)
    assert back == real
    assert back.grease_quic_bit and back.min_ack_delay_us == 1000
    assert bytes.fromhex("c0000000ff04de1b0243e8") in wire  # min_ack_delay: 8-byte id (>= 2^30), 1000
    assert bytes.fromhex("6ab200") in wire  # grease_quic_bit: empty


def test_flags_are_empty_and_absent_fields_are_not_sent() -> None:
    assert TransportParams().encode() == b""
    assert TransportParams(disable_active_migration=True).encode() == b"\x0c\x00"


@pytest.mark.parametrize(("data", "why"), [
    (b"\x01", "truncated"),
    (b"\x01\x04\x00", "past the end"),
    (b"\x01\x01\x05\x01\x01\x05", "twice"),
    (b"\x01\x02\x05\x00", "varint"),
    (b"\x0c\x01\x00", "empty"),
])
def test_malformed_lists_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        TransportParams.decode(data)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_wire_error(data: bytes) -> None:
    try:
        params = TransportParams.decode(data)
    except WireError:
        return
    # What decodes re-encodes to something that decodes to the same.
    assert TransportParams.decode(params.encode()) == params
