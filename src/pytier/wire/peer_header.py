"""The 16-byte peer manager header that starts every peer packet (little-endian, packed).

Hot path: one module-level Struct and plain tuples, no per-packet objects.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

from pytier.wire.errors import WireError


class PacketType(IntEnum):
    Invalid = 0
    Data = 1
    HandShake = 2
    RoutePacket = 3
    Ping = 4
    Pong = 5
    TaRpc = 6
    Route = 7
    RpcReq = 8
    RpcResp = 9
    ForeignNetworkPacket = 10
    KcpSrc = 11
    KcpDst = 12
    NoiseHandshakeMsg1 = 13
    NoiseHandshakeMsg2 = 14
    NoiseHandshakeMsg3 = 15
    QuicSrc = 16
    QuicDst = 17
    DataWithKcpSrcModified = 18
    DataWithQuicSrcModified = 19
    RelayHandshake = 20
    RelayHandshakeAck = 21
    # pytier's own, sent only to peers that advertised PeerFeatureFlag.pytier_fec (docs/fec.md);
    # far above EasyTier 2.6's types so a later EasyTier type is unlikely to collide.
    PytierFec = 200


class HeaderFlags(IntFlag):
    ENCRYPTED = 0x01
    LATENCY_FIRST = 0x02
    EXIT_NODE = 0x04
    NO_PROXY = 0x08
    COMPRESSED = 0x10
    NOT_SEND_TO_TUN = 0x40


# from_peer_id, to_peer_id, packet_type, flags, forward_counter, reserved, len
HEADER = struct.Struct("<IIBBBBI")
HEADER_LEN = 16

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


def pack_header(
    from_peer: int, to_peer: int, packet_type: int, flags: int, forward_counter: int, length: int
) -> bytes:
    """`length` is the plaintext, uncompressed payload length (encryption does not change it)."""
    return _pack(from_peer, to_peer, packet_type, flags, forward_counter, 0, length)


def unpack_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """(from_peer, to_peer, packet_type, flags, forward_counter, length); the reserved byte is dropped.

    Unknown packet types and flag bits are returned as is: the caller decides what to ignore.
    """
    if len(buf) < HEADER_LEN:
        raise WireError(f"peer header needs {HEADER_LEN} bytes, got {len(buf)}")
    from_peer, to_peer, packet_type, flags, forward_counter, _reserved, length = _unpack_from(buf)
    return from_peer, to_peer, packet_type, flags, forward_counter, length
