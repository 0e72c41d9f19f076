"""EasyTier's protobuf messages (handshake, peer RPC, OSPF route sync, proxy connect data).

Field numbers and types follow §3.2, §5 and §7.1 of the protocol notes. Every class has
`encode() -> bytes` and `decode(data) -> Self`; decoders skip unknown fields and raise only
WireError. Decoding starts from proto3 defaults (0, "", empty), not from the dataclass defaults,
so an absent field decodes as the protocol says it should.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar, Self

from pytier.wire.errors import WireError
from pytier.wire.protobuf import (
    MASK32,
    BytesLike,
    Writer,
    iter_fields,
    read_bool,
    read_bytes,
    read_int32,
    read_int64,
    read_packed_uint32,
    read_string,
    read_uint32,
    read_uint64,
)

HANDSHAKE_MAGIC = 0xD1E1A5E1
_QUARTERS = struct.Struct(">IIII")
_ZERO_UUID = bytes(16)


# --- common.UUID, common.Ipv4Addr, common.Ipv6Addr -------------------------------------------


def encode_uuid(raw: bytes) -> bytes:
    """common.UUID from 16 raw bytes: part1..part4 are the big-endian quarters."""
    if len(raw) != 16:
        raise ValueError(f"a UUID is 16 bytes, got {len(raw)}")
    w = Writer()
    for number, part in enumerate(_QUARTERS.unpack(raw), start=1):
        w.uint32(number, part)
    return w.getvalue()


def decode_uuid(data: BytesLike) -> bytes:
    parts = [0, 0, 0, 0]
    for number, wt, value in iter_fields(data):
        if 1 <= number <= 4:
            parts[number - 1] = read_uint32(wt, value)
    return _QUARTERS.pack(*parts)


def encode_ipv4(addr: IPv4Address) -> bytes:
    """common.Ipv4Addr: the address as one big-endian u32."""
    w = Writer()
    w.uint32(1, int(addr))
    return w.getvalue()


def decode_ipv4(data: BytesLike) -> IPv4Address:
    addr = 0
    for number, wt, value in iter_fields(data):
        if number == 1:
            addr = read_uint32(wt, value)
    return IPv4Address(addr)


def encode_ipv6(addr: IPv6Address) -> bytes:
    """common.Ipv6Addr: part1..part4 are the big-endian quarters of the address."""
    w = Writer()
    for number, part in enumerate(_QUARTERS.unpack(addr.packed), start=1):
        w.uint32(number, part)
    return w.getvalue()


def decode_ipv6(data: BytesLike) -> IPv6Address:
    return IPv6Address(decode_uuid(data))


# --- peer_rpc.HandshakeRequest -----------------------------------------------------------------


@dataclass(slots=True)
class HandshakeRequest:
    """Sent by both sides of a new peer connection (never encrypted).

    The codec accepts any digest length; the handshake itself must refuse one that is not 32 bytes.
    """

    magic: int = HANDSHAKE_MAGIC
    my_peer_id: int = 0
    version: int = 1
    features: list[str] = field(default_factory=list)
    network_name: str = ""
    network_secret_digest: bytes = b""

    def encode(self) -> bytes:
        w = Writer()
        w.uint32(1, self.magic)
        w.uint32(2, self.my_peer_id)
        w.uint32(3, self.version)
        w.repeated_string(4, self.features)
        w.string(5, self.network_name)
        w.bytes_(6, self.network_secret_digest)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        magic = my_peer_id = version = 0
        features: list[str] = []
        network_name = ""
        digest = b""
        for number, wt, value in iter_fields(data):
            if number == 1:
                magic = read_uint32(wt, value)
            elif number == 2:
                my_peer_id = read_uint32(wt, value)
            elif number == 3:
                version = read_uint32(wt, value)
            elif number == 4:
                features.append(read_string(wt, value))
            elif number == 5:
                network_name = read_string(wt, value)
            elif number == 6:
                digest = read_bytes(wt, value)
        return cls(magic, my_peer_id, version, features, network_name, digest)


# --- common.PeerFeatureFlag --------------------------------------------------------------------

# pytier's own capability: takes FEC frames (docs/fec.md). A field number far above EasyTier's
# 1..11, so its protobuf decoder skips it and a later EasyTier flag is unlikely to collide.
PYTIER_FEC_FIELD = 1000


@dataclass(slots=True)
class PeerFeatureFlag:
    """Capabilities a node advertises in its RoutePeerInfo (all bools, field numbers 1..11).

    `pytier_fec` is pytier's own (field PYTIER_FEC_FIELD), kept out of FIELDS and `names()`, which
    list what EasyTier also reads; when unset the encoding is exactly EasyTier's.
    """

    is_public_server: bool = False
    avoid_relay_data: bool = False
    kcp_input: bool = False
    no_relay_kcp: bool = False
    support_conn_list_sync: bool = False
    quic_input: bool = False
    no_relay_quic: bool = False
    is_credential_peer: bool = False
    need_p2p: bool = False
    disable_p2p: bool = False
    ipv6_public_addr_provider: bool = False
    pytier_fec: bool = False

    FIELDS: ClassVar[tuple[str, ...]] = (
        "is_public_server",
        "avoid_relay_data",
        "kcp_input",
        "no_relay_kcp",
        "support_conn_list_sync",
        "quic_input",
        "no_relay_quic",
        "is_credential_peer",
        "need_p2p",
        "disable_p2p",
        "ipv6_public_addr_provider",
    )

    def names(self) -> list[str]:
        """Names of the flags that are set, in field-number order."""
        return [name for name in self.FIELDS if getattr(self, name)]

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Self:
        flags = cls()
        for name in names:
            if name not in cls.FIELDS:
                raise ValueError(f"unknown feature flag {name!r}")
            setattr(flags, name, True)
        return flags

    def encode(self) -> bytes:
        w = Writer()
        for number, name in enumerate(self.FIELDS, start=1):
            w.bool(number, getattr(self, name))
        w.bool(PYTIER_FEC_FIELD, self.pytier_fec)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        flags = cls()
        for number, wt, value in iter_fields(data):
            if 1 <= number <= len(cls.FIELDS):
                setattr(flags, cls.FIELDS[number - 1], read_bool(wt, value))
            elif number == PYTIER_FEC_FIELD:
                flags.pytier_fec = read_bool(wt, value)
        return flags


# --- peer_rpc.RoutePeerInfo --------------------------------------------------------------------


@dataclass(slots=True)
class RoutePeerInfo:
    """One node's entry in OSPF route sync.

    `decode` keeps the exact input in `raw` and `encode` returns `raw` when it is set: other nodes'
    infos must be relayed byte-exact (they carry fields this class skips, such as ipv6_addr and
    groups). `raw` does not take part in equality. To publish changed values, build a new
    instance or call `encode_fields()`.
    """

    peer_id: int = 0
    inst_id: bytes = _ZERO_UUID
    cost: int = 0
    ipv4_addr: IPv4Address | None = None
    proxy_cidrs: list[str] = field(default_factory=list)
    hostname: str | None = None
    udp_nat_type: int = 0
    last_update: tuple[int, int] | None = None
    version: int = 0
    easytier_version: str = ""
    feature_flag: PeerFeatureFlag = field(default_factory=PeerFeatureFlag)
    peer_route_id: int = 0
    network_length: int = 0
    raw: bytes = field(default=b"", compare=False, repr=False)

    def encode(self) -> bytes:
        return self.raw if self.raw else self.encode_fields()

    def encode_fields(self) -> bytes:
        """A fresh encoding of this object's fields, ignoring `raw`."""
        w = Writer()
        w.uint32(1, self.peer_id)
        w.message(2, encode_uuid(self.inst_id))
        w.uint32(3, self.cost)
        if self.ipv4_addr is not None:
            w.message(4, encode_ipv4(self.ipv4_addr))
        w.repeated_string(5, self.proxy_cidrs)
        w.optional_string(6, self.hostname)
        w.enum(7, self.udp_nat_type)
        if self.last_update is not None:
            seconds, nanos = self.last_update
            ts = Writer()
            ts.int64(1, seconds)
            ts.int32(2, nanos)
            w.message(8, ts.getvalue())
        w.uint32(9, self.version)
        w.string(10, self.easytier_version)
        w.message(11, self.feature_flag.encode())
        w.uint(12, self.peer_route_id)
        w.uint32(13, self.network_length)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        info = cls(raw=bytes(data))
        for number, wt, value in iter_fields(data):
            if number == 1:
                info.peer_id = read_uint32(wt, value)
            elif number == 2:
                info.inst_id = decode_uuid(read_bytes(wt, value))
            elif number == 3:
                info.cost = read_uint32(wt, value)
            elif number == 4:
                info.ipv4_addr = decode_ipv4(read_bytes(wt, value))
            elif number == 5:
                info.proxy_cidrs.append(read_string(wt, value))
            elif number == 6:
                info.hostname = read_string(wt, value)
            elif number == 7:
                info.udp_nat_type = read_int32(wt, value)
            elif number == 8:
                info.last_update = _decode_timestamp(read_bytes(wt, value))
            elif number == 9:
                info.version = read_uint32(wt, value)
            elif number == 10:
                info.easytier_version = read_string(wt, value)
            elif number == 11:
                info.feature_flag = PeerFeatureFlag.decode(read_bytes(wt, value))
            elif number == 12:
                info.peer_route_id = read_uint64(wt, value)
            elif number == 13:
                info.network_length = read_uint32(wt, value)
        return info


