"""Packet protection of EasyTier's QUIC: no encryption, no header protection, an 8-byte SeaHash tag.

quinn's null crypto provider leaves the header (packet number included) and the frames in clear and
puts, where an AEAD tag would go, `u64be(SeaHash(u64le(len H) ‖ H ‖ u64le(len P) ‖ P))`: H is the
header up to and including the packet number, P the frames (§7.2 of the protocol notes). It only
catches corruption; confidentiality and authenticity come from the peer-packet encryption around it.

The tag runs once per datagram in each direction, so the Rust SeaHash of the `seahash` package is used
when it is installed; pytier.wire.seahash is the reference it is tested against and the fallback.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pytier.wire import seahash as _reference
from pytier.wire.errors import WireError

TAG_SIZE = 8
_LEN = struct.Struct("<Q")
_TAG = struct.Struct(">Q")

_hash: Callable[[bytes], int]
try:
    from seahash import hash as _rust_hash

    _hash = _rust_hash
    FAST_HASH = True
except ImportError:  # pragma: no cover - the pinned dependency is normally there
    _hash = _reference.seahash
    FAST_HASH = False


class TagMismatch(WireError):
    """The tag does not match the packet: corrupted or not null-crypto QUIC."""


def tag(header: bytes, payload: bytes) -> bytes:
    return _TAG.pack(_hash(_LEN.pack(len(header)) + header + _LEN.pack(len(payload)) + payload))


def protect(header: bytes, payload: bytes) -> bytes:
    """The protected packet: header and payload as they are, then the tag."""
    return header + payload + tag(header, payload)


def unprotect(packet: bytes, pn_offset: int) -> tuple[bytes, bytes, int]:
    """(header including the packet number, payload, truncated packet number) of a protected packet
    whose packet number starts at `pn_offset`; TagMismatch when the tag is wrong."""
    if pn_offset < 1 or pn_offset >= len(packet):
        raise WireError("packet number offset outside the packet")
    pn_len = (packet[0] & 0x03) + 1
    end = pn_offset + pn_len
    if len(packet) < end + TAG_SIZE:
        raise WireError("packet too short for its packet number and tag")
    header = packet[:end]
    payload = packet[end:-TAG_SIZE]
    if tag(header, payload) != packet[-TAG_SIZE:]:
        raise TagMismatch("QUIC packet tag mismatch")
    return header, payload, int.from_bytes(packet[pn_offset:end], "big")
