"""QUIC transport parameters (RFC 9000 §18.2) as EasyTier's null-crypto QUIC carries them.

With quinn's null crypto provider there is no TLS: each side's CRYPTO stream holds nothing but its raw
transport-parameter list (client in Initial space, server in Handshake space). This module is that
list's codec; it knows the parameters the real node sends (including `grease_quic_bit` and the
`min_ack_delay` extension) and keeps any other, reserved or greased, parameter as opaque bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

from pytier.wire.errors import WireError

VARINT_MAX = (1 << 62) - 1

# Identifiers (RFC 9000 §18.2, RFC 9221, RFC 9287, draft-ietf-quic-ack-frequency).
ORIGINAL_DESTINATION_CONNECTION_ID = 0x00
MAX_IDLE_TIMEOUT = 0x01
STATELESS_RESET_TOKEN = 0x02
MAX_UDP_PAYLOAD_SIZE = 0x03
INITIAL_MAX_DATA = 0x04
INITIAL_MAX_STREAM_DATA_BIDI_LOCAL = 0x05
INITIAL_MAX_STREAM_DATA_BIDI_REMOTE = 0x06
INITIAL_MAX_STREAM_DATA_UNI = 0x07
INITIAL_MAX_STREAMS_BIDI = 0x08
INITIAL_MAX_STREAMS_UNI = 0x09
ACK_DELAY_EXPONENT = 0x0A
MAX_ACK_DELAY = 0x0B
DISABLE_ACTIVE_MIGRATION = 0x0C
ACTIVE_CONNECTION_ID_LIMIT = 0x0E
INITIAL_SOURCE_CONNECTION_ID = 0x0F
RETRY_SOURCE_CONNECTION_ID = 0x10
MAX_DATAGRAM_FRAME_SIZE = 0x20
GREASE_QUIC_BIT = 0x2AB2
MIN_ACK_DELAY = 0xFF04DE1B
# pytier's own: "I take datagrams up to this size". quinn ignores unknown ids, so only two pytier nodes
# ever go past the 1200 bytes EasyTier's QUIC uses.
PYTIER_DATAGRAM_SIZE = 0x50595449

# (id, attribute, kind): kind "int" is a varint value, "bytes" opaque, "flag" zero-length.
_KNOWN: tuple[tuple[int, str, str], ...] = (
    (ORIGINAL_DESTINATION_CONNECTION_ID, "original_destination_connection_id", "bytes"),
    (MAX_IDLE_TIMEOUT, "max_idle_timeout_ms", "int"),
    (STATELESS_RESET_TOKEN, "stateless_reset_token", "bytes"),
    (MAX_UDP_PAYLOAD_SIZE, "max_udp_payload_size", "int"),
    (INITIAL_MAX_DATA, "initial_max_data", "int"),
    (INITIAL_MAX_STREAM_DATA_BIDI_LOCAL, "initial_max_stream_data_bidi_local", "int"),
    (INITIAL_MAX_STREAM_DATA_BIDI_REMOTE, "initial_max_stream_data_bidi_remote", "int"),
    (INITIAL_MAX_STREAM_DATA_UNI, "initial_max_stream_data_uni", "int"),
    (INITIAL_MAX_STREAMS_BIDI, "initial_max_streams_bidi", "int"),
    (INITIAL_MAX_STREAMS_UNI, "initial_max_streams_uni", "int"),
    (ACK_DELAY_EXPONENT, "ack_delay_exponent", "int"),
    (MAX_ACK_DELAY, "max_ack_delay_ms", "int"),
    (DISABLE_ACTIVE_MIGRATION, "disable_active_migration", "flag"),
    (ACTIVE_CONNECTION_ID_LIMIT, "active_connection_id_limit", "int"),
    (INITIAL_SOURCE_CONNECTION_ID, "initial_source_connection_id", "bytes"),
    (RETRY_SOURCE_CONNECTION_ID, "retry_source_connection_id", "bytes"),
    (MAX_DATAGRAM_FRAME_SIZE, "max_datagram_frame_size", "int"),
    (GREASE_QUIC_BIT, "grease_quic_bit", "flag"),
    (MIN_ACK_DELAY, "min_ack_delay_us", "int"),
    (PYTIER_DATAGRAM_SIZE, "pytier_datagram_size", "int"),
)
_BY_ID = {pid: (name, kind) for pid, name, kind in _KNOWN}


def encode_varint(value: int) -> bytes:
    if value < 0 or value > VARINT_MAX:
        raise ValueError(f"{value} does not fit a QUIC varint")
    if value < 0x40:
        return value.to_bytes(1, "big")
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x40000000:
        return (value | 0x80000000).to_bytes(4, "big")
    return (value | 0xC000000000000000).to_bytes(8, "big")


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); WireError when the input ends inside the varint."""
    if pos >= len(data):
        raise WireError("truncated varint")
    length = 1 << (data[pos] >> 6)
    if pos + length > len(data):
        raise WireError("truncated varint")
    value = int.from_bytes(data[pos:pos + length], "big") & ((1 << (8 * length - 2)) - 1)
    return value, pos + length