def _decode_timestamp(data: bytes) -> tuple[int, int]:
    seconds = nanos = 0
    for number, wt, value in iter_fields(data):
        if number == 1:
            seconds = read_int64(wt, value)
        elif number == 2:
            nanos = read_int32(wt, value)
    return seconds, nanos


# --- connection info: RouteConnBitmap / RouteConnPeerList ---------------------------------------


@dataclass(slots=True)
class PeerIdVersion:
    peer_id: int = 0
    version: int = 0

    def encode(self) -> bytes:
        w = Writer()
        w.uint32(1, self.peer_id)
        w.uint32(2, self.version)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        peer_id = version = 0
        for number, wt, value in iter_fields(data):
            if number == 1:
                peer_id = read_uint32(wt, value)
            elif number == 2:
                version = read_uint32(wt, value)
        return cls(peer_id, version)


def _bitmap_len(n: int) -> int:
    return math.ceil(n * n / 8)


@dataclass(slots=True)
class RouteConnBitmap:
    """Who is directly connected to whom: bit i*N+j (LSB first) means peer_ids[i] -> peer_ids[j].

    A bitmap shorter than ceil(N*N/8) bytes panics a real node, so it is refused both ways.
    """

    peer_ids: list[PeerIdVersion] = field(default_factory=list)
    bitmap: bytes = b""

    @classmethod
    def from_edges(
        cls, ids_versions: Iterable[PeerIdVersion | tuple[int, int]], edges: Iterable[tuple[int, int]]
    ) -> Self:
        """Build from (peer_id, version) entries and directed (from_peer_id, to_peer_id) edges."""
        peer_ids = [p if isinstance(p, PeerIdVersion) else PeerIdVersion(*p) for p in ids_versions]
        index = {p.peer_id: i for i, p in enumerate(peer_ids)}
        n = len(peer_ids)
        bitmap = bytearray(_bitmap_len(n))
        for src, dst in edges:
            if src not in index or dst not in index:
                raise ValueError(f"edge {src}->{dst} names a peer that is not listed")
            k = index[src] * n + index[dst]
            bitmap[k >> 3] |= 1 << (k & 7)
        return cls(peer_ids, bytes(bitmap))

    def edges(self) -> set[tuple[int, int]]:
        """Directed (from_peer_id, to_peer_id) pairs whose bit is set."""
        n = len(self.peer_ids)
        total = n * n
        out: set[tuple[int, int]] = set()
        for byte_index, byte in enumerate(self.bitmap[: _bitmap_len(n)]):
            if not byte:
                continue
            for bit in range(8):
                k = byte_index * 8 + bit
                if byte >> bit & 1 and k < total:
                    i, j = divmod(k, n)
                    out.add((self.peer_ids[i].peer_id, self.peer_ids[j].peer_id))
        return out

    def encode(self) -> bytes:
        if len(self.bitmap) < _bitmap_len(len(self.peer_ids)):
            raise ValueError("conn bitmap shorter than ceil(N*N/8) bytes")
        w = Writer()
        w.repeated_message(1, (p.encode() for p in self.peer_ids))
        w.bytes_(2, self.bitmap)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        peer_ids: list[PeerIdVersion] = []
        bitmap = b""
        for number, wt, value in iter_fields(data):
            if number == 1:
                peer_ids.append(PeerIdVersion.decode(read_bytes(wt, value)))
            elif number == 2:
                bitmap = read_bytes(wt, value)
        if len(bitmap) < _bitmap_len(len(peer_ids)):
            raise WireError(f"conn bitmap of {len(bitmap)} bytes is too short for {len(peer_ids)} peers")
        return cls(peer_ids, bitmap)


