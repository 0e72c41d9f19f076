"""Peer RPC: EasyTier's RpcPacket framing (protocol notes §5.1-5.5).

`RpcCore` is sans-IO: it turns calls and answers into peer payloads (fragmented so every encoded
RpcPacket stays within one UDP tunnel packet), reassembles incoming pieces, matches responses to
pending requests and reports timeouts for the time it is given. `PeerRpc` is the asyncio shell the
node uses: handlers by (service, method index), awaitable calls, one loop timer.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from pytier.wire.errors import WireError
from pytier.wire.messages import (
    CompressionAlgo,
    RpcCompressionInfo,
    RpcDescriptor,
    RpcError,
    RpcErrorKind,
    RpcPacket,
    RpcRequest,
    RpcResponse,
)
from pytier.wire.peer_header import PacketType
from pytier.wire.protobuf import encode_varint

log = logging.getLogger(__name__)

RPC_REQ = int(PacketType.RpcReq)
RPC_RESP = int(PacketType.RpcResp)

MAX_RPC_PACKET_BYTES = 1200  # one encoded RpcPacket; leaves room for headers and the AEAD tail (§5.4)
MAX_TOTAL_PIECES = 32768  # the real node's merge limit
REASSEMBLY_TIMEOUT_S = 10.0
MAX_REASSEMBLY_BYTES = 16 * 1024 * 1024  # all incomplete merges together
MAX_MERGES = 1024
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_MS = (1 << 31) - 1  # RpcRequest.timeout_ms is an int32

PEER_CENTER_SERVICE = "PeerCenterRpc"
PEER_CENTER_REPORT_PEERS = 1
PEER_CENTER_GET_GLOBAL_PEER_MAP = 2


class Outgoing(NamedTuple):
    """One plaintext peer payload to hand to the node's send path."""

    to_peer: int
    packet_type: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A complete request for a registered (service, method); answer it with `RpcCore.respond`."""

    from_peer: int
    transaction_id: int
    descriptor: RpcDescriptor
    request: bytes
    timeout_ms: int

    @property
    def service(self) -> str:
        return self.descriptor.service_name

    @property
    def method_index(self) -> int:
        return self.descriptor.method_index


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    peer: int
    transaction_id: int
    response: bytes


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The peer answered a pending request with an error (or with something unusable)."""

    peer: int
    transaction_id: int
    error: RpcError


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    peer: int
    transaction_id: int


RpcEvent = RequestReceived | ResponseReceived | ErrorReceived | RequestTimedOut


@dataclass(slots=True)
class _Merge:
    total: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    descriptor: RpcDescriptor | None = None
    compression: RpcCompressionInfo | None = None


@dataclass(frozen=True, slots=True)
class _Whole:
    descriptor: RpcDescriptor | None
    compression: RpcCompressionInfo | None
    body: bytes


