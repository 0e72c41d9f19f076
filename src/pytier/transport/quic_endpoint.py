"""The QUIC proxy transport of a node, sans-IO: peer packets and time in, peer packets and events out.

One QUIC connection per pair of nodes and direction: this node is the client of the connection it
opens toward a peer (its datagrams go out as QuicSrc, replies come back as QuicDst) and the server of
the connection a peer opened toward it (QuicSrc in, QuicDst out), as EasyTier does. Each proxied TCP
connection is one bidirectional stream, client-initiated, which begins with the connect header:
u16 big-endian length, then the KcpConnData protobuf (the server refuses more than 512 bytes, or a
header not complete within 5 s). Half-close is the stream's FIN; teardown is RESET_STREAM plus
STOP_SENDING. A client connection stays open, kept alive by a PING every 5 s, for 600 s after its last
stream ended, so that the next proxied connection to that peer skips the handshake.

Streams are named by handles (ints) that stay unique for the endpoint's life.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from dataclasses import dataclass, field

from aioquic.quic import events as qe

from pytier.transport.quic_aioquic import NullCryptoQuicConnection, make_configuration
from pytier.wire.peer_header import PacketType

HEADER_LEN = struct.Struct(">H")
FINAL_STATS_KEPT = 1024  # streams whose last figures wait for the proxy to collect them
# A probe timeout's datagram goes out 2^n times for the n-th timeout in a row, up to this many.
MAX_PROBE_COPIES = 16


@dataclass(frozen=True, slots=True)
class QuicSettings:
    keepalive_s: float = 5.0
    idle_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    header_timeout_s: float = 5.0
    max_header_bytes: int = 512
    conn_cache_idle_s: float = 600.0
    # 16 MiB: on a 200 ms path at 100 Mbit/s, a hole that takes two or three round trips to repair
    # holds back 1.5-2 bandwidth-delay products of received data behind it.
    stream_window: int = 16 << 20
    initial_rtt_s: float = 0.1
    # BBR draws its first PROBE_BW phase at random; a seed makes a virtual-time model reproducible.
    bbr_seed: int | None = None


# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """A stream this node opened can carry data: its connection's handshake completed."""

    handle: int


@dataclass(frozen=True, slots=True)
class IncomingStream:
    """A peer opened a stream toward us and sent its connect header; accept() or refuse() it."""

    handle: int
    from_peer: int
    conn_data: bytes