@dataclass(slots=True)
class RouteConnPeerList:
    """Connection info as adjacency lists: (peer and its conn version, directly connected peer ids)."""

    items: list[tuple[PeerIdVersion, list[int]]] = field(default_factory=list)

    def edges(self) -> set[tuple[int, int]]:
        return {(pv.peer_id, dst) for pv, connected in self.items for dst in connected}

    def encode(self) -> bytes:
        w = Writer()
        for pv, connected in self.items:
            item = Writer()
            item.message(1, pv.encode())
            for peer_id in connected:
                if not 0 <= peer_id <= MASK32:
                    raise ValueError(f"peer id out of range: {peer_id}")
            item.packed_uint(2, connected)
            w.message(1, item.getvalue())
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        items: list[tuple[PeerIdVersion, list[int]]] = []
        for number, wt, value in iter_fields(data):
            if number != 1:
                continue
            pv = PeerIdVersion()
            connected: list[int] = []
            for inner, iwt, ivalue in iter_fields(read_bytes(wt, value)):
                if inner == 1:
                    pv = PeerIdVersion.decode(read_bytes(iwt, ivalue))
                elif inner == 2:
                    connected.extend(read_packed_uint32(iwt, ivalue))
            items.append((pv, connected))
        return cls(items)


# --- OspfRouteRpc.SyncRouteInfo ----------------------------------------------------------------


