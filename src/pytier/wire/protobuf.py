"""A small hand-written proto3 codec: just what EasyTier's messages need, no generated code.

`Writer` emits fields in the order they are written. Plain proto3 scalars are skipped when they
hold their default value; the `optional_*` methods write any value that is not None, because
proto3 `optional` presence is meaningful to the receiver (a present 0 is not an absent field).
`iter_fields` walks an encoded message and validates it; the `read_*` helpers check a field's wire
type and convert its value the way prost does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from pytier.wire.errors import WireError

BytesLike = bytes | bytearray | memoryview

WT_VARINT = 0
WT_I64 = 1
WT_LEN = 2
WT_I32 = 5

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
MAX_FIELD = (1 << 29) - 1

_I32 = struct.Struct("<I")
_I64 = struct.Struct("<Q")
_Bool = bool


def encode_varint(value: int) -> bytes:
    """Base-128 varint; a negative value is written as its 64-bit two's complement (10 bytes)."""
    if value < 0:
        if value < -(1 << 63):
            raise ValueError(f"varint out of range: {value}")
        value &= MASK64
    elif value > MASK64:
        raise ValueError(f"varint out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: BytesLike, pos: int) -> tuple[int, int]:
    """Read one varint at `pos`; return (value, position after it)."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise WireError("varint overflows 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _key(field: int, wire_type: int) -> bytes:
    if not 1 <= field <= MAX_FIELD:
        raise ValueError(f"invalid field number {field}")
    return encode_varint((field << 3) | wire_type)


def _check_int(value: int, lo: int, hi: int, kind: str) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{kind} out of range: {value}")


class Writer:
    """Accumulates encoded fields; `getvalue()` returns the message bytes."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def __bytes__(self) -> bytes:
        return bytes(self._buf)

    def _varint_field(self, field: int, value: int) -> None:
        self._buf += _key(field, WT_VARINT)
        self._buf += encode_varint(value)

    def _len_field(self, field: int, data: BytesLike) -> None:
        self._buf += _key(field, WT_LEN)
        self._buf += encode_varint(len(data))
        self._buf += data

    # proto3 scalars without presence: the default value is not written.

    def uint(self, field: int, value: int) -> None:
        """uint32/uint64 (the caller picks the range it means)."""
        _check_int(value, 0, MASK64, "uint")
        if value:
            self._varint_field(field, value)

    def uint32(self, field: int, value: int) -> None:
        _check_int(value, 0, MASK32, "uint32")
        if value:
            self._varint_field(field, value)

    def int32(self, field: int, value: int) -> None:
        _check_int(value, -(1 << 31), (1 << 31) - 1, "int32")
        if value:
            self._varint_field(field, value)

    def int64(self, field: int, value: int) -> None:
        _check_int(value, -(1 << 63), (1 << 63) - 1, "int64")
        if value:
            self._varint_field(field, value)

    def enum(self, field: int, value: int) -> None:
        self.int32(field, value)

    def bytes_(self, field: int, data: BytesLike) -> None:
        if data:
            self._len_field(field, data)

    def string(self, field: int, text: str) -> None:
        if text:
            self._len_field(field, text.encode())

    def fixed32(self, field: int, value: int) -> None:
        _check_int(value, 0, MASK32, "fixed32")
        if value:
            self._buf += _key(field, WT_I32)
            self._buf += _I32.pack(value)

    def fixed64(self, field: int, value: int) -> None:
        _check_int(value, 0, MASK64, "fixed64")
        if value:
            self._buf += _key(field, WT_I64)
            self._buf += _I64.pack(value)

    # Always written: embedded messages (they have presence) and repeated elements.

    def message(self, field: int, encoded: BytesLike) -> None:
        """An embedded message; written even when empty, because a present empty message is not absent."""
        self._len_field(field, encoded)

    def repeated_string(self, field: int, items: Iterable[str]) -> None:
        for text in items:
            self._len_field(field, text.encode())

    def repeated_bytes(self, field: int, items: Iterable[BytesLike]) -> None:
        for data in items:
            self._len_field(field, data)

    def repeated_message(self, field: int, items: Iterable[BytesLike]) -> None:
        for data in items:
            self._len_field(field, data)

    def packed_uint(self, field: int, values: Iterable[int]) -> None:
        """A packed repeated uint32/uint64 (proto3's default form); nothing when empty."""
        body = bytearray()
        for value in values:
            _check_int(value, 0, MASK64, "uint")
            body += encode_varint(value)
        if body:
            self._len_field(field, body)

    # proto3 `optional`: None is absent, anything else is written, zero included.

    def optional_uint(self, field: int, value: int | None) -> None:
        if value is not None:
            _check_int(value, 0, MASK64, "uint")
            self._varint_field(field, value)

    def optional_int32(self, field: int, value: int | None) -> None:
        if value is not None:
            _check_int(value, -(1 << 31), (1 << 31) - 1, "int32")
            self._varint_field(field, value)

    def optional_int64(self, field: int, value: int | None) -> None:
        if value is not None:
            _check_int(value, -(1 << 63), (1 << 63) - 1, "int64")
            self._varint_field(field, value)

    def optional_enum(self, field: int, value: int | None) -> None:
        self.optional_int32(field, value)

    def optional_bool(self, field: int, value: _Bool | None) -> None:
        if value is not None:
            self._varint_field(field, int(value))

    def optional_bytes(self, field: int, data: BytesLike | None) -> None:
        if data is not None:
            self._len_field(field, data)

    def optional_string(self, field: int, text: str | None) -> None:
        if text is not None:
            self._len_field(field, text.encode())

    def bool(self, field: int, value: _Bool) -> None:
        if value:
            self._varint_field(field, 1)


def iter_fields(buf: BytesLike) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for every field of an encoded message.

    Varints and fixed-width values come out as unsigned ints, length-delimited values as bytes.
    Groups (wire types 3 and 4), field number 0 and truncated values raise WireError.
    """
    view = memoryview(buf)
    end = len(view)
    pos = 0
    while pos < end:
        key, pos = decode_varint(view, pos)
        field = key >> 3
        wire_type = key & 7
        if field == 0 or field > MAX_FIELD:
            raise WireError(f"invalid field number {field}")
        if wire_type == WT_VARINT:
            value, pos = decode_varint(view, pos)
            yield field, wire_type, value
        elif wire_type == WT_LEN:
            length, pos = decode_varint(view, pos)
            if length > end - pos:
                raise WireError(f"field {field}: length {length} runs past the end")
            yield field, wire_type, bytes(view[pos : pos + length])
            pos += length
        elif wire_type == WT_I64:
            if pos + 8 > end:
                raise WireError(f"field {field}: truncated fixed64")
            yield field, wire_type, _I64.unpack_from(view, pos)[0]
            pos += 8
        elif wire_type == WT_I32:
            if pos + 4 > end:
                raise WireError(f"field {field}: truncated fixed32")
            yield field, wire_type, _I32.unpack_from(view, pos)[0]
            pos += 4
        else:
            raise WireError(f"field {field}: unsupported wire type {wire_type}")


def read_varint(wire_type: int, value: int | bytes) -> int:
    if wire_type != WT_VARINT or not isinstance(value, int):
        raise WireError(f"wire type {wire_type} where a varint was expected")
    return value


def read_uint32(wire_type: int, value: int | bytes) -> int:
    """uint32 (and enum-free unsigned fields); an oversized varint is truncated as prost does."""
    return read_varint(wire_type, value) & MASK32


def read_uint64(wire_type: int, value: int | bytes) -> int:
    return read_varint(wire_type, value)


def read_int32(wire_type: int, value: int | bytes) -> int:
    v = read_varint(wire_type, value) & MASK32
    return v - (1 << 32) if v >> 31 else v


def read_int64(wire_type: int, value: int | bytes) -> int:
    v = read_varint(wire_type, value)
    return v - (1 << 64) if v >> 63 else v


def read_bool(wire_type: int, value: int | bytes) -> bool:
    return read_varint(wire_type, value) != 0


def read_bytes(wire_type: int, value: int | bytes) -> bytes:
    if wire_type != WT_LEN or not isinstance(value, bytes):
        raise WireError(f"wire type {wire_type} where a length-delimited field was expected")
    return value


def read_string(wire_type: int, value: int | bytes) -> str:
    try:
        return read_bytes(wire_type, value).decode()
    except UnicodeDecodeError as exc:
        raise WireError(f"string is not UTF-8: {exc}") from None


def read_packed_uint(wire_type: int, value: int | bytes) -> list[int]:
    """A repeated unsigned field: accepts both the packed form and a single unpacked element."""
    if wire_type == WT_VARINT:
        return [read_varint(wire_type, value)]
    data = read_bytes(wire_type, value)
    out = []
    pos = 0
    while pos < len(data):
        item, pos = decode_varint(data, pos)
        out.append(item)
    return out


def read_packed_uint32(wire_type: int, value: int | bytes) -> list[int]:
    return [item & MASK32 for item in read_packed_uint(wire_type, value)]
