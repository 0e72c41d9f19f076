"""EasyTier protobuf messages: doc vectors, presence rules, round trips, hostile input."""

import contextlib
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytier.wire.errors import WireError
from pytier.wire.messages import (
    HandshakeRequest,
    KcpConnData,
    PeerFeatureFlag,
    PeerIdVersion,
    RouteConnBitmap,
    RouteConnPeerList,
    RoutePeerInfo,
    RpcCompressionInfo,
    RpcDescriptor,
    RpcError,
    RpcErrorKind,
    RpcPacket,
    RpcRequest,
    RpcResponse,
    SocketAddr,
    SyncRouteInfoError,
    SyncRouteInfoRequest,
    SyncRouteInfoResponse,
    decode_uuid,
    encode_uuid,
)
from pytier.wire.peer_header import PacketType, pack_header
from pytier.wire.protobuf import Writer, iter_fields
from pytier.wire.siphash import network_secret_digest
from pytier.wire.tunnel_frame import encode_tcp_frame

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=20)

handshakes = st.builds(
    HandshakeRequest,
    magic=u32,
    my_peer_id=u32,
    version=u32,
    features=st.lists(text, max_size=3),
    network_name=text,
    network_secret_digest=st.binary(max_size=40),
)
feature_flags = st.builds(PeerFeatureFlag, *[st.booleans() for _ in PeerFeatureFlag.FIELDS])
peer_infos = st.builds(
    RoutePeerInfo,
    peer_id=u32,
    inst_id=st.binary(min_size=16, max_size=16),
    cost=u32,
    ipv4_addr=st.none() | st.ip_addresses(v=4),
    proxy_cidrs=st.lists(text, max_size=3),
    hostname=st.none() | text,
    udp_nat_type=i32,
    last_update=st.none() | st.tuples(i64, i32),
    version=u32,
    easytier_version=text,
    feature_flag=feature_flags,
    peer_route_id=u64,
    network_length=u32,
)
peer_id_versions = st.builds(PeerIdVersion, u32, u32)


@st.composite
def conn_bitmaps(draw: st.DrawFn) -> RouteConnBitmap:
    ids = draw(st.lists(peer_id_versions, max_size=6))
    n = len(ids)
    extra = draw(st.integers(0, 3))
    bitmap = draw(st.binary(min_size=-(-n * n // 8) + extra, max_size=-(-n * n // 8) + extra))
    return RouteConnBitmap(ids, bitmap)


conn_peer_lists = st.builds(
    RouteConnPeerList, st.lists(st.tuples(peer_id_versions, st.lists(u32, max_size=4)), max_size=4)
)


@st.composite
def sync_requests(draw: st.DrawFn) -> SyncRouteInfoRequest:
    which = draw(st.sampled_from(["none", "bitmap", "list"]))
    return SyncRouteInfoRequest(
        my_peer_id=draw(u32),
        my_session_id=draw(u64),
        is_initiator=draw(st.booleans()),
        peer_infos=draw(st.none() | st.lists(peer_infos, max_size=3)),
        conn_bitmap=draw(conn_bitmaps()) if which == "bitmap" else None,
        conn_peer_list=draw(conn_peer_lists) if which == "list" else None,
    )


sync_responses = st.builds(SyncRouteInfoResponse, st.booleans(), u64, st.none() | i32)
descriptors = st.builds(RpcDescriptor, text, text, text, u32)
compression_infos = st.builds(RpcCompressionInfo, i32, i32)
rpc_packets = st.builds(
    RpcPacket,
    from_peer=u32,
    to_peer=u32,
    transaction_id=i64,
    descriptor=st.none() | descriptors,
    body=st.binary(max_size=50),
    is_request=st.booleans(),
    total_pieces=u32,
    piece_idx=u32,
    trace_id=i32,
    compression_info=st.none() | compression_infos,
)
rpc_requests = st.builds(RpcRequest, st.binary(max_size=50), i32)


@st.composite
def rpc_errors(draw: st.DrawFn) -> RpcError:
    kind = draw(st.sampled_from(list(RpcErrorKind)))
    if kind in (1, 6, 7, 8):
        return RpcError(kind, message=draw(text))
    if kind == RpcErrorKind.INVALID_SERVICE:
        return RpcError(kind, service_name=draw(text))
    if kind == RpcErrorKind.INVALID_METHOD_INDEX:
        return RpcError(kind, service_name=draw(text), method_index=draw(u32))
    return RpcError(kind)


rpc_responses = st.builds(RpcResponse, st.binary(max_size=50), st.none() | rpc_errors(), u64)
socket_addrs = st.builds(
    SocketAddr, st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535)
)
kcp_conn_datas = st.builds(KcpConnData, socket_addrs, socket_addrs)

ROUND_TRIPS: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (HandshakeRequest, handshakes),
    (PeerFeatureFlag, feature_flags),
    (RoutePeerInfo, peer_infos),
    (PeerIdVersion, peer_id_versions),
    (RouteConnBitmap, conn_bitmaps()),
    (RouteConnPeerList, conn_peer_lists),
    (SyncRouteInfoRequest, sync_requests()),
    (SyncRouteInfoResponse, sync_responses),
    (RpcDescriptor, descriptors),
    (RpcCompressionInfo, compression_infos),
    (RpcPacket, rpc_packets),
    (RpcRequest, rpc_requests),
    (RpcResponse, rpc_responses),
    (RpcError, rpc_errors()),
    (SocketAddr, socket_addrs),
    (KcpConnData, kcp_conn_datas),
]


@pytest.mark.parametrize(("cls", "strategy"), ROUND_TRIPS, ids=[c.__name__ for c, _ in ROUND_TRIPS])
def test_round_trip(cls: Any, strategy: st.SearchStrategy[Any]) -> None:
    @given(strategy)
    def check(msg: Any) -> None:
        encoded = msg.encode()
        decoded = cls.decode(encoded)
        assert decoded == msg
        assert decoded.encode() == encoded

    check()


def _fields(draw: st.DrawFn, depth: int) -> bytes:
    """A syntactically valid message with random fields, so decoders meet type mismatches and nesting."""
    w = Writer()
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.integers(1, 16))
        kind = draw(st.sampled_from(["varint", "len", "fixed32", "fixed64", "nested"]))
        if kind == "varint":
            w.optional_uint(number, draw(u64))
        elif kind == "len":
            w.message(number, draw(st.binary(max_size=12)))
        elif kind == "fixed32":
            w.fixed32(number, draw(st.integers(1, 2**32 - 1)))
        elif kind == "fixed64":
            w.fixed64(number, draw(st.integers(1, 2**64 - 1)))
        elif depth < 3:
            w.message(number, _fields(draw, depth + 1))
    return w.getvalue()