class SyncRouteInfoError(IntEnum):
    DUPLICATE_PEER_ID = 0
    STOPPED = 1


@dataclass(slots=True)
class SyncRouteInfoRequest:
    """OspfRouteRpc.SyncRouteInfo request.

    `conn_bitmap` and `conn_peer_list` are one protobuf oneof: set at most one. The
    foreign_network_infos field (6) is never emitted and is skipped on decode.
    """

    my_peer_id: int = 0
    my_session_id: int = 0
    is_initiator: bool = False
    peer_infos: list[RoutePeerInfo] | None = None
    conn_bitmap: RouteConnBitmap | None = None
    conn_peer_list: RouteConnPeerList | None = None

    def encode(self) -> bytes:
        if self.conn_bitmap is not None and self.conn_peer_list is not None:
            raise ValueError("conn_bitmap and conn_peer_list are a oneof; set at most one")
        w = Writer()
        w.uint32(1, self.my_peer_id)
        w.uint(2, self.my_session_id)
        w.bool(3, self.is_initiator)
        if self.peer_infos is not None:
            infos = Writer()
            infos.repeated_message(1, (info.encode() for info in self.peer_infos))
            w.message(4, infos.getvalue())
        if self.conn_bitmap is not None:
            w.message(5, self.conn_bitmap.encode())
        if self.conn_peer_list is not None:
            w.message(7, self.conn_peer_list.encode())
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        req = cls()
        for number, wt, value in iter_fields(data):
            if number == 1:
                req.my_peer_id = read_uint32(wt, value)
            elif number == 2:
                req.my_session_id = read_uint64(wt, value)
            elif number == 3:
                req.is_initiator = read_bool(wt, value)
            elif number == 4:
                if req.peer_infos is None:
                    req.peer_infos = []
                for inner, iwt, ivalue in iter_fields(read_bytes(wt, value)):
                    if inner == 1:
                        req.peer_infos.append(RoutePeerInfo.decode(read_bytes(iwt, ivalue)))
            elif number == 5:
                req.conn_bitmap = RouteConnBitmap.decode(read_bytes(wt, value))
                req.conn_peer_list = None
            elif number == 7:
                req.conn_peer_list = RouteConnPeerList.decode(read_bytes(wt, value))
                req.conn_bitmap = None
        return req


@dataclass(slots=True)
class SyncRouteInfoResponse:
    """OspfRouteRpc.SyncRouteInfo response.

    `error` is proto3 `optional`: None leaves field 3 out, and any int, 0 included, is written.
    A present 0 means DuplicatePeerId and makes a real (non-public-server) node panic, so set
    `error` only when that is really meant.
    """

    is_initiator: bool = False
    session_id: int = 0
    error: int | None = None

    def encode(self) -> bytes:
        w = Writer()
        w.bool(1, self.is_initiator)
        w.uint(2, self.session_id)
        w.optional_enum(3, self.error)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        resp = cls()
        for number, wt, value in iter_fields(data):
            if number == 1:
                resp.is_initiator = read_bool(wt, value)
            elif number == 2:
                resp.session_id = read_uint64(wt, value)
            elif number == 3:
                resp.error = read_int32(wt, value)
        return resp


# --- peer RPC framing (package common) ---------------------------------------------------------


