"""Peer RPC: framing, fragmentation, dispatch, errors and timeouts (sans-IO core and asyncio shell)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytier.peers.rpc import (
    MAX_RPC_PACKET_BYTES,
    RPC_REQ,
    RPC_RESP,
    ErrorReceived,
    Outgoing,
    PeerRpc,
    RequestReceived,
    RequestTimedOut,
    ResponseReceived,
    RpcCallError,
    RpcCore,
)
from pytier.wire.errors import WireError
from pytier.wire.messages import (
    CompressionAlgo,
    RpcCompressionInfo,
    RpcDescriptor,
    RpcErrorKind,
    RpcPacket,
    RpcRequest,
    RpcResponse,
)

NET = "pytier-test-net"
A, B, C = 101, 202, 303


def deliver(core: RpcCore, packets: list[Outgoing], now: float = 0.0) -> tuple[list[Any], list[Outgoing]]:
    events: list[Any] = []
    replies: list[Outgoing] = []
    for out in packets:
        ev, rep = core.receive(from_peer_of(out), out.packet_type, out.payload, now)
        events += ev
        replies += rep
    return events, replies


def from_peer_of(out: Outgoing) -> int:
    return RpcPacket.decode(out.payload).from_peer


# ---- core: framing ----------------------------------------------------------------------------


def test_request_framing_matches_the_protocol() -> None:
    core = RpcCore(A, NET, first_transaction_id=77)
    tx, packets = core.request(B, "OspfRouteRpc", 1, b"hello", timeout_s=3.0, now=0.0)
    assert tx == 77
    assert len(packets) == 1
    out = packets[0]
    assert (out.to_peer, out.packet_type) == (B, RPC_REQ)
    pkt = RpcPacket.decode(out.payload)
    assert (pkt.from_peer, pkt.to_peer, pkt.transaction_id, pkt.is_request) == (A, B, 77, True)
    assert pkt.descriptor == RpcDescriptor(NET, "OspfRouteRpc", "OspfRouteRpc", 1)
    assert (pkt.total_pieces, pkt.piece_idx, pkt.trace_id) == (1, 0, 0)
    assert pkt.compression_info == RpcCompressionInfo(CompressionAlgo.NONE, CompressionAlgo.NONE)
    envelope = RpcRequest.decode(pkt.body)
    assert envelope == RpcRequest(b"hello", 3000)
    tx2, _ = core.request(B, "OspfRouteRpc", 1, b"", timeout_s=0.0001, now=0.0)
    assert tx2 == 78
    # timeout_ms must never be 0 (a real server fails the call at once).
    assert RpcRequest.decode(RpcPacket.decode(_[0].payload).body).timeout_ms >= 1


def test_transaction_ids_start_random() -> None:
    ids = {RpcCore(A, NET).request(B, "S", 1, b"", timeout_s=1, now=0)[0] for _ in range(8)}
    assert len(ids) == 8
    assert all(0 < tx < 1 << 63 for tx in ids)


@pytest.mark.parametrize("size", [0, 1, 1100, 1200, 5000, 70_000])
def test_fragmentation_round_trip_in_any_order(size: int) -> None:
    client = RpcCore(A, NET)
    server = RpcCore(B, NET)
    server.register("BigRpc", 3)
    body = random.Random(size).randbytes(size)
    tx, packets = client.request(B, "BigRpc", 3, body, timeout_s=5, now=0)
    for out in packets:
        assert len(out.payload) <= MAX_RPC_PACKET_BYTES
    pieces = [RpcPacket.decode(o.payload) for o in packets]
    assert [p.piece_idx for p in pieces] == list(range(len(packets)))
    assert {p.total_pieces for p in pieces} == {len(packets)}
    assert all(p.descriptor is not None for p in pieces)
    assert [p.compression_info is not None for p in pieces] == [True] + [False] * (len(pieces) - 1)
    shuffled = packets[:]
    random.Random(1).shuffle(shuffled)
    events, replies = deliver(server, shuffled)
    assert replies == []
    assert len(events) == 1
    req = events[0]
    assert isinstance(req, RequestReceived)
    assert (req.from_peer, req.transaction_id, req.service, req.method_index) == (A, tx, "BigRpc", 3)
    assert req.request == body

    answer = body[::-1] + b"!"
    resp_packets = server.respond(req, answer, runtime_us=12)
    assert all(len(o.payload) <= MAX_RPC_PACKET_BYTES for o in resp_packets)
    first = RpcPacket.decode(resp_packets[0].payload)
    assert (first.from_peer, first.to_peer, first.transaction_id, first.is_request) == (B, A, tx, False)
    assert first.descriptor == req.descriptor
    events, _ = deliver(client, list(reversed(resp_packets)))
    assert events == [ResponseReceived(B, tx, answer)]
    assert client.pending_count() == 0


def test_legacy_unfragmented_packet_is_accepted() -> None:
    server = RpcCore(B, NET)
    server.register("S", 1)
    pkt = RpcPacket(
        from_peer=A,
        to_peer=B,
        transaction_id=5,
        descriptor=RpcDescriptor(NET, "S", "S", 1),
        body=RpcRequest(b"x", 1000).encode(),
        is_request=True,
        total_pieces=0,
    )
    events, _ = server.receive(A, RPC_REQ, pkt.encode(), 0)
    assert [type(e) for e in events] == [RequestReceived]


# ---- core: errors -----------------------------------------------------------------------------


def _call_and_get_reply(server: RpcCore, service: str, method: int, domain: str = NET) -> RpcResponse:
    client = RpcCore(A, domain)
    tx, packets = client.request(B, service, method, b"", timeout_s=1, now=0)
    events, replies = deliver(server, packets)
    assert events == []
    assert len(replies) == 1
    pkt = RpcPacket.decode(replies[0].payload)
    assert replies[0].packet_type == RPC_RESP
    assert (pkt.to_peer, pkt.transaction_id) == (A, tx)
    return RpcResponse.decode(pkt.body)


def test_unknown_service_and_method_get_error_replies() -> None:
    server = RpcCore(B, NET)
    server.register("Known", 1)
    err = _call_and_get_reply(server, "Nope", 1).error
    assert err is not None
    assert (err.kind, err.service_name) == (RpcErrorKind.INVALID_SERVICE, "Nope")
    err = _call_and_get_reply(server, "Known", 2).error
    assert err is not None
    assert (err.kind, err.service_name, err.method_index) == (RpcErrorKind.INVALID_METHOD_INDEX, "Known", 2)
    # The registry is per network (descriptor domain).
    err = _call_and_get_reply(server, "Known", 1, domain="other-net").error
    assert err is not None
    assert err.kind == RpcErrorKind.INVALID_SERVICE


def test_error_reply_reaches_the_caller() -> None:
    client = RpcCore(A, NET)
    server = RpcCore(B, NET)
    _tx, packets = client.request(B, "Nope", 1, b"", timeout_s=1, now=0)
    _, replies = deliver(server, packets)
    events, _ = deliver(client, replies)
    assert len(events) == 1
    assert isinstance(events[0], ErrorReceived)
    assert events[0].error.kind == RpcErrorKind.INVALID_SERVICE
    assert client.pending_count() == 0


def test_compressed_request_is_refused_not_misread() -> None:
    server = RpcCore(B, NET)
    server.register("S", 1)
    pkt = RpcPacket(
        from_peer=A,
        to_peer=B,
        transaction_id=9,
        descriptor=RpcDescriptor(NET, "S", "S", 1),
        body=b"\x28\xb5\x2f\xfd garbage",
        is_request=True,
        compression_info=RpcCompressionInfo(CompressionAlgo.ZSTD, CompressionAlgo.ZSTD),
    )
    events, replies = server.receive(A, RPC_REQ, pkt.encode(), 0)
    assert events == []
    err = RpcResponse.decode(RpcPacket.decode(replies[0].payload).body).error
    assert err is not None and err.kind == RpcErrorKind.MALFORMAT_RPC_PACKET


# ---- core: matching, timeouts, reassembly limits ------------------------------------------------


def test_timeout_and_late_answer() -> None:
    client = RpcCore(A, NET)
    server = RpcCore(B, NET)
    server.register("S", 1)
    tx, packets = client.request(B, "S", 1, b"q", timeout_s=3.0, now=100.0)
    assert client.next_timer() == 103.0
    assert client.handle_timer(102.9) == []
    assert client.handle_timer(103.0) == [RequestTimedOut(B, tx)]
    assert client.next_timer() is None
    events, _ = deliver(server, packets)
    late = server.respond(events[0], b"late")
    assert deliver(client, late) == ([], [])
    assert client.dropped["unmatched_response"] == 1


def test_response_from_another_peer_is_not_matched() -> None:
    client = RpcCore(A, NET)
    server = RpcCore(B, NET)
    server.register("S", 1)
    _tx, packets = client.request(B, "S", 1, b"q", timeout_s=3.0, now=0)
    events, _ = deliver(server, packets)
    forged = server.respond(events[0], b"x")
    events2, _ = client.receive(C, RPC_RESP, forged[0].payload, 0)
    assert events2 == []
    assert client.pending_count() == 1


def test_incomplete_merge_expires_after_ten_seconds() -> None:
    client = RpcCore(A, NET)
    server = RpcCore(B, NET)
    server.register("S", 1)
    _, packets = client.request(B, "S", 1, bytes(5000), timeout_s=30, now=0)
    assert len(packets) > 2
    assert deliver(server, packets[:-1], now=0.0) == ([], [])
    events, _ = deliver(server, packets[-1:], now=10.5)
    assert events == []
    assert server.dropped["reassembly_expired"] == 1
    events, _ = deliver(server, packets, now=11.0)
    assert [type(e) for e in events] == [RequestReceived]


def test_reassembly_limits() -> None:
    server = RpcCore(B, NET, max_reassembly_bytes=3000)
    server.register("S", 1)

    def piece(tx: int, total: int, idx: int, size: int = 1000) -> bytes:
        return RpcPacket(
            from_peer=A,
            to_peer=B,
            transaction_id=tx,
            descriptor=RpcDescriptor(NET, "S", "S", 1),
            body=bytes(size),
            is_request=True,
            total_pieces=total,
            piece_idx=idx,
        ).encode()

    server.receive(A, RPC_REQ, piece(1, 32769, 0), 0)
    assert server.dropped["bad_piece_index"] == 1
    server.receive(A, RPC_REQ, piece(1, 4, 4), 0)
    assert server.dropped["bad_piece_index"] == 2
    for idx in range(3):
        server.receive(A, RPC_REQ, piece(2, 32768, idx), 0)
    server.receive(A, RPC_REQ, piece(2, 32768, 3), 0)
    assert server.dropped["reassembly_memory"] == 1
    # The memory came back: a new merge fits again.
    server.receive(A, RPC_REQ, piece(3, 2, 0), 0)
    events, replies = server.receive(A, RPC_REQ, piece(3, 2, 1), 0)
    # It reassembled: 2000 zero bytes are no RpcRequest, and the answer says so.
    assert events == []
    err = RpcResponse.decode(RpcPacket.decode(replies[0].payload).body).error
    assert err is not None and err.kind == RpcErrorKind.MALFORMAT_RPC_PACKET
    server.receive(A, RPC_REQ, piece(4, 3, 0), 0)
    server.receive(A, RPC_REQ, piece(4, 5, 1), 0)
    assert server.dropped["inconsistent_pieces"] == 1


def test_requests_and_responses_from_one_peer_reassemble_apart() -> None:
    # A's own transaction ids and the ids of our calls to A may collide; pieces must not mix.
    a = RpcCore(A, NET, first_transaction_id=50)
    b = RpcCore(B, NET, first_transaction_id=50)
    a.register("S", 1)
    b.register("S", 1)
    tx_b, req_from_b = b.request(A, "S", 1, bytes(3000), timeout_s=5, now=0)
    tx_a, req_from_a = a.request(B, "S", 1, bytes(3000), timeout_s=5, now=0)
    assert tx_a == tx_b
    _ev_b, _ = deliver(b, req_from_a[:1])
    ev_a, _ = deliver(a, req_from_b)
    resp_from_a = a.respond(ev_a[0], bytes(4000))
    ev_b2, _ = deliver(b, resp_from_a)
    assert [type(e) for e in ev_b2] == [ResponseReceived]
    ev_b3, _ = deliver(b, req_from_a[1:])
    assert [type(e) for e in ev_b3] == [RequestReceived]


def test_garbage_and_misaddressed_packets_are_counted() -> None:
    core = RpcCore(B, NET)
    assert core.receive(A, 1, b"whatever", 0) == ([], [])
    assert core.receive(A, RPC_REQ, b"\xff\xff\xff", 0) == ([], [])
    to_other = RpcPacket(from_peer=A, to_peer=C, transaction_id=1, is_request=True).encode()
    assert core.receive(A, RPC_REQ, to_other, 0) == ([], [])
    flag_mismatch = RpcPacket(from_peer=A, to_peer=B, transaction_id=1, is_request=False).encode()
    assert core.receive(A, RPC_REQ, flag_mismatch, 0) == ([], [])
    assert core.dropped["packet_type"] == 1
    assert core.dropped["malformed_packet"] == 1
    assert core.dropped["not_for_me"] == 1
    assert core.dropped["request_flag_mismatch"] == 1


@settings(max_examples=300, deadline=None)
@given(packet_type=st.sampled_from([RPC_REQ, RPC_RESP, 0, 7]), payload=st.binary(max_size=300))
def test_core_never_raises_on_garbage(packet_type: int, payload: bytes) -> None:
    core = RpcCore(B, NET)
    core.register("S", 1)
    core.receive(A, packet_type, payload, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    tx=st.integers(-(1 << 63), (1 << 63) - 1),
    total=st.integers(0, 70000),
    idx=st.integers(0, 70000),
    body=st.binary(max_size=64),
    is_request=st.booleans(),
    algo=st.integers(-5, 5),
    service=st.sampled_from(["S", "", "X"]),
    method=st.integers(0, 3),
)
def test_core_never_raises_on_well_formed_nonsense(
    tx: int, total: int, idx: int, body: bytes, is_request: bool, algo: int, service: str, method: int
) -> None:
    core = RpcCore(B, NET)
    core.register("S", 1)
    pkt = RpcPacket(
        from_peer=A,
        to_peer=B,
        transaction_id=tx,
        descriptor=RpcDescriptor(NET, service, service, method),
        body=body,
        is_request=is_request,
        total_pieces=total,
        piece_idx=idx,
        compression_info=RpcCompressionInfo(algo, algo),
    )
    core.receive(A, RPC_REQ if is_request else RPC_RESP, pkt.encode(), 0.0)


# ---- asyncio shell ------------------------------------------------------------------------------


class Loopback:
    """Delivers each send() to the addressed PeerRpc on the next loop pass, and records it."""

    def __init__(self) -> None:
        self.nodes: dict[int, PeerRpc] = {}
        self.sent: list[tuple[int, int, int, bytes]] = []
        self.blackholed: set[int] = set()

    def add(self, peer_id: int) -> PeerRpc:
        rpc = PeerRpc(peer_id, NET, self.sender(peer_id))
        self.nodes[peer_id] = rpc
        return rpc

    def sender(self, src: int) -> Callable[[int, int, bytes], bool]:
        def send(to_peer: int, packet_type: int, payload: bytes) -> bool:
            self.sent.append((src, to_peer, packet_type, payload))
            node = self.nodes.get(to_peer)
            if node is None:
                return False
            if to_peer not in self.blackholed:
                asyncio.get_running_loop().call_soon(node.on_packet, src, packet_type, payload)
            return True

        return send


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


def test_shell_call_sync_and_async_handlers_with_large_bodies() -> None:
    async def main() -> None:
        net = Loopback()
        a, b = net.add(A), net.add(B)

        def echo(from_peer: int, body: bytes) -> bytes:
            return from_peer.to_bytes(4, "big") + body

        async def slow_upper(_from_peer: int, body: bytes) -> bytes:
            await asyncio.sleep(0.01)
            return body.upper()

        b.register("Echo", 1, echo)
        b.register("Echo", 2, slow_upper)
        big = bytes(range(256)) * 40
        assert await a.call(B, "Echo", 1, big) == A.to_bytes(4, "big") + big
        assert await a.call(B, "Echo", 2, b"abc" * 1000) == b"ABC" * 1000
        results = await asyncio.gather(*(a.call(B, "Echo", 1, bytes([i])) for i in range(20)))
        assert results == [A.to_bytes(4, "big") + bytes([i]) for i in range(20)]
        assert all(len(p) <= MAX_RPC_PACKET_BYTES for *_, p in net.sent)
        a.close()
        b.close()

    run(main())


def test_shell_error_kinds() -> None:
    async def main() -> None:
        net = Loopback()
        a, b = net.add(A), net.add(B)

        def boom(_f: int, _b: bytes) -> bytes:
            raise RuntimeError("kaputt")

        def undecodable(_f: int, _b: bytes) -> bytes:
            raise WireError("bad protobuf")

        async def too_slow(_f: int, _b: bytes) -> bytes:
            await asyncio.sleep(5)
            return b""

        b.register("Svc", 1, boom)
        b.register("Svc", 2, undecodable)
        b.register("Svc", 3, too_slow)
        cases: list[tuple[str, int, int]] = [
            ("Nope", 1, RpcErrorKind.INVALID_SERVICE),
            ("Svc", 9, RpcErrorKind.INVALID_METHOD_INDEX),
            ("Svc", 1, RpcErrorKind.EXECUTE_ERROR),
            ("Svc", 2, RpcErrorKind.PROST_DECODE_ERROR),
        ]
        for service, method, kind in cases:
            with pytest.raises(RpcCallError) as info:
                await a.call(B, service, method, b"")
            assert info.value.kind == kind, (service, method)
        with pytest.raises(RpcCallError, match="kaputt"):
            await a.call(B, "Svc", 1, b"")
        # The server runs the handler under the caller's timeout and answers with a timeout error;
        # here the caller's own timer fires at the same moment.
        with pytest.raises(RpcCallError) as info:
            await a.call(B, "Svc", 3, b"", timeout_s=0.05)
        assert info.value.kind == RpcErrorKind.TIMEOUT
        a.close()
        b.close()

    run(main())


def test_shell_peer_center_is_answered_empty() -> None:
    async def main() -> None:
        net = Loopback()
        a, _b = net.add(A), net.add(B)
        assert await a.call(B, "PeerCenterRpc", 1, b"\x08\x01") == b""
        assert await a.call(B, "PeerCenterRpc", 2, b"\x08\x07") == b""

    run(main())


def test_shell_timeout_and_no_route_and_close() -> None:
    async def main() -> None:
        net = Loopback()
        a, _b = net.add(A), net.add(B)
        net.blackholed.add(B)
        with pytest.raises(RpcCallError) as info:
            await a.call(B, "PeerCenterRpc", 1, b"", timeout_s=0.05)
        assert info.value.kind == RpcErrorKind.TIMEOUT
        with pytest.raises(RpcCallError, match="no route"):
            await a.call(999, "PeerCenterRpc", 1, b"")
        pending = asyncio.ensure_future(a.call(B, "PeerCenterRpc", 1, b"", timeout_s=10))
        await asyncio.sleep(0.01)
        a.close()
        with pytest.raises(RpcCallError, match="closed"):
            await pending
        with pytest.raises(RpcCallError):
            await a.call(B, "PeerCenterRpc", 1, b"")
        a.on_packet(B, RPC_RESP, b"")  # after close: dropped, not raised

    run(main())


def test_shell_cancelled_call_forgets_its_transaction() -> None:
    async def main() -> None:
        net = Loopback()
        a, _b = net.add(A), net.add(B)
        net.blackholed.add(B)
        task = asyncio.ensure_future(a.call(B, "PeerCenterRpc", 1, b"", timeout_s=10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a._core.pending_count() == 0

    run(main())


@settings(max_examples=200, deadline=None)
@given(
    from_peer=st.integers(0, 0xFFFFFFFF),
    packet_type=st.integers(0, 255),
    payload=st.binary(max_size=400),
)
def test_shell_on_packet_never_raises(from_peer: int, packet_type: int, payload: bytes) -> None:
    rpc = PeerRpc(B, NET, lambda *_: None)
    rpc.on_packet(from_peer, packet_type, payload)
    rpc.on_packet(from_peer, RPC_REQ, payload)
    rpc.on_packet(from_peer, RPC_RESP, payload)