protobufish = st.composite(lambda draw: _fields(draw, 0))()
DECODERS: list[Callable[[bytes], object]] = [cls.decode for cls, _ in ROUND_TRIPS] + [decode_uuid]


@pytest.mark.parametrize("decode", DECODERS, ids=[getattr(d, "__qualname__", "") for d in DECODERS])
def test_hostile_input_raises_only_wire_error(decode: Callable[[bytes], object]) -> None:
    @given(st.one_of(st.binary(max_size=120), protobufish))
    def check(data: bytes) -> None:
        with contextlib.suppress(WireError):
            decode(data)

    check()


def test_handshake_frame_matches_doc_example() -> None:
    req = HandshakeRequest(
        my_peer_id=0x11223344,
        network_name="probe",
        network_secret_digest=network_secret_digest("probe", "probesecret"),
    )
    body = req.encode()
    frame = encode_tcp_frame(pack_header(0x11223344, 0, PacketType.HandShake, 0, 1, len(body)) + body)
    expected_start = bytes.fromhex(
        "47000000 44332211 00000000 02 00 01 00 37000000"
        "08e1cb868f0d 10c4e6888901 1801 2a0570726f6265 3220d406"
    )
    assert frame.startswith(expected_start)
    assert frame.endswith(bytes.fromhex("907f"))
    assert len(frame) == 4 + 0x47
    assert HandshakeRequest.decode(body) == req


def test_handshake_absent_fields_decode_as_proto3_defaults() -> None:
    assert HandshakeRequest.decode(b"") == HandshakeRequest(magic=0, version=0)


def test_kcp_conn_data_vector() -> None:
    data = bytes.fromhex("0a0b0a050883a0c254189cd202220a0a050881a0c25418d936")
    conn = KcpConnData.decode(data)
    assert conn == KcpConnData(
        SocketAddr(IPv4Address("10.144.144.3"), 43292), SocketAddr(IPv4Address("10.144.144.1"), 7001)
    )
    assert conn.encode() == data


