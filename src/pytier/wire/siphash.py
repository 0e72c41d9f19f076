"""Rust std's DefaultHasher (SipHash-1-3) and the network digest and keys EasyTier derives from it.

EasyTier hashes the network name and secret with `DefaultHasher`, so interop needs its exact
streaming behaviour: `write` appends raw bytes (no length prefix), and `finish` hashes a copy of
the state, so writing can continue after it.
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFFFFFFFFFF
_WORD = struct.Struct("<Q")
_BE64 = struct.Struct(">Q")


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


class SipHasher13:
    """Streaming SipHash-1-3 with Rust `Hasher` semantics (zero keys by default)."""

    __slots__ = ("_length", "_tail", "_v0", "_v1", "_v2", "_v3")

    def __init__(self, k0: int = 0, k1: int = 0) -> None:
        self._v0 = k0 ^ 0x736F6D6570736575
        self._v1 = k1 ^ 0x646F72616E646F6D
        self._v2 = k0 ^ 0x6C7967656E657261
        self._v3 = k1 ^ 0x7465646279746573
        self._tail = b""
        self._length = 0

    def write(self, data: bytes) -> None:
        self._length += len(data)
        buf = self._tail + bytes(data)
        full = len(buf) - len(buf) % 8
        v0, v1, v2, v3 = self._v0, self._v1, self._v2, self._v3
        for off in range(0, full, 8):
            (m,) = _WORD.unpack_from(buf, off)
            v3 ^= m
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
            v0 ^= m
        self._v0, self._v1, self._v2, self._v3 = v0, v1, v2, v3
        self._tail = buf[full:]

    def finish(self) -> int:
        b = ((self._length & 0xFF) << 56) | int.from_bytes(self._tail, "little")
        v0, v1, v2, v3 = self._v0, self._v1, self._v2, self._v3 ^ b
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= b
        v2 ^= 0xFF
        for _ in range(3):
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        return v0 ^ v1 ^ v2 ^ v3


def network_secret_digest(network_name: str, secret: str) -> bytes:
    """The 32-byte `network_secret_digest` of the HandshakeRequest."""
    h = SipHasher13()
    h.write(network_name.encode())
    h.write(secret.encode())
    digest = bytearray()
    for _ in range(4):
        digest += _BE64.pack(h.finish())
        h.write(bytes(digest))
    return bytes(digest)


def key_128(secret: str) -> bytes:
    """The 16-byte key of `aes-gcm` and `xor`."""
    h = SipHasher13()
    h.write(secret.encode())
    first = _BE64.pack(h.finish())
    h.write(first)
    return first + _BE64.pack(h.finish())


def key_256(secret: str) -> bytes:
    """The 32-byte key of `aes-256-gcm` and `chacha20`."""
    h = SipHasher13()
    h.write(secret.encode())
    h.write(b"easytier-256bit-key")
    key = bytearray()
    for i in range(4):
        h.write(bytes(key))
        h.write(bytes([i]))
        key += _BE64.pack(h.finish())
    return bytes(key)