@dataclass(slots=True)
class TransportParams:
    original_destination_connection_id: bytes | None = None
    max_idle_timeout_ms: int | None = None
    stateless_reset_token: bytes | None = None
    max_udp_payload_size: int | None = None
    initial_max_data: int | None = None
    initial_max_stream_data_bidi_local: int | None = None
    initial_max_stream_data_bidi_remote: int | None = None
    initial_max_stream_data_uni: int | None = None
    initial_max_streams_bidi: int | None = None
    initial_max_streams_uni: int | None = None
    ack_delay_exponent: int | None = None
    max_ack_delay_ms: int | None = None
    disable_active_migration: bool = False
    active_connection_id_limit: int | None = None
    initial_source_connection_id: bytes | None = None
    retry_source_connection_id: bytes | None = None
    max_datagram_frame_size: int | None = None
    grease_quic_bit: bool = False
    min_ack_delay_us: int | None = None
    pytier_datagram_size: int | None = None
    # Parameters this codec does not know (reserved grease ids among them), in wire order.
    unknown: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        out = bytearray()
        for pid, name, kind in _KNOWN:
            value = getattr(self, name)
            if value is None or value is False:
                continue
            if kind == "int":
                body = encode_varint(value)
            elif kind == "bytes":
                body = bytes(value)
            else:
                body = b""
            out += encode_varint(pid) + encode_varint(len(body)) + body
        for pid, body in self.unknown:
            out += encode_varint(pid) + encode_varint(len(body)) + body
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        """Parse a parameter list; WireError on truncation, a repeated id or a malformed value."""
        params = cls()
        seen: set[int] = set()
        unknown: list[tuple[int, bytes]] = []
        pos = 0
        while pos < len(data):
            pid, pos = decode_varint(data, pos)
            length, pos = decode_varint(data, pos)
            if pos + length > len(data):
                raise WireError(f"transport parameter {pid:#x} runs past the end")
            body = bytes(data[pos:pos + length])
            pos += length
            if pid in seen:
                raise WireError(f"transport parameter {pid:#x} appears twice")
            seen.add(pid)
            known = _BY_ID.get(pid)
            if known is None:
                unknown.append((pid, body))
                continue
            name, kind = known
            if kind == "int":
                value, end = decode_varint(body, 0)
                if end != len(body):
                    raise WireError(f"transport parameter {name}: {len(body)} bytes for one varint")
                setattr(params, name, value)
            elif kind == "bytes":
                setattr(params, name, body)
            else:
                if body:
                    raise WireError(f"transport parameter {name} must be empty")
                setattr(params, name, True)
        params.unknown = tuple(unknown)
        return params

    def known_fields(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "unknown"}
