"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

Sums here are 16-bit one's complement sums, kept folded in 0..0xFFFF; a checksum is the complement
of a sum. Since 2**16 == 1 (mod 0xFFFF), the sum of a buffer's big-endian 16-bit words is congruent
to the whole buffer read as one big integer, so `int.from_bytes(data) % 0xFFFF` does the summing in
C. The one place the two differ is zero: a one's complement sum of words that are not all zero is
never 0x0000 (end-around carry turns it into 0xFFFF), so a remainder of 0 maps to 0xFFFF unless the
buffer really is all zeros.
"""

from __future__ import annotations

__all__ = [
    "add",
    "apply_delta",
    "checksum",
    "delta16",
    "delta32",
    "ones_sum",
    "pseudo_header_sum",
    "update16",
    "update32",
    "verify",
]


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded one's complement sum of `data` taken as big-endian 16-bit words.

    An odd trailing byte is the high byte of a last word whose low byte is zero.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    s = n % 0xFFFF
    if s == 0 and n:
        return 0xFFFF
    return s


def add(a: int, b: int) -> int:
    """One's complement sum of two folded sums."""
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of `data`, starting from the folded sum `initial` (e.g. a pseudo-header)."""
    return ~add(initial, ones_sum(data)) & 0xFFFF


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True if `data`, checksum field included, sums to 0xFFFF (negative zero) with `initial`."""
    return add(initial, ones_sum(data)) == 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Folded sum of the IPv4 pseudo-header (RFC 793): addresses, zero, protocol, upper-layer length."""
    n = (int.from_bytes(src, "big") << 64) | (int.from_bytes(dst, "big") << 32) | (protocol << 16) | length
    s = n % 0xFFFF
    if s == 0 and n:
        return 0xFFFF
    return s


def delta16(old: int, new: int) -> int:
    """The folded sum that turns a checksum over `old` into one over `new` (a 16-bit word)."""
    return (~old & 0xFFFF) + new


def delta32(old: int, new: int) -> int:
    """As `delta16`, for an aligned 32-bit field (an IPv4 address, a sequence number)."""
    s = (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF) + ((new >> 16) & 0xFFFF) + (new & 0xFFFF)
    return (s & 0xFFFF) + (s >> 16)


def apply_delta(check: int, delta: int) -> int:
    """The checksum after the changes summed in `delta` (any sum of `delta16`/`delta32` results).

    RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'): unlike eqn. 2 it never produces the 0x0000 sum that a
    full recomputation over data that is not all zeros cannot produce either, so it agrees with one.
    """
    s = (~check & 0xFFFF) + delta
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def update16(check: int, old: int, new: int) -> int:
    """The checksum after one 16-bit word it covers changes from `old` to `new`."""
    return apply_delta(check, delta16(old, new))


def update32(check: int, old: int, new: int) -> int:
    """The checksum after an aligned 32-bit field it covers changes from `old` to `new`."""
    return apply_delta(check, delta32(old, new))
