"""SeaHash (default seeds) and the 8-byte integrity tag of EasyTier's null-crypto QUIC."""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFFFFFFFFFF
_PRIME = 0x6EED0E9DA4D94A4F
_SEEDS = (0x16F11FE89B0D677C, 0xB480A793D8E6C86C, 0x6FE2E5AAF078EBC9, 0x14F994A4C5259381)
_LEN = struct.Struct("<Q")
_TAG = struct.Struct(">Q")


def _diffuse(x: int) -> int:
    x = (x * _PRIME) & _MASK
    x ^= (x >> 32) >> (x >> 60)
    return (x * _PRIME) & _MASK


def seahash(data: bytes | bytearray | memoryview) -> int:
    """SeaHash of `data`; equal to streaming the same bytes through a SeaHasher in any split."""
    n = len(data)
    # A partial last word is read zero-padded, so padding the input changes nothing but the
    # length, which is mixed in separately.
    padded = bytes(data) + bytes(-n % 8)
    words = struct.unpack(f"<{len(padded) // 8}Q", padded)
    a, b, c, d = _SEEDS
    m, p = _MASK, _PRIME
    full = len(words) - len(words) % 4
    # The diffusion is inlined: this runs once per QUIC datagram in each direction.
    for i in range(0, full, 4):
        x = ((a ^ words[i]) * p) & m
        a = ((x ^ ((x >> 32) >> (x >> 60))) * p) & m
        x = ((b ^ words[i + 1]) * p) & m
        b = ((x ^ ((x >> 32) >> (x >> 60))) * p) & m
        x = ((c ^ words[i + 2]) * p) & m
        c = ((x ^ ((x >> 32) >> (x >> 60))) * p) & m
        x = ((d ^ words[i + 3]) * p) & m
        d = ((x ^ ((x >> 32) >> (x >> 60))) * p) & m
    rest = words[full:]
    if len(rest) > 0:
        a = _diffuse(a ^ rest[0])
    if len(rest) > 1:
        b = _diffuse(b ^ rest[1])
    if len(rest) > 2:
        c = _diffuse(c ^ rest[2])
    return _diffuse(a ^ b ^ c ^ d ^ n)


def quic_tag(header: bytes | bytearray | memoryview, payload: bytes | bytearray | memoryview) -> bytes:
    """The tag that replaces the AEAD tag in EasyTier's QUIC packets (§7.2 of the protocol notes)."""
    data = b"".join((_LEN.pack(len(header)), header, _LEN.pack(len(payload)), payload))
    return _TAG.pack(seahash(data))