class CompressionAlgo(IntEnum):
    INVALID = 0
    NONE = 1
    ZSTD = 2


@dataclass(slots=True)
class RpcDescriptor:
    """Which service method an RpcPacket targets; method_index is 1-based."""

    domain_name: str = ""
    proto_name: str = ""
    service_name: str = ""
    method_index: int = 0

    def encode(self) -> bytes:
        w = Writer()
        w.string(1, self.domain_name)
        w.string(2, self.proto_name)
        w.string(3, self.service_name)
        w.uint32(4, self.method_index)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        d = cls()
        for number, wt, value in iter_fields(data):
            if number == 1:
                d.domain_name = read_string(wt, value)
            elif number == 2:
                d.proto_name = read_string(wt, value)
            elif number == 3:
                d.service_name = read_string(wt, value)
            elif number == 4:
                d.method_index = read_uint32(wt, value)
        return d


@dataclass(slots=True)
class RpcCompressionInfo:
    """Defaults announce no compression both ways, so a real node never sends zstd bodies.

    algo 0 (Invalid) fails the RPC on a real node; omit the whole message instead.
    """

    algo: int = CompressionAlgo.NONE
    accepted_algo: int = CompressionAlgo.NONE

    def encode(self) -> bytes:
        w = Writer()
        w.enum(1, self.algo)
        w.enum(2, self.accepted_algo)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        algo = accepted = 0
        for number, wt, value in iter_fields(data):
            if number == 1:
                algo = read_int32(wt, value)
            elif number == 2:
                accepted = read_int32(wt, value)
        return cls(algo, accepted)


@dataclass(slots=True)
class RpcPacket:
    """The payload of RpcReq/RpcResp peer packets (one piece of a possibly fragmented body)."""

    from_peer: int = 0
    to_peer: int = 0
    transaction_id: int = 0
    descriptor: RpcDescriptor | None = None
    body: bytes = b""
    is_request: bool = False
    total_pieces: int = 1
    piece_idx: int = 0
    trace_id: int = 0
    compression_info: RpcCompressionInfo | None = None

    def encode(self) -> bytes:
        w = Writer()
        w.uint32(1, self.from_peer)
        w.uint32(2, self.to_peer)
        w.int64(3, self.transaction_id)
        if self.descriptor is not None:
            w.message(4, self.descriptor.encode())
        w.bytes_(5, self.body)
        w.bool(6, self.is_request)
        w.uint32(7, self.total_pieces)
        w.uint32(8, self.piece_idx)
        w.int32(9, self.trace_id)
        if self.compression_info is not None:
            w.message(10, self.compression_info.encode())
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        p = cls(total_pieces=0)
        for number, wt, value in iter_fields(data):
            if number == 1:
                p.from_peer = read_uint32(wt, value)
            elif number == 2:
                p.to_peer = read_uint32(wt, value)
            elif number == 3:
                p.transaction_id = read_int64(wt, value)
            elif number == 4:
                p.descriptor = RpcDescriptor.decode(read_bytes(wt, value))
            elif number == 5:
                p.body = read_bytes(wt, value)
            elif number == 6:
                p.is_request = read_bool(wt, value)
            elif number == 7:
                p.total_pieces = read_uint32(wt, value)
            elif number == 8:
                p.piece_idx = read_uint32(wt, value)
            elif number == 9:
                p.trace_id = read_int32(wt, value)
            elif number == 10:
                p.compression_info = RpcCompressionInfo.decode(read_bytes(wt, value))
        return p


@dataclass(slots=True)
class RpcRequest:
    """RPC request envelope. timeout_ms must be > 0: the server runs the handler under it."""

    request: bytes = b""
    timeout_ms: int = 5000

    def encode(self) -> bytes:
        w = Writer()
        w.bytes_(2, self.request)
        w.int32(3, self.timeout_ms)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        request = b""
        timeout_ms = 0
        for number, wt, value in iter_fields(data):
            if number == 2:
                request = read_bytes(wt, value)
            elif number == 3:
                timeout_ms = read_int32(wt, value)
        return cls(request, timeout_ms)


class RpcErrorKind(IntEnum):
    """The error.Error oneof cases (field numbers)."""

    NONE = 0
    OTHER_ERROR = 1
    INVALID_METHOD_INDEX = 2
    INVALID_SERVICE = 3
    PROST_DECODE_ERROR = 4
    PROST_ENCODE_ERROR = 5
    EXECUTE_ERROR = 6
    MALFORMAT_RPC_PACKET = 7
    TIMEOUT = 8


