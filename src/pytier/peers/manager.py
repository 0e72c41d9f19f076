"""Admits neighbours, keeps them alive, and moves peer packets: seal, route, relay, open, dispatch."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

from pytier.crypto import Cipher, DecryptError, ReplayFilter
from pytier.peers.handshake import HandshakeError, Identity, run_handshake
from pytier.peers.peer_conn import PING_INTERVAL_S, PeerConn
from pytier.ratelog import RateLimitedLog
from pytier.tunnel.base import Tunnel
from pytier.wire.errors import WireError
from pytier.wire.messages import HandshakeRequest
from pytier.wire.peer_header import HEADER, HEADER_LEN, HeaderFlags, PacketType

log = logging.getLogger("pytier.peers")

MAX_FORWARD_COUNTER = 7
# Incoming tunnels still in their handshake: each holds a socket (TCP) and a task for up to the
# handshake deadline, so a flood of silent or garbage connections must not grow them without bound.
# A real node opens one or two tunnels at a time from one address.
MAX_HALF_OPEN_PER_SOURCE = 8
MAX_HALF_OPEN = 256
# A reconnect loop with a wrong secret retries forever: remind the user now and then, not each time.
REFUSAL_LOG_INTERVAL_S = 300.0
BAD_INPUT_LOG_INTERVAL_S = 60.0
_ENCRYPTED = int(HeaderFlags.ENCRYPTED)
_COMPRESSED = int(HeaderFlags.COMPRESSED)
_PING = int(PacketType.Ping)
_PONG = int(PacketType.Pong)
_HANDSHAKE = int(PacketType.HandShake)
# Packet types whose payload is sealed with the network key when encryption is on.
SEALED_TYPES = frozenset(
    int(t)
    for t in (
        PacketType.Data,
        PacketType.RpcReq,
        PacketType.RpcResp,
        PacketType.KcpSrc,
        PacketType.KcpDst,
        PacketType.QuicSrc,
        PacketType.QuicDst,
        PacketType.PytierFec,
    )
)

_MUST_BE_SEALED = SEALED_TYPES - {int(PacketType.RpcReq), int(PacketType.RpcResp)}

PayloadHandler = Callable[[int, bytes], None]
NextHop = Callable[[int], "int | None"]


class PeerManager:
    def __init__(
        self,
        *,
        identity: Identity,
        cipher: Cipher | None,
        peer_timeout_s: float,
        next_hop: NextHop,
    ) -> None:
        self.identity = identity
        self.my_peer_id = identity.peer_id
        self.cipher = cipher
        self.peer_timeout_s = peer_timeout_s
        self._next_hop = next_hop
        # latency_first: the route service's loss-aware first hop for packets this node originates;
        # relayed packets keep least-hop forwarding, so the choice cannot make a loop.
        self.first_hop: NextHop | None = None
        self.ping_interval_s = PING_INTERVAL_S
        self.conns: dict[int, list[PeerConn]] = {}
        self._by_tunnel: dict[Tunnel, PeerConn] = {}
        self._handlers: dict[int, PayloadHandler] = {}
        self._replay = ReplayFilter()
        self.counters: collections.Counter[str] = collections.Counter()
        self.peer_hostnames: dict[int, str] = {}
        self.on_peer_up: Callable[[int], None] | None = None
        self.on_peer_down: Callable[[int], None] | None = None
        self._tasks: set[asyncio.Task[PeerConn | None]] = set()
        self._refusal_log = RateLimitedLog(log, REFUSAL_LOG_INTERVAL_S)
        self._bad_input_log = RateLimitedLog(log, BAD_INPUT_LOG_INTERVAL_S)
        self._half_open: collections.Counter[str] = collections.Counter()
        self._half_open_total = 0
        self._liveness: asyncio.Task[None] | None = None

    def register(self, packet_type: PacketType, handler: PayloadHandler) -> None:
        """``handler(from_peer, plaintext_payload)`` for packets of this type addressed to us."""
        self._handlers[int(packet_type)] = handler

    # ---- admission -------------------------------------------------------------------------

    def add_tunnel(self, tunnel: Tunnel, label: str, source: str = "") -> asyncio.Future[PeerConn | None]:
        """Run the handshake on a fresh tunnel; the future yields the admitted conn (or None).

        ``source`` names where the tunnel comes from for de-duplicating refusal warnings (a
        reconnecting peer uses a new port each time); it defaults to ``label``.
        """
        incoming = not tunnel.info.is_client
        host = tunnel.info.remote_addr.rsplit(":", 1)[0]
        if incoming:
            refusal = self._half_open_refusal(host)
            if refusal is not None:
                kind, why = refusal
                self.counters[f"tunnels_refused_{kind}"] += 1
                self._refusal_log.log(logging.WARNING, host, kind, "connection %s refused: %s", label, why)
                tunnel.close(why)
                done: asyncio.Future[PeerConn | None] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            self._half_open[host] += 1
            self._half_open_total += 1
        task = asyncio.ensure_future(self._admit(tunnel, label, source or label))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if incoming:
            task.add_done_callback(lambda _t: self._half_open_done(host))
        return task

    def _half_open_refusal(self, host: str) -> tuple[str, str] | None:
        if self._half_open[host] >= MAX_HALF_OPEN_PER_SOURCE:
            return "half_open_per_source", f"{MAX_HALF_OPEN_PER_SOURCE} handshakes from {host} in progress"
        if self._half_open_total >= MAX_HALF_OPEN:
            return "half_open_total", f"{MAX_HALF_OPEN} handshakes in progress"
        return None

    def _half_open_done(self, host: str) -> None:
        self._half_open_total -= 1
        self._half_open[host] -= 1
        if self._half_open[host] <= 0:
            del self._half_open[host]

    async def _admit(self, tunnel: Tunnel, label: str, source: str) -> PeerConn | None:
        inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        closed = asyncio.Event()

        def early_packet(_t: Tunnel, packet: bytes) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                inbox.put_nowait(packet)

        tunnel.set_handlers(early_packet, lambda _t, _r: closed.set())
        try:
            peer = await run_handshake(tunnel, self.identity, closed, inbox)
        except HandshakeError as exc:
            self.counters[f"handshake_failed_{exc.kind}"] += 1
            self._log_refusal(label, source, exc)
            tunnel.close(f"handshake failed: {exc}")
            return None
        except asyncio.CancelledError:
            tunnel.close("shutting down")
            raise
        conn = PeerConn(tunnel, self.my_peer_id, peer.my_peer_id, peer.network_name)
        self._attach(conn, peer)
        # Packets that followed the handshake before we attached (a Ping, the first route sync).
        while not inbox.empty():
            self._on_tunnel_packet(tunnel, inbox.get_nowait())
        return conn

    def _log_refusal(self, label: str, source: str, exc: HandshakeError) -> None:
        if not self._refusal_log.log(logging.WARNING, source, exc.kind, "connection %s refused: %s",
                                     label, exc):
            log.debug("connection %s refused again: %s", label, exc)

    def _attach(self, conn: PeerConn, peer: HandshakeRequest) -> None:
        tunnel = conn.tunnel
        self._by_tunnel[tunnel] = conn
        tunnel.set_handlers(self._on_tunnel_packet, self._on_tunnel_closed, self._on_tunnel_packets)
        conns = self.conns.setdefault(conn.peer_id, [])
        conns.append(conn)
        first = len(conns) == 1
        log.info(
            "peer %d connected over %s %s (%s)%s",
            conn.peer_id,
            tunnel.info.scheme,
            tunnel.info.remote_addr,
            "outgoing" if tunnel.info.is_client else "incoming",
            "" if first else f", {len(conns)} links now",
        )
        conn.tunnel.send(conn.make_ping(time.monotonic()))
        if first and self.on_peer_up is not None:
            self.on_peer_up(conn.peer_id)

    def _on_tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        conn = self._by_tunnel.pop(tunnel, None)
        if conn is None:
            return
        conn.closed.set()
        conns = self.conns.get(conn.peer_id, [])
        if conn in conns:
            conns.remove(conn)
        log.info("link to peer %d over %s %s closed: %s", conn.peer_id, tunnel.info.scheme,
                 tunnel.info.remote_addr, reason)
        if not conns:
            self.conns.pop(conn.peer_id, None)
            level = logging.INFO if reason == "shutting down" else logging.WARNING
            log.log(level, "peer %d is down (%s)", conn.peer_id, reason)
            if self.on_peer_down is not None:
                self.on_peer_down(conn.peer_id)

    # ---- liveness ----------------------------------------------------------------------------

    async def run_liveness(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval_s)
            now = time.monotonic()
            for conn in list(self._by_tunnel.values()):
                if now - conn.last_rx > self.peer_timeout_s:
                    conn.tunnel.close(f"no traffic for {self.peer_timeout_s:.0f} s")
                    continue
                conn.tunnel.send(conn.make_ping(now))

    def start(self) -> None:
        self._liveness = asyncio.ensure_future(self.run_liveness())

    async def close(self) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._by_tunnel.values()):
            conn.tunnel.close("shutting down")

    # ---- receive path -------------------------------------------------------------------------

    def _on_tunnel_packet(self, tunnel: Tunnel, packet: bytes) -> None:
        conn = self._by_tunnel.get(tunnel)
        if conn is None or len(packet) < HEADER_LEN:
            self.counters["rx_malformed"] += 1
            return
        conn.last_rx = time.monotonic()
        from_peer, to_peer, ptype, flags, fwd, _rsv, _length = HEADER.unpack_from(packet)
        # Ping and Pong belong to this link, whatever ids they carry: a Pong is the Ping sent back
        # with only its type changed, so its to_peer names the answering side, not us.
        if ptype == _PING:
            tunnel.send(packet[:8] + bytes((_PONG,)) + packet[9:])
            return
        if ptype == _PONG:
            conn.on_pong(packet[HEADER_LEN:], conn.last_rx)
            return
        if to_peer != self.my_peer_id and to_peer != 0:
            self._forward(packet, to_peer, fwd)
            return
        if ptype == _HANDSHAKE:
            self._answer_repeated_handshake(conn, packet)
            return
        self._deliver_local(from_peer, ptype, flags, packet)

    def _on_tunnel_packets(self, tunnel: Tunnel, packets: list[bytes]) -> None:
        """A batch from one tunnel (a GRO run): sealed packets for us (Data, KCP, QUIC: nearly all
        of a bulk flow) go straight to their handler here; anything else takes the general path."""
        conn = self._by_tunnel.get(tunnel)
        cipher = self.cipher
        if conn is None or cipher is None:
            for packet in packets:
                self._on_tunnel_packet(tunnel, packet)
            return
        conn.last_rx = time.monotonic()
        me, unpack, open_at = self.my_peer_id, HEADER.unpack_from, cipher.open_at
        fresh, handlers = self._replay.check_and_add, self._handlers
        for packet in packets:
            if len(packet) < HEADER_LEN:
                self.counters["rx_malformed"] += 1
                continue
            from_peer, to_peer, ptype, flags, _fwd, _rsv, _length = unpack(packet)
            handler = handlers.get(ptype) if flags == _ENCRYPTED and to_peer == me else None
            if handler is None or ptype not in SEALED_TYPES:
                self._on_tunnel_packet(tunnel, packet)
                continue
            try:
                plain, nonce = open_at(packet, HEADER_LEN)
            except DecryptError:
                self.counters["rx_decrypt_failed"] += 1
                continue
            if not fresh(from_peer, nonce):
                self.counters["rx_replayed"] += 1
                continue
            try:
                handler(from_peer, plain)
            except Exception:
                self.counters["rx_handler_error"] += 1
                log.exception("handler for packet type %d failed", ptype)

    def _answer_repeated_handshake(self, conn: PeerConn, packet: bytes) -> None:
        # The client repeats its request when our answer was lost; answer again, admit nothing new.
        if conn.tunnel.info.is_client:
            return
        try:
            req = HandshakeRequest.decode(packet[HEADER_LEN:])
        except WireError:
            req = None
        if req is None or req.my_peer_id != conn.peer_id:
            self.counters["rx_dropped_bad_handshake"] += 1
            remote = conn.tunnel.info.remote_addr
            self._bad_input_log.log(logging.INFO, remote, "bad_handshake",
                                    "dropped a handshake from %s that does not match peer %d of that link",
                                    remote, conn.peer_id)
            return
        conn.tunnel.send(self.identity.request())

    def _deliver_local(self, from_peer: int, ptype: int, flags: int, packet: bytes) -> None:
        handler = self._handlers.get(ptype)
        if handler is None:
            self.counters["rx_unhandled_type"] += 1
            return
        payload = packet[HEADER_LEN:]
        if flags & _COMPRESSED:
            self.counters["rx_compressed_dropped"] += 1
            return
        if flags & _ENCRYPTED:
            cipher = self.cipher
            if cipher is None:
                self.counters["rx_encrypted_without_key"] += 1
                return
            try:
                plain = cipher.open(payload)
            except DecryptError:
                self.counters["rx_decrypt_failed"] += 1
                return
            if not self._replay.check_and_add(from_peer, cipher.nonce_of(payload)):
                self.counters["rx_replayed"] += 1
                return
            payload = plain
        elif self.cipher is not None and ptype in _MUST_BE_SEALED:
            # EasyTier accepts clear packets even with encryption on; pytier takes clear RPC only (a
            # real node sends some RPC clear), so a forger without the key cannot inject traffic.
            self.counters["rx_unencrypted_dropped"] += 1
            return
        try:
            handler(from_peer, payload)
        except Exception:
            self.counters["rx_handler_error"] += 1
            log.exception("handler for packet type %d failed", ptype)

    def _forward(self, packet: bytes, to_peer: int, fwd: int) -> None:
        if fwd > MAX_FORWARD_COUNTER:
            self.counters["fwd_dropped_ttl"] += 1
            return
        conn = self._conn_toward(to_peer)
        if conn is None:
            self.counters["fwd_dropped_no_route"] += 1
            return
        self.counters["fwd_packets"] += 1
        conn.tunnel.send(packet[:10] + bytes((fwd + 1,)) + packet[11:])

    # ---- send path ------------------------------------------------------------------------------

    def _conn_toward(self, peer_id: int, first_hop: NextHop | None = None) -> PeerConn | None:
        if first_hop is not None:
            chosen = first_hop(peer_id)
            conns = self.conns.get(chosen) if chosen is not None else None
            if conns:
                return conns[0]
        conns = self.conns.get(peer_id)
        if not conns:
            hop = self._next_hop(peer_id)
            if hop is None:
                return None
            conns = self.conns.get(hop)
            if not conns:
                return None
        return conns[0]

    def send(self, to_peer: int, packet_type: int, payload: bytes) -> bool:
        """Seal and send one payload toward ``to_peer`` (direct or via the route's next hop)."""
        conn = self._conn_toward(to_peer, self.first_hop)
        if conn is None:
            self.counters["tx_dropped_no_route"] += 1
            return False
        conn.tunnel.send(self._packet(to_peer, packet_type, payload))
        return True

    def send_direct_udp(self, to_peer: int, packet_type: int, payload: bytes) -> bool:
        """Like send, but only over a direct UDP link to the peer (False if there is none): for
        pytier's own packets, which no relay may carry, and FEC, which a TCP link does not need."""
        conns = self.conns.get(to_peer)
        if not conns or conns[0].tunnel.info.scheme != "udp":
            return False
        conns[0].tunnel.send(self._packet(to_peer, packet_type, payload))
        return True

    def _packet(self, to_peer: int, packet_type: int, payload: bytes) -> bytes:
        """Our peer header and the payload, sealed when encryption is on and the type is sealed."""
        cipher = self.cipher
        if cipher is not None and packet_type in SEALED_TYPES:
            body = cipher.seal(payload)
            flags = _ENCRYPTED
        else:
            body = payload
            flags = 0
        return HEADER.pack(self.my_peer_id, to_peer, packet_type, flags, 1, 0, len(payload)) + body

    def is_direct(self, peer_id: int) -> bool:
        return peer_id in self.conns

    def describe_conns(self) -> list[dict[str, object]]:
        rows = []
        for peer_id, conns in sorted(self.conns.items()):
            for conn in conns:
                row = conn.describe()
                row["hostname"] = self.peer_hostnames.get(peer_id)
                rows.append(row)
        return rows