class RpcCore:
    """Sans-IO peer RPC endpoint for one node; `now` is any monotonic clock in seconds."""

    def __init__(
        self,
        my_peer_id: int,
        network_name: str,
        *,
        max_packet_bytes: int = MAX_RPC_PACKET_BYTES,
        reassembly_timeout_s: float = REASSEMBLY_TIMEOUT_S,
        max_reassembly_bytes: int = MAX_REASSEMBLY_BYTES,
        first_transaction_id: int | None = None,
    ) -> None:
        self.my_peer_id = my_peer_id
        self.network_name = network_name
        self.max_packet_bytes = max_packet_bytes
        self.reassembly_timeout_s = reassembly_timeout_s
        self.max_reassembly_bytes = max_reassembly_bytes
        self.dropped: collections.Counter[str] = collections.Counter()
        self._next_tx = first_transaction_id if first_transaction_id is not None else secrets.randbits(62) + 1
        self._methods: dict[str, set[int]] = {}
        self._pending: dict[tuple[int, int], float] = {}  # (peer, transaction id) -> deadline
        # Keyed with is_request too: the peer's own transaction ids and ours live in separate spaces.
        self._merges: dict[tuple[int, int, bool], _Merge] = {}
        self._merge_bytes = 0
        self._chunk_sizes: dict[tuple[str, int], int] = {}

    # ---- registry -------------------------------------------------------------------------------

    def register(self, service: str, method_index: int) -> None:
        self._methods.setdefault(service, set()).add(method_index)

    def unregister(self, service: str, method_index: int) -> None:
        methods = self._methods.get(service)
        if methods is not None:
            methods.discard(method_index)
            if not methods:
                del self._methods[service]

    # ---- client side ----------------------------------------------------------------------------

    def request(
        self,
        to_peer: int,
        service: str,
        method_index: int,
        body: bytes,
        *,
        timeout_s: float,
        now: float,
    ) -> tuple[int, list[Outgoing]]:
        """Start a call; returns its transaction id and the pieces to send."""
        tx = self._next_tx
        self._next_tx = tx + 1 if tx < (1 << 63) - 1 else 1
        timeout_ms = min(MAX_TIMEOUT_MS, max(1, round(timeout_s * 1000)))
        descriptor = RpcDescriptor(self.network_name, service, service, method_index)
        envelope = RpcRequest(request=body, timeout_ms=timeout_ms).encode()
        packets = self._split(to_peer, RPC_REQ, tx, descriptor, envelope)
        self._pending[(to_peer, tx)] = now + timeout_s
        return tx, packets

    def cancel(self, to_peer: int, transaction_id: int) -> None:
        """Forget a pending call (its caller gave up); a late answer is then dropped."""
        self._pending.pop((to_peer, transaction_id), None)

    def pending_count(self) -> int:
        return len(self._pending)

    # ---- server side ----------------------------------------------------------------------------

    def respond(
        self, req: RequestReceived, result: bytes | RpcError, *, runtime_us: int = 0
    ) -> list[Outgoing]:
        """Pieces answering `req` with a response body or an error."""
        if isinstance(result, RpcError):
            envelope = RpcResponse(error=result, runtime_us=runtime_us).encode()
        else:
            envelope = RpcResponse(response=result, runtime_us=runtime_us).encode()
        return self._split(req.from_peer, RPC_RESP, req.transaction_id, req.descriptor, envelope)

    # ---- input ----------------------------------------------------------------------------------

    def receive(
        self, from_peer: int, packet_type: int, payload: bytes, now: float
    ) -> tuple[list[RpcEvent], list[Outgoing]]:
        """Feed one decrypted RpcReq/RpcResp payload; returns events and any error replies to send.

        Garbage is counted in `dropped` and never raises.
        """
        self._expire_merges(now)
        if packet_type not in (RPC_REQ, RPC_RESP):
            self.dropped["packet_type"] += 1
            return [], []
        try:
            pkt = RpcPacket.decode(payload)
        except WireError:
            self.dropped["malformed_packet"] += 1
            return [], []
        is_request = packet_type == RPC_REQ
        if pkt.is_request != is_request:
            self.dropped["request_flag_mismatch"] += 1
            return [], []
        if pkt.to_peer != self.my_peer_id:
            self.dropped["not_for_me"] += 1
            return [], []
        if not is_request and (from_peer, pkt.transaction_id) not in self._pending:
            self.dropped["unmatched_response"] += 1
            return [], []
        whole = self._reassemble(from_peer, pkt, now)
        if whole is None:
            return [], []
        if is_request:
            return self._on_request(from_peer, pkt.transaction_id, whole)
        return [self._on_response(from_peer, pkt.transaction_id, whole)], []

    def handle_timer(self, now: float) -> list[RpcEvent]:
        """Expire calls whose deadline passed (and stale fragment merges)."""
        self._expire_merges(now)
        expired = [key for key, deadline in self._pending.items() if deadline <= now]
        for key in expired:
            del self._pending[key]
        return [RequestTimedOut(peer, tx) for peer, tx in expired]

    def next_timer(self) -> float | None:
        """Earliest time `handle_timer` has a call to expire."""
        return min(self._pending.values(), default=None)

    # ---- internals ------------------------------------------------------------------------------

    def _on_request(self, from_peer: int, tx: int, whole: _Whole) -> tuple[list[RpcEvent], list[Outgoing]]:
        descriptor = whole.descriptor
        if descriptor is None:
            self.dropped["request_without_descriptor"] += 1
            return [], []

        def refuse(error: RpcError) -> tuple[list[RpcEvent], list[Outgoing]]:
            self.dropped["refused_request"] += 1
            req = RequestReceived(from_peer, tx, descriptor, b"", 0)
            return [], self.respond(req, error)

        if _algo(whole.compression) == CompressionAlgo.ZSTD:
            # We announce accepted_algo None, so a well-behaved peer never compresses toward us.
            return refuse(
                RpcError(RpcErrorKind.MALFORMAT_RPC_PACKET, "compressed requests are not supported")
            )
        try:
            envelope = RpcRequest.decode(whole.body)
        except WireError as exc:
            return refuse(RpcError(RpcErrorKind.MALFORMAT_RPC_PACKET, f"bad RpcRequest: {exc}"))
        methods = self._methods.get(descriptor.service_name)
        if descriptor.domain_name != self.network_name or methods is None:
            return refuse(RpcError(RpcErrorKind.INVALID_SERVICE, service_name=descriptor.service_name))
        if descriptor.method_index not in methods:
            return refuse(
                RpcError(
                    RpcErrorKind.INVALID_METHOD_INDEX,
                    service_name=descriptor.service_name,
                    method_index=descriptor.method_index,
                )
            )
        return [RequestReceived(from_peer, tx, descriptor, envelope.request, envelope.timeout_ms)], []

    def _on_response(self, from_peer: int, tx: int, whole: _Whole) -> RpcEvent:
        del self._pending[(from_peer, tx)]
        if _algo(whole.compression) == CompressionAlgo.ZSTD:
            return ErrorReceived(
                from_peer, tx, RpcError(RpcErrorKind.OTHER_ERROR, "peer sent a compressed response")
            )
        try:
            envelope = RpcResponse.decode(whole.body)
        except WireError as exc:
            return ErrorReceived(
                from_peer, tx, RpcError(RpcErrorKind.MALFORMAT_RPC_PACKET, f"bad RpcResponse: {exc}")
            )
        if envelope.error is not None:
            return ErrorReceived(from_peer, tx, envelope.error)
        return ResponseReceived(from_peer, tx, envelope.response)

    def _reassemble(self, from_peer: int, pkt: RpcPacket, now: float) -> _Whole | None:
        total, idx = pkt.total_pieces, pkt.piece_idx
        if total == 0 and idx == 0:  # legacy "whole" packet
            total = 1
        if idx >= total or total > MAX_TOTAL_PIECES:
            self.dropped["bad_piece_index"] += 1
            return None
        if total == 1:
            return _Whole(pkt.descriptor, pkt.compression_info, pkt.body)
        key = (from_peer, pkt.transaction_id, pkt.is_request)
        merge = self._merges.get(key)
        if merge is None:
            if len(self._merges) >= MAX_MERGES:
                self.dropped["too_many_merges"] += 1
                return None
            merge = self._merges[key] = _Merge(total, now)
        elif merge.total != total:
            self._drop_merge(key, "inconsistent_pieces")
            return None
        if idx in merge.pieces:
            self.dropped["duplicate_piece"] += 1
            return None
        if self._merge_bytes + len(pkt.body) > self.max_reassembly_bytes:
            self._drop_merge(key, "reassembly_memory")
            return None
        merge.pieces[idx] = pkt.body
        merge.size += len(pkt.body)
        self._merge_bytes += len(pkt.body)
        if pkt.descriptor is not None and (merge.descriptor is None or idx == 0):
            merge.descriptor = pkt.descriptor
        if idx == 0:
            merge.compression = pkt.compression_info
        if len(merge.pieces) < merge.total:
            return None
        del self._merges[key]
        self._merge_bytes -= merge.size
        body = b"".join(merge.pieces[i] for i in range(merge.total))
        return _Whole(merge.descriptor, merge.compression, body)

    def _drop_merge(self, key: tuple[int, int, bool], reason: str) -> None:
        merge = self._merges.pop(key, None)
        if merge is not None:
            self._merge_bytes -= merge.size
        self.dropped[reason] += 1

    def _expire_merges(self, now: float) -> None:
        # Merges are created in time order and dicts keep insertion order: the oldest come first.
        while self._merges:
            key, merge = next(iter(self._merges.items()))
            if now - merge.started < self.reassembly_timeout_s:
                break
            self._drop_merge(key, "reassembly_expired")

    def _chunk_size(self, descriptor: RpcDescriptor) -> int:
        key = (descriptor.service_name, len(descriptor.encode()))
        size = self._chunk_sizes.get(key)
        if size is None:
            # Worst-case varints for every numeric field, so no piece can come out larger.
            skeleton = RpcPacket(
                from_peer=0xFFFFFFFF,
                to_peer=0xFFFFFFFF,
                transaction_id=-1,
                descriptor=descriptor,
                is_request=True,
                total_pieces=MAX_TOTAL_PIECES,
                piece_idx=MAX_TOTAL_PIECES,
                trace_id=-1,
                compression_info=RpcCompressionInfo(),
            )
            body_key_and_len = 1 + len(encode_varint(self.max_packet_bytes))
            size = self.max_packet_bytes - len(skeleton.encode()) - body_key_and_len
            if size <= 0:
                raise ValueError("RPC descriptor leaves no room for a body within max_packet_bytes")
            self._chunk_sizes[key] = size
        return size

    def _split(
        self, to_peer: int, packet_type: int, tx: int, descriptor: RpcDescriptor, body: bytes
    ) -> list[Outgoing]:
        chunk = self._chunk_size(descriptor)
        total = max(1, -(-len(body) // chunk))
        if total > MAX_TOTAL_PIECES:
            raise ValueError(f"RPC body of {len(body)} bytes needs more than {MAX_TOTAL_PIECES} pieces")
        out = []
        for idx in range(total):
            pkt = RpcPacket(
                from_peer=self.my_peer_id,
                to_peer=to_peer,
                transaction_id=tx,
                descriptor=descriptor,
                body=body[idx * chunk : (idx + 1) * chunk],
                is_request=packet_type == RPC_REQ,
                total_pieces=total,
                piece_idx=idx,
                # algo must never be Invalid(0) when present (§5.3); None/None keeps peers from compressing.
                compression_info=RpcCompressionInfo() if idx == 0 else None,
            )
            out.append(Outgoing(to_peer, packet_type, pkt.encode()))
        return out


def _algo(info: RpcCompressionInfo | None) -> int:
    return CompressionAlgo.NONE if info is None else info.algo


# ---- asyncio shell --------------------------------------------------------------------------------


Handler = Callable[[int, bytes], Awaitable[bytes] | bytes]
SendFn = Callable[[int, int, bytes], object]


class RpcCallError(Exception):
    """A call failed: the peer answered with an error, it timed out, or it could not be sent."""

    def __init__(self, message: str, error: RpcError | None = None) -> None:
        super().__init__(message)
        self.error = error

    @property
    def kind(self) -> int | None:
        return None if self.error is None else self.error.kind


def _describe(error: RpcError) -> str:
    try:
        name = RpcErrorKind(error.kind).name.lower()
    except ValueError:
        name = f"kind {error.kind}"
    detail = error.message or error.service_name
    if error.kind == RpcErrorKind.INVALID_METHOD_INDEX:
        detail = f"{error.service_name} method {error.method_index}"
    return f"{name}: {detail}" if detail else name


class PeerRpc:
    """Peer RPC over the node's send path.

    `send(to_peer, packet_type, plaintext_payload)` is the node's: it encrypts and forwards. A return
    value of exactly False means "not sent" (no route) and fails the call at once.
    """

    def __init__(
        self,
        my_peer_id: int,
        network_name: str,
        send: SendFn,
        *,
        max_packet_bytes: int = MAX_RPC_PACKET_BYTES,
        max_concurrent_handlers: int = 256,
    ) -> None:
        self._core = RpcCore(my_peer_id, network_name, max_packet_bytes=max_packet_bytes)
        self._send = send
        self._max_handlers = max_concurrent_handlers
        self._handlers: dict[tuple[str, int], Handler] = {}
        self._waiters: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # A real node calls these on the lowest-id node; empty answers keep its retries quiet (§5.7).
        self.register(PEER_CENTER_SERVICE, PEER_CENTER_REPORT_PEERS, _empty_answer)
        self.register(PEER_CENTER_SERVICE, PEER_CENTER_GET_GLOBAL_PEER_MAP, _empty_answer)

    @property
    def my_peer_id(self) -> int:
        return self._core.my_peer_id

    @property
    def network_name(self) -> str:
        return self._core.network_name

    @property
    def dropped(self) -> collections.Counter[str]:
        """Why incoming RPC payloads were dropped or refused (counts)."""
        return self._core.dropped

    def register(self, service: str, method_index: int, handler: Handler) -> None:
        """Serve `service` method `method_index` (1-based); the handler gets (from_peer, request body)."""
        self._handlers[(service, method_index)] = handler
        self._core.register(service, method_index)

    def unregister(self, service: str, method_index: int) -> None:
        self._handlers.pop((service, method_index), None)
        self._core.unregister(service, method_index)

    async def call(
        self,
        to_peer: int,
        service: str,
        method_index: int,
        request: bytes,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> bytes:
        """Call a peer's method and return its response body; raises RpcCallError on any failure."""
        if self._closed:
            raise RpcCallError("peer RPC is closed")
        loop = asyncio.get_running_loop()
        tx, packets = self._core.request(
            to_peer, service, method_index, request, timeout_s=timeout_s, now=loop.time()
        )
        key = (to_peer, tx)
        fut: asyncio.Future[bytes] = loop.create_future()
        self._waiters[key] = fut
        try:
            for out in packets:
                try:
                    sent = self._send(out.to_peer, out.packet_type, out.payload)
                except Exception as exc:
                    raise RpcCallError(
                        f"sending {service}.{method_index} to peer {to_peer} failed: {exc}"
                    ) from exc
                if sent is False:
                    raise RpcCallError(f"no route to peer {to_peer} for {service}.{method_index}")
            self._arm_timer(loop)
            return await fut
        finally:
            self._waiters.pop(key, None)
            self._core.cancel(to_peer, tx)

    def on_packet(self, from_peer: int, packet_type: int, payload: bytes) -> None:
        """Feed one decrypted RpcReq/RpcResp payload. Never raises: garbage is counted and dropped."""
        if self._closed:
            self._core.dropped["closed"] += 1
            return
        try:
            now = self._now()
            events, replies = self._core.receive(from_peer, packet_type, payload, now)
            self._transmit(replies)
            for event in events:
                self._dispatch(event)
        except Exception:
            self._core.dropped["internal_error"] += 1
            log.exception("peer RPC failed on a packet from peer %d", from_peer)

    def close(self) -> None:
        """Fail every pending call, stop serving; later packets are dropped."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(RpcCallError("peer RPC closed"))
        for task in self._tasks:
            task.cancel()

    # ---- internals ------------------------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    def _dispatch(self, event: RpcEvent) -> None:
        if isinstance(event, RequestReceived):
            self._serve(event)
            return
        fut = self._waiters.get((event.peer, event.transaction_id))
        if fut is None or fut.done():
            return
        if isinstance(event, ResponseReceived):
            fut.set_result(event.response)
        elif isinstance(event, ErrorReceived):
            fut.set_exception(
                RpcCallError(f"peer {event.peer} answered {_describe(event.error)}", event.error)
            )
        else:
            fut.set_exception(
                RpcCallError(
                    f"call to peer {event.peer} timed out", RpcError(RpcErrorKind.TIMEOUT, "timeout")
                )
            )

    def _serve(self, req: RequestReceived) -> None:
        handler = self._handlers.get((req.service, req.method_index))
        if handler is None:  # the core only reports registered methods
            self._reply(
                req, RpcError(RpcErrorKind.INVALID_SERVICE, service_name=req.service), time.perf_counter()
            )
            return
        started = time.perf_counter()
        try:
            result = handler(req.from_peer, req.request)
        except Exception as exc:
            self._reply(req, _handler_error(req, exc), started)
            return
        if not inspect.isawaitable(result):
            self._reply(req, result, started)
            return
        if len(self._tasks) >= self._max_handlers:
            if inspect.iscoroutine(result):
                result.close()
            self._reply(req, RpcError(RpcErrorKind.OTHER_ERROR, "too many requests in progress"), started)
            return
        task = asyncio.ensure_future(self._serve_async(req, result, started))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_async(self, req: RequestReceived, pending: Awaitable[bytes], started: float) -> None:
        # The real server runs its handler under the caller's timeout_ms; so does this one.
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms > 0 else DEFAULT_TIMEOUT_S
        try:
            result: bytes | RpcError = await asyncio.wait_for(pending, timeout_s)
        except TimeoutError:
            result = RpcError(RpcErrorKind.TIMEOUT, f"handler took longer than {req.timeout_ms} ms")
        except Exception as exc:
            result = _handler_error(req, exc)
        self._reply(req, result, started)

    def _reply(self, req: RequestReceived, result: object, started: float) -> None:
        if self._closed:
            return
        if not isinstance(result, (bytes, bytearray, memoryview, RpcError)):
            result = RpcError(
                RpcErrorKind.EXECUTE_ERROR, f"handler returned {type(result).__name__}, not bytes"
            )
        elif not isinstance(result, RpcError):
            result = bytes(result)
        runtime_us = max(0, int((time.perf_counter() - started) * 1e6))
        try:
            packets = self._core.respond(req, result, runtime_us=runtime_us)
        except ValueError as exc:
            packets = self._core.respond(
                req, RpcError(RpcErrorKind.PROST_ENCODE_ERROR), runtime_us=runtime_us
            )
            log.warning("answer to %s.%d is unsendable: %s", req.service, req.method_index, exc)
        self._transmit(packets)

    def _transmit(self, packets: list[Outgoing]) -> None:
        for out in packets:
            try:
                if self._send(out.to_peer, out.packet_type, out.payload) is False:
                    self._core.dropped["reply_no_route"] += 1
            except Exception:
                self._core.dropped["send_failed"] += 1
                log.exception("sending an RPC payload to peer %d failed", out.to_peer)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self._core.next_timer()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None and not self._closed:
            self._timer = loop.call_at(deadline, self._on_timer, loop, deadline)

    def _on_timer(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._timer = None
        # The loop may run a timer a clock tick early; the deadline it was armed for has been reached.
        for event in self._core.handle_timer(max(loop.time(), deadline)):
            self._dispatch(event)
        self._arm_timer(loop)


def _handler_error(req: RequestReceived, exc: Exception) -> RpcError:
    if isinstance(exc, WireError):
        return RpcError(RpcErrorKind.PROST_DECODE_ERROR)
    log.debug("handler for %s.%d failed", req.service, req.method_index, exc_info=exc)
    return RpcError(RpcErrorKind.EXECUTE_ERROR, f"{type(exc).__name__}: {exc}")


def _empty_answer(_from_peer: int, _request: bytes) -> bytes:
    return b""
