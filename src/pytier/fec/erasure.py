"""Reed-Solomon erasure coding of one group's symbols (zfec), and the symbol layout.

A symbol is a data packet as the code sees it: its length as u16 big-endian, the packet, zero
padding up to the group's symbol size (2 + its longest packet). The length prefix is what lets a
recovered packet come back with its own length, so packets of any size share a group. zfec is
systematic: the k data symbols are sent as they are (their frames carry only the packet; the
receiver rebuilds prefix and padding), and only the m parity symbols are extra.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import zfec

from pytier.fec.framing import FecFrameError

__all__ = ["ErasureCode", "make_symbol", "symbol_payload"]

_LEN = struct.Struct(">H")
# Enough for every (k, m) a controller picks; a peer sending odd shapes only costs table rebuilds.
_CACHE_LIMIT = 64


def make_symbol(packet: bytes | memoryview, size: int) -> bytes:
    pad = size - 2 - len(packet)
    return _LEN.pack(len(packet)) + bytes(packet) + b"\0" * pad


def symbol_payload(symbol: bytes) -> bytes:
    """The packet inside a recovered symbol; FecFrameError if its length prefix does not fit."""
    (n,) = _LEN.unpack_from(symbol)
    if n > len(symbol) - 2:
        raise FecFrameError(f"recovered FEC symbol claims {n} bytes in {len(symbol) - 2}")
    return symbol[2 : 2 + n]


class ErasureCode:
    """zfec encoders and decoders, built once per group shape (k, m)."""

    __slots__ = ("_decoders", "_encoders")

    def __init__(self) -> None:
        self._encoders: dict[tuple[int, int], zfec.Encoder] = {}
        self._decoders: dict[tuple[int, int], zfec.Decoder] = {}

    def parity(self, symbols: Sequence[bytes], m: int) -> list[bytes]:
        """The m parity symbols of k equal-length data symbols."""
        k = len(symbols)
        enc = self._encoders.get((k, m))
        if enc is None:
            if len(self._encoders) >= _CACHE_LIMIT:
                self._encoders.clear()
            enc = self._encoders[(k, m)] = zfec.Encoder(k, k + m)
        return [bytes(p) for p in enc.encode(tuple(symbols), tuple(range(k, k + m)))]

    def recover(self, k: int, m: int, symbols: dict[int, bytes]) -> list[bytes]:
        """All k data symbols from any k of the group's symbols (index -> equal-length symbol)."""
        dec = self._decoders.get((k, m))
        if dec is None:
            if len(self._decoders) >= _CACHE_LIMIT:
                self._decoders.clear()
            dec = self._decoders[(k, m)] = zfec.Decoder(k, k + m)
        nums = sorted(symbols)[:k]
        return [bytes(s) for s in dec.decode(tuple(symbols[i] for i in nums), tuple(nums))]