def test_socket_addr_ipv6_quarters_and_refusals() -> None:
    addr = SocketAddr(IPv6Address("fd00::1:2"), 443)
    encoded = addr.encode()
    inner = next(v for n, _, v in iter_fields(encoded) if n == 2)
    assert isinstance(inner, bytes)
    parts = {n: v for n, _, v in iter_fields(inner)}
    assert parts == {1: 0xFD000000, 4: 0x00010002}
    with pytest.raises(WireError):
        SocketAddr.decode(bytes.fromhex("18bb03"))  # port only
    with pytest.raises(WireError):
        SocketAddr.decode(bytes.fromhex("0a00 18808004"))  # port 65536
    with pytest.raises(WireError):
        KcpConnData.decode(bytes.fromhex("0a0b0a050883a0c254189cd202"))  # no dst


def test_uuid_is_big_endian_quarters() -> None:
    raw = bytes.fromhex("00112233445566778899aabbccddeeff")
    parts = {n: v for n, _, v in iter_fields(encode_uuid(raw))}
    assert parts == {1: 0x00112233, 2: 0x44556677, 3: 0x8899AABB, 4: 0xCCDDEEFF}
    assert decode_uuid(encode_uuid(raw)) == raw


def test_ipv4_addr_is_big_endian_u32() -> None:
    info = RoutePeerInfo(peer_id=1, ipv4_addr=IPv4Address("10.144.144.1"), version=1)
    ipv4_field = next(v for n, _, v in iter_fields(info.encode()) if n == 4)
    assert isinstance(ipv4_field, bytes)
    assert list(iter_fields(ipv4_field)) == [(1, 0, 177246209)]


def test_feature_flag_names() -> None:
    flags = PeerFeatureFlag(kcp_input=True, support_conn_list_sync=True, quic_input=True)
    assert flags.names() == ["kcp_input", "support_conn_list_sync", "quic_input"]
    assert PeerFeatureFlag.from_names(flags.names()) == flags
    assert flags.encode() == bytes.fromhex("1801 2801 3001")
    with pytest.raises(ValueError):
        PeerFeatureFlag.from_names(["bogus"])


def test_route_peer_info_relayed_byte_exact() -> None:
    mine = RoutePeerInfo(peer_id=7, version=3, hostname="a", ipv4_addr=IPv4Address("10.0.0.7"))
    extra = Writer()
    extra.message(15, bytes.fromhex("0a0808fd1020011801"))  # ipv6_addr, unknown to this class
    extra.message(16, bytes.fromhex("0a0167"))  # groups
    extra.uint(99, 5)
    foreign = mine.encode() + extra.getvalue()
    decoded = RoutePeerInfo.decode(foreign)
    assert decoded == mine
    assert decoded.raw == foreign
    assert decoded.encode() == foreign
    assert decoded.encode_fields() == mine.encode()

    req = SyncRouteInfoRequest(my_peer_id=1, peer_infos=[decoded])
    relayed = SyncRouteInfoRequest.decode(req.encode())
    assert relayed.peer_infos is not None
    assert relayed.peer_infos[0].raw == foreign


def test_route_peer_info_presence() -> None:
    info = RoutePeerInfo.decode(RoutePeerInfo(hostname="", last_update=(0, 0)).encode())
    assert info.hostname == ""
    assert info.last_update == (0, 0)
    assert info.ipv4_addr is None
    absent = RoutePeerInfo.decode(b"")
    assert absent.hostname is None and absent.last_update is None


def test_conn_bitmap_edges_and_wire_example() -> None:
    # The wire example: ids [Py, A], bitmap 04 means A -> Py.
    bm = RouteConnBitmap([PeerIdVersion(100, 1), PeerIdVersion(200, 1)], b"\x04")
    assert bm.edges() == {(200, 100)}
    built = RouteConnBitmap.from_edges([(100, 1), (200, 1)], {(200, 100)})
    assert built == bm
    both = RouteConnBitmap.from_edges([(1, 1), (2, 1), (3, 1)], {(1, 2), (2, 1), (3, 3)})
    assert both.bitmap == bytes([0b00001000 | 0b00000010, 0b00000001])
    assert both.edges() == {(1, 2), (2, 1), (3, 3)}
    with pytest.raises(ValueError):
        RouteConnBitmap.from_edges([(1, 1)], {(1, 9)})


