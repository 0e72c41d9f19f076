"""The classic (non-Noise) EasyTier handshake: one HandshakeRequest each way, then identity checks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pytier.tunnel.base import Tunnel
from pytier.wire.errors import WireError
from pytier.wire.messages import HandshakeRequest
from pytier.wire.peer_header import HEADER_LEN, PacketType, pack_header, unpack_header

HANDSHAKE_TIMEOUT_S = 5.0
HANDSHAKE_RESEND_S = 1.0
ZERO_DIGEST = bytes(32)


class HandshakeError(Exception):
    """The peer could not be admitted; the message says why in words a user understands.

    ``kind`` is a short stable name for the reason (counters and log de-duplication key on it; the
    message may carry details that differ each time).
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True, frozen=True)
class Identity:
    peer_id: int
    network_name: str
    digest: bytes

    def request(self, reply_digest: bytes | None = None) -> bytes:
        # pytier announces no handshake features: each one changes the crypto or header bits, and we
        # must never claim what we do not implement.
        msg = HandshakeRequest(
            my_peer_id=self.peer_id,
            features=[],
            network_name=self.network_name,
            network_secret_digest=self.digest if reply_digest is None else reply_digest,
        ).encode()
        return pack_header(self.peer_id, 0, PacketType.HandShake, 0, 1, len(msg)) + msg


def _decode(packet: bytes) -> HandshakeRequest | None:
    try:
        from_peer, _to, ptype, _f, _fwd, _len = unpack_header(packet)
        if ptype != PacketType.HandShake:
            return None
        req = HandshakeRequest.decode(packet[HEADER_LEN:])
    except WireError:
        return None
    if len(req.network_secret_digest) != 32 or req.my_peer_id != from_peer or req.my_peer_id == 0:
        raise HandshakeError("malformed handshake (bad digest length or peer id)", "malformed")
    return req


def check_identity(me: Identity, peer: HandshakeRequest, is_client: bool) -> None:
    if peer.network_name != me.network_name:
        raise HandshakeError(
            f"peer belongs to network {peer.network_name!r}, not {me.network_name!r} "
            "(pytier does not relay for other networks)", "other_network"
        )
    if peer.my_peer_id == me.peer_id:
        raise HandshakeError(f"peer id conflict: the peer also uses id {me.peer_id}", "peer_id_conflict")
    if peer.network_secret_digest == me.digest:
        return
    if is_client and peer.network_secret_digest == ZERO_DIGEST:
        raise HandshakeError("the peer refused our network secret (network secret mismatch)",
                             "secret_mismatch")
    raise HandshakeError("network secret mismatch (the peer's secret digest differs from ours)",
                         "secret_mismatch")


async def _next_handshake(
    inbox: asyncio.Queue[bytes], deadline: float, *, first: bool = False
) -> HandshakeRequest:
    """The next HandShake packet; with ``first``, the next packet must be one."""
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise HandshakeError(f"no handshake from the peer within {HANDSHAKE_TIMEOUT_S:.0f} s", "timeout")
        try:
            packet = await asyncio.wait_for(inbox.get(), left)
        except TimeoutError:
            continue
        req = _decode(packet)
        if req is not None:
            return req
        if first:
            # A connector's first packet is its HandShake (EasyTier's too): anything else is a
            # scanner or garbage, which need not hold a connection for the whole deadline.
            raise HandshakeError("the first packet was not a handshake", "not_handshake")


async def run_handshake(
    tunnel: Tunnel, me: Identity, closed: asyncio.Event, inbox: asyncio.Queue[bytes]
) -> HandshakeRequest:
    """Run our side of the handshake over a tunnel whose packets the caller feeds into ``inbox``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDSHAKE_TIMEOUT_S
    waiter = asyncio.ensure_future(_handshake_steps(tunnel, me, inbox, deadline))
    closer = asyncio.ensure_future(closed.wait())
    try:
        done, _ = await asyncio.wait({waiter, closer}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        raise HandshakeError(f"tunnel closed during the handshake ({tunnel.close_reason})", "closed")
    finally:
        waiter.cancel()
        closer.cancel()


async def _client_exchange(
    tunnel: Tunnel, me: Identity, inbox: asyncio.Queue[bytes], deadline: float
) -> HandshakeRequest:
    # On a lossy UDP path one lost datagram would cost a whole 5 s attempt; the listener answers a
    # repeated request again, so repeat until the answer comes.
    loop = asyncio.get_running_loop()
    request = me.request()
    while True:
        tunnel.send(request)
        try:
            return await _next_handshake(inbox, min(deadline, loop.time() + HANDSHAKE_RESEND_S))
        except HandshakeError:
            if loop.time() >= deadline:
                raise


async def _handshake_steps(
    tunnel: Tunnel, me: Identity, inbox: asyncio.Queue[bytes], deadline: float
) -> HandshakeRequest:
    if tunnel.info.is_client:
        peer = await _client_exchange(tunnel, me, inbox, deadline)
        check_identity(me, peer, is_client=True)
        return peer
    peer = await _next_handshake(inbox, deadline, first=True)
    same = peer.network_name == me.network_name and peer.network_secret_digest == me.digest
    tunnel.send(me.request(None if same else ZERO_DIGEST))
    check_identity(me, peer, is_client=False)
    return peer
