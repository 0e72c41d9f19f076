"""The hand-written proto3 codec: varints, Writer presence rules, iter_fields validation."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytier.wire.errors import WireError
from pytier.wire.protobuf import (
    WT_I32,
    WT_I64,
    WT_LEN,
    WT_VARINT,
    Writer,
    decode_varint,
    encode_varint,
    iter_fields,
    read_bool,
    read_bytes,
    read_int32,
    read_int64,
    read_packed_uint,
    read_string,
    read_uint32,
)


@given(st.integers(0, 2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded, 0) == (value, len(encoded))


def test_varint_known_bytes() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(300) == b"\xac\x02"
    assert encode_varint(0xD1E1A5E1) == bytes.fromhex("e1cb868f0d")


@given(st.integers(-(2**63), -1))
def test_negative_is_ten_byte_twos_complement(value: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == 10
    assert decode_varint(encoded, 0)[0] == value + 2**64


def test_varint_out_of_range_refused_on_encode() -> None:
    with pytest.raises(ValueError):
        encode_varint(2**64)
    with pytest.raises(ValueError):
        encode_varint(-(2**63) - 1)


def test_varint_overflow_and_truncation() -> None:
    with pytest.raises(WireError):
        decode_varint(b"\xff" * 9 + b"\x02", 0)
    with pytest.raises(WireError):
        decode_varint(b"\xff" * 11, 0)
    with pytest.raises(WireError):
        decode_varint(b"\x80", 0)
    assert decode_varint(b"\xff" * 9 + b"\x01", 0) == (2**64 - 1, 10)


def test_defaults_skipped_but_optional_zero_written() -> None:
    w = Writer()
    w.uint(1, 0)
    w.int64(2, 0)
    w.bool(3, False)
    w.string(4, "")
    w.bytes_(5, b"")
    assert w.getvalue() == b""
    w.optional_uint(1, 0)
    w.optional_enum(3, 0)
    w.optional_string(6, "")
    w.optional_bool(7, False)
    w.optional_uint(8, None)
    assert w.getvalue() == bytes.fromhex("0800 1800 3200 3800")


def test_empty_message_and_repeated_empty_string_are_written() -> None:
    w = Writer()
    w.message(1, b"")
    w.repeated_string(2, ["", "a"])
    assert bytes(w) == bytes.fromhex("0a00 1200 120161")


def test_writer_refuses_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        Writer().uint32(1, 2**32)
    with pytest.raises(ValueError):
        Writer().int32(1, 2**31)
    with pytest.raises(ValueError):
        Writer().uint(0, 1)


def test_iter_fields_all_wire_types() -> None:
    w = Writer()
    w.uint(1, 150)
    w.fixed64(2, 0x0102030405060708)
    w.string(3, "hi")
    w.fixed32(4, 0xDEADBEEF)
    fields = list(iter_fields(w.getvalue()))
    assert fields == [
        (1, WT_VARINT, 150),
        (2, WT_I64, 0x0102030405060708),
        (3, WT_LEN, b"hi"),
        (4, WT_I32, 0xDEADBEEF),
    ]


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("0b"),  # wire type 3 (start group)
        bytes.fromhex("0c"),  # wire type 4 (end group)
        bytes.fromhex("0e00"),  # wire type 6
        bytes.fromhex("0f00"),  # wire type 7
        bytes.fromhex("0001"),  # field number 0
        bytes.fromhex("0a05616263"),  # length past the end
        bytes.fromhex("0a"),  # missing length
        bytes.fromhex("09010203"),  # truncated fixed64
        bytes.fromhex("0d0102"),  # truncated fixed32
        bytes.fromhex("08"),  # missing varint value
    ],
)
def test_iter_fields_rejects_malformed(data: bytes) -> None:
    with pytest.raises(WireError):
        list(iter_fields(data))


def test_readers_check_wire_type_and_convert() -> None:
    with pytest.raises(WireError):
        read_uint32(WT_LEN, b"x")
    with pytest.raises(WireError):
        read_bytes(WT_VARINT, 1)
    with pytest.raises(WireError):
        read_string(WT_LEN, b"\xff")
    assert read_uint32(WT_VARINT, 2**32 + 5) == 5
    assert read_int32(WT_VARINT, 2**64 - 1) == -1
    assert read_int64(WT_VARINT, 2**64 - 2) == -2
    assert read_bool(WT_VARINT, 2) is True
    assert read_packed_uint(WT_VARINT, 7) == [7]
    assert read_packed_uint(WT_LEN, bytes.fromhex("01ac02")) == [1, 300]
    with pytest.raises(WireError):
        read_packed_uint(WT_LEN, b"\x80")


@given(st.binary(max_size=200))
def test_iter_fields_arbitrary_bytes_only_wire_error(data: bytes) -> None:
    try:
        for _ in iter_fields(data):
            pass
    except WireError:
        pass


@given(
    st.lists(
        st.tuples(st.integers(1, 2**29 - 1), st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=20))),
        max_size=10,
    )
)
def test_writer_iter_fields_round_trip(items: list[tuple[int, int | bytes]]) -> None:
    w = Writer()
    expected: list[tuple[int, int, int | bytes]] = []
    for number, value in items:
        if isinstance(value, int):
            w.optional_uint(number, value)
            expected.append((number, WT_VARINT, value))
        else:
            w.message(number, value)
            expected.append((number, WT_LEN, value))
    assert list(iter_fields(w.getvalue())) == expected