@given(st.lists(u32, unique=True, max_size=8), st.data())
def test_conn_bitmap_from_edges_round_trip(ids: list[int], data: st.DataObject) -> None:
    pairs = st.tuples(st.sampled_from(ids), st.sampled_from(ids))
    edges = data.draw(st.sets(pairs, max_size=20)) if ids else set()
    bm = RouteConnBitmap.from_edges([PeerIdVersion(i, 1) for i in ids], edges)
    assert len(bm.bitmap) == -(-(len(ids) ** 2) // 8)
    assert RouteConnBitmap.decode(bm.encode()).edges() == edges


def test_conn_bitmap_too_short_is_refused_both_ways() -> None:
    ids = [PeerIdVersion(i, 1) for i in range(3)]  # needs ceil(9/8) = 2 bytes
    short = RouteConnBitmap(ids, b"\xff")
    with pytest.raises(ValueError):
        short.encode()
    w = Writer()
    w.repeated_message(1, (p.encode() for p in ids))
    w.bytes_(2, b"\xff")
    with pytest.raises(WireError):
        RouteConnBitmap.decode(w.getvalue())
    w2 = Writer()
    w2.repeated_message(1, (p.encode() for p in ids))
    with pytest.raises(WireError):
        SyncRouteInfoRequest.decode(Writer().getvalue() + bytes([0x2A, len(w2.getvalue())]) + w2.getvalue())


def test_conn_peer_list_accepts_packed_and_unpacked() -> None:
    pv = PeerIdVersion(5, 2).encode()
    packed = bytes([0x0A, len(pv)]) + pv + bytes.fromhex("1202 0708")
    unpacked = bytes([0x0A, len(pv)]) + pv + bytes.fromhex("1007 1008")
    for item in (packed, unpacked):
        msg = bytes([0x0A, len(item)]) + item
        assert RouteConnPeerList.decode(msg) == RouteConnPeerList([(PeerIdVersion(5, 2), [7, 8])])
    assert RouteConnPeerList([(PeerIdVersion(5, 2), [7, 8])]).edges() == {(5, 7), (5, 8)}


def test_sync_request_oneof_and_foreign_infos() -> None:
    with pytest.raises(ValueError):
        SyncRouteInfoRequest(conn_bitmap=RouteConnBitmap(), conn_peer_list=RouteConnPeerList()).encode()
    req = SyncRouteInfoRequest(my_peer_id=1, peer_infos=[], conn_bitmap=RouteConnBitmap())
    encoded = req.encode()
    assert 6 not in {n for n, _, _ in iter_fields(encoded)}
    assert bytes.fromhex("2200") in encoded  # an empty peer_infos list is still present
    # A later conn_peer_list replaces an earlier conn_bitmap, as a oneof does.
    later = encoded + bytes.fromhex("3a00")
    decoded = SyncRouteInfoRequest.decode(later)
    assert decoded.conn_bitmap is None and decoded.conn_peer_list == RouteConnPeerList()
    # foreign_network_infos (6) is skipped.
    assert SyncRouteInfoRequest.decode(encoded + bytes.fromhex("3202 0a00")) == req


def test_sync_response_error_presence() -> None:
    # A present DuplicatePeerId (0) panics real nodes: it must be encoded only when asked for.
    assert SyncRouteInfoResponse(True, 5).encode() == bytes.fromhex("0801 1005")
    present = SyncRouteInfoResponse(True, 5, SyncRouteInfoError.DUPLICATE_PEER_ID).encode()
    assert present == bytes.fromhex("0801 1005 1800")
    assert SyncRouteInfoResponse.decode(present).error == 0
    assert SyncRouteInfoResponse.decode(bytes.fromhex("0801")).error is None


def test_rpc_packet_negative_transaction_id() -> None:
    pkt = RpcPacket(from_peer=1, to_peer=2, transaction_id=-5, is_request=True)
    encoded = pkt.encode()
    assert bytes.fromhex("18fbffffffffffffffff01") in encoded
    assert RpcPacket.decode(encoded).transaction_id == -5


def test_rpc_packet_absent_total_pieces_is_legacy_zero() -> None:
    assert RpcPacket.decode(b"").total_pieces == 0


def test_rpc_compression_info_default_is_none_none() -> None:
    assert RpcCompressionInfo().encode() == bytes.fromhex("0801 1001")


def test_rpc_error_kinds() -> None:
    err = RpcError(RpcErrorKind.INVALID_SERVICE, service_name="Foo")
    assert err.encode() == bytes.fromhex("1a05 0a03466f6f")
    idx = RpcError(RpcErrorKind.INVALID_METHOD_INDEX, service_name="S", method_index=9)
    assert RpcError.decode(idx.encode()) == idx
    assert RpcError(RpcErrorKind.PROST_DECODE_ERROR).encode() == bytes.fromhex("2200")
    resp = RpcResponse(error=RpcError(RpcErrorKind.TIMEOUT, message="late"))
    assert RpcResponse.decode(resp.encode()) == resp
    with pytest.raises(ValueError):
        RpcError(9).encode()


def test_rpc_request_layout() -> None:
    assert RpcRequest(b"\x01", 3000).encode() == bytes.fromhex("120101 18b817")
