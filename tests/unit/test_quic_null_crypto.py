"""Packet protection of EasyTier's null-crypto QUIC: the §7.2 tag vector, round trips, rejection."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytier.transport import quic_null_crypto as nc
from pytier.wire.errors import WireError
from pytier.wire.seahash import quic_tag, seahash

# A short-header packet the real node sent (§7.2 of the protocol notes): header up to the packet
# number, frames, and the tag the real node computed.
VECTOR_HEADER = bytes.fromhex("004df3d2e2e41195d305")
VECTOR_PAYLOAD = bytes.fromhex("0204020002")
VECTOR_TAG = bytes.fromhex("eea2e40f8c6e61f5")


def test_tag_vector_from_the_wire() -> None:
    assert nc.tag(VECTOR_HEADER, VECTOR_PAYLOAD) == VECTOR_TAG
    assert quic_tag(VECTOR_HEADER, VECTOR_PAYLOAD) == VECTOR_TAG  # the pure-Python reference


def test_fast_hash_is_in_use_and_matches_the_reference() -> None:
    assert nc.FAST_HASH, "the pinned seahash wheel is missing: every datagram would cost ~80 µs"
    for n in (0, 1, 7, 8, 9, 31, 32, 33, 100, 1200):
        data = os.urandom(n)
        assert nc._hash(data) == seahash(data)


@given(st.binary(max_size=64), st.binary(max_size=1300))
def test_fast_tag_equals_reference_tag(header: bytes, payload: bytes) -> None:
    assert nc.tag(header, payload) == quic_tag(header, payload)


def test_protect_leaves_header_and_payload_in_clear() -> None:
    packet = nc.protect(VECTOR_HEADER, VECTOR_PAYLOAD)
    assert packet == VECTOR_HEADER + VECTOR_PAYLOAD + VECTOR_TAG


def test_unprotect_round_trip_short_header() -> None:
    # first byte 0x40|pn_len-1=1 (2-byte pn), 8-byte DCID, pn 0x1234
    header = bytes([0x41]) + bytes(range(8)) + b"\x12\x34"
    payload = b"\x01" + bytes(50)
    h, p, pn = nc.unprotect(nc.protect(header, payload), 9)
    assert (h, p, pn) == (header, payload, 0x1234)


def test_vector_packet_unprotects() -> None:
    # 0x00: short header, 1-byte pn; DCID is 8 bytes, so the pn is at offset 9.
    h, p, pn = nc.unprotect(VECTOR_HEADER + VECTOR_PAYLOAD + VECTOR_TAG, 9)
    assert (h, p, pn) == (VECTOR_HEADER, VECTOR_PAYLOAD, 0x05)


@pytest.mark.parametrize("flip", [0, 5, 10, 14, 20])
def test_any_flipped_byte_is_rejected(flip: int) -> None:
    packet = bytearray(VECTOR_HEADER + VECTOR_PAYLOAD + VECTOR_TAG)
    packet[flip] ^= 0x01
    with pytest.raises(WireError):
        nc.unprotect(bytes(packet), 9)


@given(st.binary(max_size=200), st.integers(min_value=-2, max_value=210))
def test_garbage_raises_only_wire_error(data: bytes, pn_offset: int) -> None:
    with contextlib.suppress(WireError):
        nc.unprotect(data, pn_offset)