@dataclass(frozen=True, slots=True)
class StreamData:
    handle: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamFinished:
    """The peer finished sending (FIN); we may still send."""

    handle: int


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The stream ended abnormally: reset or stopped by the peer, or its connection went away.
    `opened` tells whether a StreamOpened came first (False: the open failed)."""

    handle: int
    reason: str
    opened: bool


QuicEndpointEvent = StreamOpened | IncomingStream | StreamData | StreamFinished | StreamClosed

_RESET_CODE = 1  # application error code of our RESET_STREAM / STOP_SENDING


@dataclass(slots=True)
class _Stream:
    handle: int
    conn: _Conn
    stream_id: int
    outgoing: bool
    opened: bool = False  # outgoing: handshake done; incoming: accepted
    header: bytearray = field(default_factory=bytearray)
    header_deadline: float | None = None
    announced: bool = False  # incoming: IncomingStream emitted
    held: list[bytes] = field(default_factory=list)  # incoming data before accept
    peer_fin: bool = False
    local_fin: bool = False


@dataclass(slots=True)
class _Conn:
    peer: int
    is_client: bool
    quic: NullCryptoQuicConnection
    addr: tuple[str, int]
    created: float
    last_sent: float
    streams: dict[int, _Stream] = field(default_factory=dict)
    # The incoming streams still waiting for their connect header, the only ones with a deadline:
    # the timer looks at these, not at every stream (the proxy asks for the timer after every pump).
    awaiting_header: dict[int, _Stream] = field(default_factory=dict)
    idle_since: float | None = None
    ping_ids: itertools.count[int] = field(default_factory=itertools.count)
    probe_copies: int = 0  # times the next datagram goes out: a probe timeout's (see handle_timer)
    # Streams we are done with that aioquic still holds: their late frames are not new streams.
    done_ids: set[int] = field(default_factory=set)

    @property
    def send_type(self) -> int:
        return int(PacketType.QuicSrc if self.is_client else PacketType.QuicDst)


def _long_header_dcid(payload: bytes) -> tuple[bytes, bool] | None:
    """(destination CID, is Initial) of a long-header packet, None when it is too short."""
    if len(payload) < 6:
        return None
    n = payload[5]
    if len(payload) < 6 + n:
        return None
    return bytes(payload[6:6 + n]), (payload[0] & 0x30) == 0


class QuicEndpoint:
    def __init__(self, my_peer_id: int, settings: QuicSettings | None = None) -> None:
        self.my_peer_id = my_peer_id
        self.settings = settings or QuicSettings()
        self._clients: dict[int, _Conn] = {}
        self._servers: dict[int, _Conn] = {}
        self._streams: dict[int, _Stream] = {}
        # The connection's figures when a stream was forgotten, for the proxy table's closed rows.
        self._final_stats: dict[int, dict[str, object]] = {}
        self._handles = itertools.count(1)
        self._events: deque[QuicEndpointEvent] = deque()
        # Connections closed locally whose CONNECTION_CLOSE has yet to go out.
        self._closing: list[_Conn] = []

    # ---- input ----------------------------------------------------------------------------------

    def receive(self, from_peer: int, packet_type: int, payload: bytes, now: float) -> None:
        if packet_type == PacketType.QuicDst:
            conn = self._clients.get(from_peer)
        elif packet_type == PacketType.QuicSrc:
            conn = self._server_for(from_peer, payload, now)
        else:
            return
        if conn is None:
            return
        conn.quic.receive_datagram(payload, conn.addr, now)
        self._drain(conn, now)

    def _server_for(self, peer: int, payload: bytes, now: float) -> _Conn | None:
        conn = self._servers.get(peer)
        if not payload or not payload[0] & 0x80:
            return conn  # short header: the peer's current connection
        parsed = _long_header_dcid(payload)
        if parsed is None:
            return None
        dcid, is_initial = parsed
        if conn is not None and conn.quic.owns_cid(dcid):
            return conn
        if not is_initial or len(payload) < 1200:
            return None
        if conn is not None:
            # The peer started a new connection (it restarted, or dropped the old one): the old one
            # is gone for good.
            conn.quic.close(error_code=0, reason_phrase="replaced")
            self._end_conn(conn, "replaced by a new connection from the peer", now)
        quic = NullCryptoQuicConnection(
            configuration=make_configuration(is_client=False, idle_timeout_s=self.settings.idle_timeout_s,
                                             stream_window=self.settings.stream_window,
                                             initial_rtt_s=self.settings.initial_rtt_s),
            original_destination_connection_id=dcid,
        )
        self._seed(quic)
        conn = _Conn(peer, False, quic, (str(peer), int(PacketType.QuicSrc)), now, now)
        self._servers[peer] = conn
        return conn

    def _seed(self, quic: NullCryptoQuicConnection) -> None:
        if self.settings.bbr_seed is not None:
            quic.congestion.bbr.seed(self.settings.bbr_seed)

    # ---- streams we open ------------------------------------------------------------------------

    def open(self, peer: int, conn_data: bytes, now: float) -> int:
        """A new stream toward `peer` whose first bytes are the connect header for `conn_data`."""
        if len(conn_data) > 0xFFFF:
            raise ValueError("connect header too long")
        conn = self._clients.get(peer)
        if conn is None or conn.quic.closed:
            quic = NullCryptoQuicConnection(configuration=make_configuration(
                is_client=True, idle_timeout_s=self.settings.idle_timeout_s,
                stream_window=self.settings.stream_window, initial_rtt_s=self.settings.initial_rtt_s))
            self._seed(quic)
            conn = _Conn(peer, True, quic, (str(peer), int(PacketType.QuicDst)), now, now)
            self._clients[peer] = conn
            quic.connect(conn.addr, now)
        stream_id = conn.quic.get_next_available_stream_id()
        conn.quic.send_stream_data(stream_id, HEADER_LEN.pack(len(conn_data)) + conn_data)
        handle = next(self._handles)
        stream = _Stream(handle, conn, stream_id, outgoing=True)
        conn.streams[stream_id] = stream
        conn.idle_since = None
        self._streams[handle] = stream
        if conn.quic.handshake_complete:
            stream.opened = True
            self._events.append(StreamOpened(handle))
        return handle

    # ---- streams a peer opened ------------------------------------------------------------------

    def accept(self, handle: int) -> bool:
        """Take an incoming stream; False when it is gone already (reset, or its connection ended)."""
        stream = self._streams.get(handle)
        if stream is None:
            return False
        stream.opened = True
        for data in stream.held:
            self._events.append(StreamData(handle, data))
        stream.held.clear()
        if stream.peer_fin:
            self._events.append(StreamFinished(handle))
        return True

    def refuse(self, handle: int) -> None:
        self.abort(handle)

    # ---- stream I/O -----------------------------------------------------------------------------

    def send(self, handle: int, data: bytes) -> None:
        stream = self._streams.get(handle)
        if stream is None:
            raise ConnectionResetError("the QUIC stream is gone")
        if stream.local_fin:
            raise ValueError("stream already finished")
        stream.conn.quic.send_stream_data(stream.stream_id, data)

    def shutdown_write(self, handle: int) -> None:
        stream = self._streams.get(handle)
        if stream is None or stream.local_fin:
            return
        stream.local_fin = True
        stream.conn.quic.send_stream_data(stream.stream_id, b"", end_stream=True)

    def unsent(self, handle: int) -> int:
        """Bytes written to a stream and not sent yet: what the writer should keep small, while what
        is in flight follows the congestion window."""
        stream = self._streams.get(handle)
        return 0 if stream is None else stream.conn.quic.unsent_bytes(stream.stream_id)

    def consume(self, handle: int, nbytes: int) -> None:
        stream = self._streams.get(handle)
        if stream is not None:
            stream.conn.quic.consume(stream.stream_id, nbytes)

    def abort(self, handle: int) -> None:
        """Reset both halves of the stream (the far side's TCP connection is reset too)."""
        stream = self._streams.pop(handle, None)
        if stream is None:
            return
        quic = stream.conn.quic
        if not quic.closed and quic.stream_known(stream.stream_id):
            quic.reset_stream(stream.stream_id, _RESET_CODE)
            quic.stop_stream(stream.stream_id, _RESET_CODE)
        self._forget(stream)

    def close(self, handle: int) -> None:
        """The application is done with the stream: forget it if both sides finished, else reset."""
        stream = self._streams.get(handle)
        if stream is None:
            return
        if stream.local_fin and stream.peer_fin:
            self._streams.pop(handle, None)
            self._forget(stream)
        else:
            self.abort(handle)

    def _forget(self, stream: _Stream) -> None:
        conn = stream.conn
        self._keep_final_stats(stream)
        conn.streams.pop(stream.stream_id, None)
        conn.awaiting_header.pop(stream.stream_id, None)
        conn.quic.forget_stream(stream.stream_id)
        if conn.quic.stream_known(stream.stream_id):
            conn.done_ids.add(stream.stream_id)
        if not conn.streams:
            conn.idle_since = conn.last_sent

    def stats(self, handle: int) -> dict[str, object]:
        stream = self._streams.get(handle)
        if stream is None:
            raise KeyError(handle)
        return self.conn_stats(stream.conn)

    def take_final_stats(self, handle: int) -> dict[str, object] | None:
        """The figures of a stream's connection when the stream was forgotten (once)."""
        return self._final_stats.pop(handle, None)

    def _keep_final_stats(self, stream: _Stream) -> None:
        final = self._final_stats
        final[stream.handle] = self.conn_stats(stream.conn)
        while len(final) > FINAL_STATS_KEPT:
            del final[next(iter(final))]

    @staticmethod
    def conn_stats(conn: _Conn) -> dict[str, object]:
        bbr = conn.quic.congestion.bbr
        rtt = conn.quic.smoothed_rtt
        return {
            "rtt_ms": round(rtt * 1000, 1) if rtt is not None else None,
            "retrans": bbr.lost_packets,
            "segments_sent": bbr.packets_sent,
            "spurious": conn.quic.recovery.spurious_losses,
            "bbr_state": bbr.state.value,
            "bw_mbit": round(bbr.btlbw * 8 / 1e6, 1),
        }

    def peer_gone(self, peer: int, now: float) -> None:
        for table in (self._clients, self._servers):
            conn = table.get(peer)
            if conn is not None:
                conn.quic.close(error_code=0, reason_phrase="peer unreachable")
                self._end_conn(conn, "peer unreachable", now)

    def close_all(self, now: float) -> None:
        for conn in [*self._clients.values(), *self._servers.values()]:
            conn.quic.close(error_code=0, reason_phrase="node stopping")
            for stream in list(conn.streams.values()):
                self._streams.pop(stream.handle, None)
            conn.streams.clear()
            conn.awaiting_header.clear()

    # ---- output and time ------------------------------------------------------------------------

    def next_event(self) -> QuicEndpointEvent | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self, now: float) -> list[tuple[int, int, bytes]]:
        out: list[tuple[int, int, bytes]] = []
        closing, self._closing = self._closing, []
        for conn in closing:
            out.extend((conn.peer, conn.send_type, data) for data, _addr in conn.quic.datagrams_to_send(now))
        for conn in self._conns():
            sent = conn.quic.datagrams_to_send(now)
            if sent:
                conn.last_sent = now
                kind = conn.send_type
                if conn.probe_copies:
                    # Copies of one datagram share its packet number: the receiver keeps the first
                    # that arrives and drops the rest as duplicates.
                    out.extend((conn.peer, kind, sent[0][0]) for _ in range(conn.probe_copies - 1))
                    conn.probe_copies = 0
                for data, _addr in sent:
                    out.append((conn.peer, kind, data))
            conn.quic.note_app_limited()
            self._drain(conn, now)
        return out

    def get_timer(self) -> float | None:
        s = self.settings
        when: float | None = None
        for conn in self._conns():
            candidates = [conn.quic.get_timer()]
            if conn.quic.handshake_complete:
                candidates.append(conn.last_sent + s.keepalive_s)
            elif conn.is_client:
                candidates.append(conn.created + s.connect_timeout_s)
            if conn.idle_since is not None and conn.is_client:
                candidates.append(conn.idle_since + s.conn_cache_idle_s)
            for stream in conn.awaiting_header.values():
                candidates.append(stream.header_deadline)
            for t in candidates:
                if t is not None and (when is None or t < when):
                    when = t
        return when

    def handle_timer(self, now: float) -> None:
        s = self.settings
        for conn in self._conns():
            quic = conn.quic
            t = quic.get_timer()
            if t is not None and t <= now:
                timeouts = quic.pto_count
                quic.handle_timer(now)
                if quic.pto_count > timeouts and quic.handshake_complete:
                    # A probe timeout: nothing sent lately was answered, and the timeout doubles
                    # each time. Where loss comes in runs of packets (a radio link; the bursty
                    # path's Gilbert-Elliott model counts packets, however far apart), one probe per
                    # timeout makes the wait grow exponentially with the run's length: a 64-byte
                    # echo stalled for 15 s. Doubling the probe's copies too keeps the wait in
                    # proportion to the run, for a few small datagrams (a probe is one packet: a
                    # PING and the oldest unacknowledged data).
                    conn.probe_copies = min(1 << quic.pto_count, MAX_PROBE_COPIES)
            if conn.is_client and not quic.handshake_complete and now >= conn.created + s.connect_timeout_s:
                quic.close(error_code=0, reason_phrase="handshake timed out")
                self._end_conn(conn, "QUIC handshake timed out", now)
                continue
            idle_since = conn.idle_since
            if conn.is_client and idle_since is not None and now >= idle_since + s.conn_cache_idle_s:
                quic.close(error_code=0, reason_phrase="idle")
                self._end_conn(conn, "idle", now)
                continue
            if quic.handshake_complete and now >= conn.last_sent + s.keepalive_s:
                quic.send_ping(next(conn.ping_ids))
            for stream in list(conn.awaiting_header.values()):
                if stream.header_deadline is not None and now >= stream.header_deadline:
                    self.abort(stream.handle)
            if conn.done_ids:
                conn.done_ids = {sid for sid in conn.done_ids if quic.stream_known(sid)}
            self._drain(conn, now)

    def _conns(self) -> list[_Conn]:
        return [*self._clients.values(), *self._servers.values()]

    # ---- aioquic events -------------------------------------------------------------------------

    def _drain(self, conn: _Conn, now: float) -> None:
        quic = conn.quic
        while (ev := quic.next_event()) is not None:
            if isinstance(ev, qe.StreamDataReceived):
                self._on_stream_data(conn, ev.stream_id, ev.data, ev.end_stream, now)
            elif isinstance(ev, qe.HandshakeCompleted):
                for stream in conn.streams.values():
                    if stream.outgoing and not stream.opened:
                        stream.opened = True
                        self._events.append(StreamOpened(stream.handle))
            elif isinstance(ev, (qe.StreamReset, qe.StopSendingReceived)):
                failed = conn.streams.get(ev.stream_id)
                if failed is not None:
                    what = "reset" if isinstance(ev, qe.StreamReset) else "stopped"
                    self._stream_failed(failed, f"{what} by the peer (code {ev.error_code})")
            elif isinstance(ev, qe.ConnectionTerminated):
                self._end_conn(conn, f"connection closed: {ev.reason_phrase or ev.error_code}", now)
                return
        if quic.closed:
            self._end_conn(conn, "connection closed", now)

    def _on_stream_data(self, conn: _Conn, stream_id: int, data: bytes, fin: bool, now: float) -> None:
        found = conn.streams.get(stream_id)
        if found is not None:
            stream = found
        else:
            if conn.is_client or stream_id & 0x3 != 0 or stream_id in conn.done_ids:
                return  # a late frame of a stream we forgot, or a kind we never accept
            if fin and not data:
                return
            handle = next(self._handles)
            stream = _Stream(handle, conn, stream_id, outgoing=False,
                             header_deadline=now + self.settings.header_timeout_s)
            conn.streams[stream_id] = stream
            conn.awaiting_header[stream_id] = stream
            conn.idle_since = None
            self._streams[handle] = stream
        if fin:
            stream.peer_fin = True
        if not stream.outgoing and not stream.announced:
            stream.header += data
            if len(stream.header) >= 2:
                need = HEADER_LEN.unpack_from(stream.header)[0]
                if need > self.settings.max_header_bytes:
                    self.abort(stream.handle)
                    return
                if len(stream.header) >= 2 + need:
                    conn_data = bytes(stream.header[2:2 + need])
                    rest = bytes(stream.header[2 + need:])
                    stream.header = bytearray()
                    stream.header_deadline = None
                    del conn.awaiting_header[stream_id]
                    stream.announced = True
                    conn.quic.consume(stream_id, 2 + need)
                    if rest:
                        stream.held.append(rest)
                    self._events.append(IncomingStream(stream.handle, conn.peer, conn_data))
                    return
            if fin:
                self.abort(stream.handle)  # the stream ended inside its header
            return
        if not stream.opened:
            if data:
                stream.held.append(data)
            return
        if data:
            self._events.append(StreamData(stream.handle, data))
        if fin:
            self._events.append(StreamFinished(stream.handle))

    def _stream_failed(self, stream: _Stream, reason: str) -> None:
        if self._streams.get(stream.handle) is not stream:
            return
        opened = stream.opened
        self.abort(stream.handle)
        if stream.outgoing or stream.announced:
            self._events.append(StreamClosed(stream.handle, reason, opened))

    def _end_conn(self, conn: _Conn, reason: str, now: float) -> None:
        table = self._clients if conn.is_client else self._servers
        if table.get(conn.peer) is conn:
            del table[conn.peer]
            if not conn.quic.closed:
                self._closing.append(conn)
        for stream in list(conn.streams.values()):
            self._keep_final_stats(stream)
            if self._streams.pop(stream.handle, None) is not None and (stream.outgoing or stream.announced):
                self._events.append(StreamClosed(stream.handle, reason, stream.opened))
        conn.streams.clear()
        conn.awaiting_header.clear()