_KINDS_WITH_MESSAGE = frozenset({1, 6, 7, 8})
_KINDS_WITH_SERVICE = frozenset({2, 3})


@dataclass(slots=True)
class RpcError:
    """error.Error: `kind` picks the oneof case.

    Only the fields the case carries are encoded: `message` for other_error, execute_error,
    malformat_rpc_packet and timeout; `service_name` for invalid_service and
    invalid_method_index; `method_index` for invalid_method_index. kind 0 is an Error with no
    case set.
    """

    kind: int
    message: str = ""
    service_name: str = ""
    method_index: int = 0

    def encode(self) -> bytes:
        if not RpcErrorKind.NONE <= self.kind <= RpcErrorKind.TIMEOUT:
            raise ValueError(f"unknown RPC error kind {self.kind}")
        if self.kind == RpcErrorKind.NONE:
            return b""
        inner = Writer()
        if self.kind in _KINDS_WITH_MESSAGE:
            inner.string(1, self.message)
        elif self.kind in _KINDS_WITH_SERVICE:
            inner.string(1, self.service_name)
            if self.kind == RpcErrorKind.INVALID_METHOD_INDEX:
                inner.uint32(2, self.method_index)
        w = Writer()
        w.message(self.kind, inner.getvalue())
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        err = cls(RpcErrorKind.NONE)
        for number, wt, value in iter_fields(data):
            if not 1 <= number <= 8:
                continue
            err = cls(number)
            for inner, iwt, ivalue in iter_fields(read_bytes(wt, value)):
                if inner == 1 and number in _KINDS_WITH_MESSAGE:
                    err.message = read_string(iwt, ivalue)
                elif inner == 1 and number in _KINDS_WITH_SERVICE:
                    err.service_name = read_string(iwt, ivalue)
                elif inner == 2 and number == RpcErrorKind.INVALID_METHOD_INDEX:
                    err.method_index = read_uint32(iwt, ivalue)
        return err


@dataclass(slots=True)
class RpcResponse:
    response: bytes = b""
    error: RpcError | None = None
    runtime_us: int = 0

    def encode(self) -> bytes:
        w = Writer()
        w.bytes_(1, self.response)
        if self.error is not None:
            w.message(2, self.error.encode())
        w.uint(3, self.runtime_us)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        resp = cls()
        for number, wt, value in iter_fields(data):
            if number == 1:
                resp.response = read_bytes(wt, value)
            elif number == 2:
                resp.error = RpcError.decode(read_bytes(wt, value))
            elif number == 3:
                resp.runtime_us = read_uint64(wt, value)
        return resp


# --- proxy connect data ------------------------------------------------------------------------


@dataclass(slots=True)
class SocketAddr:
    """common.SocketAddr: oneof ipv4=1 / ipv6=2, port=3. One without an address is refused."""

    ip: IPv4Address | IPv6Address
    port: int

    def encode(self) -> bytes:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")
        w = Writer()
        if isinstance(self.ip, IPv4Address):
            w.message(1, encode_ipv4(self.ip))
        else:
            w.message(2, encode_ipv6(self.ip))
        w.uint32(3, self.port)
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        ip: IPv4Address | IPv6Address | None = None
        port = 0
        for number, wt, value in iter_fields(data):
            if number == 1:
                ip = decode_ipv4(read_bytes(wt, value))
            elif number == 2:
                ip = decode_ipv6(read_bytes(wt, value))
            elif number == 3:
                port = read_uint32(wt, value)
        if ip is None:
            raise WireError("SocketAddr without an address")
        if port > 0xFFFF:
            raise WireError(f"SocketAddr port out of range: {port}")
        return cls(ip, port)


@dataclass(slots=True)
class KcpConnData:
    """The original TCP endpoints of a proxied flow (KCP SYN body, QUIC stream header)."""

    src: SocketAddr
    dst: SocketAddr

    def encode(self) -> bytes:
        w = Writer()
        w.message(1, self.src.encode())
        w.message(4, self.dst.encode())
        return w.getvalue()

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        src = dst = None
        for number, wt, value in iter_fields(data):
            if number == 1:
                src = SocketAddr.decode(read_bytes(wt, value))
            elif number == 4:
                dst = SocketAddr.decode(read_bytes(wt, value))
        if src is None or dst is None:
            raise WireError("KcpConnData needs both src and dst")
        return cls(src, dst)
