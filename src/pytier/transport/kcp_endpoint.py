"""Sans-IO endpoint of EasyTier's KCP proxy transport: many KCP conversations with many peers.

One conversation carries one proxied TCP connection. Every packet is the payload of a KcpSrc (11,
initiator -> acceptor) or KcpDst (12, acceptor -> initiator) peer packet: a 14-byte header (conv,
src_session_id = initiator's peer id, dst_session_id = acceptor's peer id, flag) and a body. The
triple (conv, src, dst) names the conversation; the packet type tells which of our two roles it
belongs to, so both directions between two nodes coexist.

Shape as aioquic's QuicConnection: the owner feeds `receive(...)`, drains `datagrams_to_send(now)`
and `next_event()`, and calls `handle_timer(now)` at `get_timer()`. Call `datagrams_to_send` after
each batch of received packets: that is when ACKs (and data the ACKs let through) are flushed.

Session rules (wire protocol notes §7.1, with pytier's improvements):
* connect: SYN with the KcpConnData body; hedged attempts with a fresh conv every 200 ms (up to 5)
  and SYN retransmission per attempt; the first SYN|ACK wins, the others get RST. RST on an attempt
  means refused.
* accept: a SYN from an unknown triple raises IncomingConnection; the owner may take its time (e.g.
  to connect to the real destination first). Hedged SYNs with the same body from the same peer are
  attached to the pending connection rather than raised again; SYN|ACK goes to the first triple only
  and is retransmitted until the initiator's ACK|DATA (or data) arrives; the other triples get RST.
* data packets are ACK|DATA with ikcp segments; only those with a body reach ikcp.
* half close: FIN once everything sent was acknowledged, retransmitted until the peer's FIN comes;
  Established + FIN = peer finished, after both FINs the conversation lingers (time-wait) to
  answer a late FIN.
* PING is answered with PING|PONG unless the conversation is unknown or finished (then RST);
  any packet refreshes liveness; silence for the idle timeout drops the conversation.
* unknown triple: RST is ignored, everything but a SYN is answered with RST.
* a segment unacknowledged after KcpConfig.dead_link transmissions ends the conversation (RST) if
  the peer is still heard from and nothing more is acknowledged for KcpConfig.dead_link_grace_s.

Sending is paced per peer (kcp_pacer): the conversations with one peer share one delivery-rate
estimate and split it equally. Back-pressure: `writable(handle)` (0 = stop reading the TCP side);
`pause_reading`/`resume_reading` stop and restart DataReceived, closing KCP's window meanwhile.
Every handle ends with exactly one ConnectFailed or ConnectionClosed event.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable
from enum import Enum

from pytier.transport.kcp_config import KcpConfig
from pytier.transport.kcp_events import (
    CloseReason,
    Connected,
    ConnectFailed,
    ConnectionClosed,
    DataReceived,
    IncomingConnection,
    KcpEvent,
    PeerFinished,
)
from pytier.transport.kcp_pacer import PathRate
from pytier.transport.kcp_session import KcpSession
from pytier.wire.errors import WireError
from pytier.wire.kcp_header import KCP_HEADER_LEN, KcpFlag, pack_kcp_header, unpack_kcp_header
from pytier.wire.messages import KcpConnData
from pytier.wire.peer_header import PacketType

KCP_SRC = int(PacketType.KcpSrc)
KCP_DST = int(PacketType.KcpDst)
MASK32 = 0xFFFFFFFF

F_SYN = int(KcpFlag.SYN)
F_ACK = int(KcpFlag.ACK)
F_FIN = int(KcpFlag.FIN)
F_DATA = int(KcpFlag.DATA)
F_RST = int(KcpFlag.RST)
F_PING = int(KcpFlag.PING)
F_PONG = int(KcpFlag.PONG)
F_SYN_ACK = F_SYN | F_ACK
F_ACK_DATA = F_ACK | F_DATA
F_HANDSHAKE_BITS = F_SYN | F_ACK | F_FIN | F_DATA | F_RST

FIN_RETRANSMITS = 8
TIME_WAIT_FIN_REPLIES = 4
HEDGE_MATCH_S = 10.0  # a SYN this soon after a matching connection started is one of its hedges

# (acceptor role?, conv, src_session_id, dst_session_id)
Key = tuple[bool, int, int, int]
Datagram = tuple[int, int, bytes]


class State(Enum):
    SYN_SENT = "syn-sent"  # initiator, no attempt answered yet
    PENDING = "pending"  # acceptor, waiting for the owner's accept/refuse
    SYN_RECEIVED = "syn-received"  # acceptor, accepted, initiator not yet confirmed
    ESTABLISHED = "established"
    LOCAL_CLOSED = "local-closed"  # our FIN sent, still receiving
    PEER_CLOSED = "peer-closed"  # peer's FIN received, still sending
    TIME_WAIT = "time-wait"  # both finished; only answers a late FIN


SENDING_STATES = frozenset({State.SYN_RECEIVED, State.ESTABLISHED, State.PEER_CLOSED})
PINGING_STATES = frozenset({State.SYN_RECEIVED, State.ESTABLISHED, State.LOCAL_CLOSED})


class _Attempt:
    __slots__ = ("conv", "syn_at", "syn_backoff")

    def __init__(self, conv: int, syn_at: float, syn_backoff: float) -> None:
        self.conv = conv
        self.syn_at = syn_at
        self.syn_backoff = syn_backoff


class _Stream:
    """Per-handle state; the KCP details live in `session`."""

    __slots__ = (
        "aliases",
        "attempts",
        "closing",
        "conn_data",
        "conv",
        "dead_heard",
        "dead_since",
        "dead_una",
        "deadline",
        "fin_at",
        "fin_backoff",
        "fin_left",
        "fin_sent",
        "handle",
        "hedge_at",
        "hedges_started",
        "initiator",
        "last_ping",
        "last_rx",
        "peer",
        "peer_fin",
        "peer_finished",
        "prefix",
        "read_paused",
        "session",
        "started",
        "state",
        "synack_at",
        "synack_backoff",
        "wake",
        "want_fin",
    )

    def __init__(self, handle: int, initiator: bool, peer: int, conn_data: bytes, now: float) -> None:
        self.handle = handle
        self.initiator = initiator
        self.peer = peer
        self.conn_data = conn_data
        self.state = State.SYN_SENT if initiator else State.PENDING
        self.started = now
        self.last_rx = now
        self.last_ping = now
        self.conv = -1  # bound conversation, -1 until known
        self.prefix = b""  # header of our ACK|DATA packets
        self.session: KcpSession | None = None
        self.attempts: dict[int, _Attempt] = {}
        self.aliases: list[int] = []  # acceptor: convs of SYNs seen, first one answered
        self.hedge_at = -1.0
        self.hedges_started = 0
        self.deadline = -1.0  # connect / accept / handshake / time-wait limit, by state
        self.synack_at = -1.0
        self.synack_backoff = 0.0
        self.fin_at = -1.0
        self.fin_backoff = 0.0
        self.fin_left = 0
        self.want_fin = False
        self.fin_sent = False
        self.peer_fin = False
        self.peer_finished = False
        self.closing = False
        self.read_paused = False
        self.wake = -1.0
        self.dead_since = -1.0  # when a segment at the dead-link count was seen, una unchanged since
        self.dead_una = 0
        self.dead_heard = -1.0  # when the peer was first heard from after that


class KcpEndpoint:
    """All KCP conversations of one node. Handles are small ints, unique per endpoint."""

    def __init__(
        self,
        my_peer_id: int,
        *,
        now: float,
        config: KcpConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.my_peer_id = my_peer_id & MASK32
        self.config = config or KcpConfig()
        self._rng = rng or random.Random()
        self._epoch = now
        self._now = now
        self._next_conv = self._rng.getrandbits(32)
        self._next_handle = 1
        self._streams: dict[int, _Stream] = {}
        self._by_key: dict[Key, int] = {}
        self._hedge_index: dict[tuple[int, bytes], int] = {}
        self._events: deque[KcpEvent] = deque()
        self._out: list[Datagram] = []
        self._dirty: set[int] = set()
        self._paths: dict[int, PathRate] = {}  # pacing state per peer, shared by its conversations
        self._timers: list[tuple[float, int, int]] = []
        self._timer_seq = 0
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------
    # owner API: opening

    def connect(self, dst_peer_id: int, conn_data: bytes, now: float) -> int:
        """Open a conversation to `dst_peer_id`; the outcome is a Connected or ConnectFailed event."""
        self._now = now
        handle = self._new_handle()
        stream = _Stream(handle, True, dst_peer_id & MASK32, bytes(conn_data), now)
        self._streams[handle] = stream
        if len(self._streams) > self.config.max_conversations:
            self._finish(stream, CloseReason.LIMIT)
            return handle
        stream.deadline = now + self.config.connect_timeout_s
        self._start_attempt(stream, now)
        self._schedule(stream)
        return handle

    def accept(self, handle: int, now: float | None = None) -> None:
        """Answer a pending IncomingConnection with SYN|ACK; data may be sent from now on."""
        stream = self._streams.get(handle)
        if stream is None or stream.state is not State.PENDING or not stream.aliases:
            return
        if now is not None:
            self._now = now
        now = self._now
        self._bind(stream, stream.aliases[0])
        stream.state = State.SYN_RECEIVED
        stream.deadline = now + self.config.handshake_timeout_s
        stream.last_rx = stream.last_ping = now
        stream.session = self._new_session(stream, now)
        self._send_flag(stream, stream.conv, F_SYN_ACK)
        stream.synack_backoff = self.config.synack_retransmit_s
        stream.synack_at = now + stream.synack_backoff
        self._schedule(stream)

    def refuse(self, handle: int) -> None:
        """Answer a pending IncomingConnection with RST."""
        stream = self._streams.get(handle)
        if stream is None or stream.state is not State.PENDING:
            return
        for conv in stream.aliases:
            self._send_flag(stream, conv, F_RST)
        self._finish(stream, CloseReason.REFUSED)

    # ------------------------------------------------------------------------------------------
    # owner API: data

    def writable(self, handle: int) -> int:
        """Bytes `send` would take now; 0 means pause reading the TCP side until it grows."""
        stream = self._streams.get(handle)
        if stream is None or stream.session is None or stream.want_fin or stream.state not in SENDING_STATES:
            return 0
        return stream.session.writable()

    def send(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        """Queue data; returns how many bytes were taken (at most `writable(handle)`)."""
        stream = self._streams.get(handle)
        if stream is None or stream.session is None or stream.want_fin or stream.state not in SENDING_STATES:
            return 0
        taken = stream.session.write(data)
        if taken:
            self._dirty.add(handle)
        return taken

    def pause_reading(self, handle: int) -> None:
        """Stop raising DataReceived; data stays in KCP and its window closes towards the sender."""
        stream = self._streams.get(handle)
        if stream is not None:
            stream.read_paused = True

    def resume_reading(self, handle: int) -> None:
        stream = self._streams.get(handle)
        if stream is None or not stream.read_paused:
            return
        stream.read_paused = False
        self._deliver(stream)
        if handle in self._streams:
            self._dirty.add(handle)

    def shutdown_write(self, handle: int) -> None:
        """Half close: FIN follows once everything queued was acknowledged."""
        stream = self._streams.get(handle)
        if stream is None or stream.state in (State.SYN_SENT, State.PENDING, State.TIME_WAIT):
            return
        stream.want_fin = True
        self._dirty.add(handle)

    def close(self, handle: int) -> None:
        """Graceful close: like shutdown_write, and data arriving afterwards resets the conversation."""
        stream = self._streams.get(handle)
        if stream is None:
            return
        if stream.state in (State.SYN_SENT, State.PENDING):
            self.abort(handle)
            return
        stream.closing = True
        stream.read_paused = False
        self._deliver(stream)  # unread data now means the peer sent what nobody will read: RST
        self.shutdown_write(handle)

    def abort(self, handle: int) -> None:
        """Reset now: RST to the peer, state dropped."""
        stream = self._streams.get(handle)
        if stream is None:
            return
        for conv in self._all_convs(stream):
            self._send_flag(stream, conv, F_RST)
        self._finish(stream, CloseReason.ABORTED)

    def peer_gone(self, peer_id: int) -> None:
        """The peer became unreachable: close all its conversations now, sending nothing."""
        for stream in [s for s in self._streams.values() if s.peer == peer_id]:
            self._finish(stream, CloseReason.PEER_GONE)

    # ------------------------------------------------------------------------------------------
    # owner API: inspection

    def stats(self, handle: int) -> dict[str, int | float | str]:
        """Figures of a live handle (KeyError once it closed; ConnectionClosed carries the last)."""
        stream = self._streams[handle]
        figures: dict[str, int | float | str] = {
            "state": stream.state.value,
            "peer": stream.peer,
            "initiator": int(stream.initiator),
        }
        if stream.session is not None:
            figures.update(stream.session.stats())
        return figures

    def handles(self) -> list[int]:
        """Handles that have not ended yet."""
        return [h for h, s in self._streams.items() if s.state is not State.TIME_WAIT]

    # ------------------------------------------------------------------------------------------
    # I/O and time

    def receive(
        self, from_peer: int, packet_type: int, payload: bytes | bytearray | memoryview, now: float
    ) -> None:
        """One KcpSrc/KcpDst peer packet from `from_peer`. Malformed input is counted and dropped."""
        self._now = now
        try:
            conv, src, dst, flag = unpack_kcp_header(payload)
        except WireError:
            self._count("rx_malformed")
            return
        if packet_type == KCP_SRC:
            acceptor, peer, mine = True, src, dst
        elif packet_type == KCP_DST:
            acceptor, peer, mine = False, dst, src
        else:
            self._count("rx_wrong_type")
            return
        if mine != self.my_peer_id:
            self._count("rx_not_for_me")
            return
        if peer != from_peer:
            self._count("rx_sender_mismatch")
        key = (acceptor, conv, src, dst)
        handle = self._by_key.get(key)
        stream = self._streams.get(handle) if handle is not None else None
        if flag & F_PING:
            self._on_ping(stream, key, flag)
            return
        if stream is None:
            self._on_unknown(key, flag, payload, now)
            return
        stream.last_rx = now
        body = memoryview(payload)[KCP_HEADER_LEN:]
        state = stream.state
        if state is State.SYN_SENT:
            self._on_connecting(stream, conv, flag, body, now)
        elif state is State.PENDING or state is State.SYN_RECEIVED:
            if self._on_accepting(stream, conv, flag):
                self._on_open(stream, conv, flag, body, now)
        else:
            self._on_open(stream, conv, flag, body, now)
        # A conversation with new input is rescheduled when datagrams_to_send flushes it; a later
        # last_rx only moves the idle and keepalive deadlines later, so an earlier wake is harmless.
        if stream.handle in self._streams and stream.handle not in self._dirty:
            self._schedule(stream)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        """Packets to send: (to_peer, packet_type, payload). Flushes conversations touched since."""
        self._now = now
        if self._dirty:
            ms = self._ms(now)
            dirty = self._dirty
            self._dirty = set()
            for handle in dirty:
                stream = self._streams.get(handle)
                if stream is not None and stream.session is not None:
                    self._flush(stream, ms)
                    self._progress(stream, now)
                    if stream.handle in self._streams:
                        self._schedule(stream)
        out = self._out
        self._out = []
        return out

    def get_timer(self) -> float | None:
        """When `handle_timer` must be called next (absolute time), or None when nothing waits."""
        timers = self._timers
        while timers:
            when, _, handle = timers[0]
            stream = self._streams.get(handle)
            if stream is not None and stream.wake == when:
                return when
            heapq.heappop(timers)
        return None

    def handle_timer(self, now: float) -> None:
        self._now = now
        timers = self._timers
        due: list[_Stream] = []
        while timers and timers[0][0] <= now:
            when, _, handle = heapq.heappop(timers)
            stream = self._streams.get(handle)
            if stream is not None and stream.wake == when:
                stream.wake = -1.0
                due.append(stream)
        ms = self._ms(now)
        for stream in due:
            if stream.handle in self._streams:
                self._on_timer(stream, now, ms)
                if stream.handle in self._streams:
                    self._schedule(stream)

    def next_event(self) -> KcpEvent | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------------------------------
    # receive paths

    def _on_ping(self, stream: _Stream | None, key: Key, flag: int) -> None:
        if stream is not None:
            stream.last_rx = self._now
        if flag & F_PONG:
            return
        acceptor, conv, src, dst = key
        alive = stream is not None and stream.state is not State.TIME_WAIT
        reply = (flag | F_PONG) if alive else ((flag & ~F_PING) | F_RST)
        self._emit_raw(acceptor, conv, src, dst, reply)

    def _on_unknown(self, key: Key, flag: int, payload: bytes | bytearray | memoryview, now: float) -> None:
        acceptor, conv, src, dst = key
        if flag & F_RST:
            self._count("rx_rst_unknown")
            return
        if acceptor and flag & F_HANDSHAKE_BITS == F_SYN:
            self._on_syn(key, bytes(payload[KCP_HEADER_LEN:]), now)
            return
        self._count("rx_unknown")
        self._emit_raw(acceptor, conv, src, dst, F_RST)

    def _on_syn(self, key: Key, conn_data: bytes, now: float) -> None:
        _, conv, src, _ = key
        hedge_key = (src, conn_data)
        handle = self._hedge_index.get(hedge_key)
        stream = self._streams.get(handle) if handle is not None else None
        if (
            stream is not None
            and stream.state is not State.TIME_WAIT
            and now - stream.started < HEDGE_MATCH_S
        ):
            self._count("rx_hedged_syn")
            if stream.state is State.PENDING or stream.state is State.SYN_RECEIVED:
                stream.aliases.append(conv)  # answered with RST once one triple is confirmed
                self._by_key[key] = stream.handle
            else:
                self._emit_raw(True, conv, src, self.my_peer_id, F_RST)
            return
        handle = self._new_handle()
        stream = _Stream(handle, False, src, conn_data, now)
        stream.aliases.append(conv)
        self._streams[handle] = stream
        self._by_key[key] = handle
        if len(self._streams) > self.config.max_conversations:
            self._emit_raw(True, conv, src, self.my_peer_id, F_RST)
            self._drop(stream)
            self._count("rx_syn_over_limit")
            return
        if _hedgeable(conn_data):
            self._hedge_index[hedge_key] = handle
        stream.deadline = now + self.config.accept_timeout_s
        self._events.append(IncomingConnection(handle, src, conn_data))
        self._schedule(stream)

    def _on_connecting(self, stream: _Stream, conv: int, flag: int, body: memoryview, now: float) -> None:
        bits = flag & F_HANDSHAKE_BITS
        if bits in (F_SYN_ACK, F_ACK_DATA):
            self._establish_initiator(stream, conv, now)
            if bits == F_ACK_DATA and len(body):
                self._input(stream, body, now)
        elif bits & (F_RST | F_FIN):
            if not bits & F_RST:
                self._send_flag(stream, conv, F_RST)
            stream.attempts.pop(conv, None)
            for other in stream.attempts:
                self._send_flag(stream, other, F_RST)
            self._finish(stream, CloseReason.REFUSED)
        else:
            self._count("rx_unexpected")

    def _on_accepting(self, stream: _Stream, conv: int, flag: int) -> bool:
        """Packets for a pending or accepted-but-unconfirmed conversation. True: continue as open."""
        bits = flag & F_HANDSHAKE_BITS
        if bits & F_RST:
            if conv in stream.aliases:
                stream.aliases.remove(conv)
                self._by_key.pop((True, conv, stream.peer, self.my_peer_id), None)
            if stream.state is State.PENDING and stream.aliases:
                return False
            if stream.state is State.SYN_RECEIVED and conv != stream.conv:
                return False
            self._finish(stream, CloseReason.RESET)
            return False
        if stream.state is State.PENDING or conv != stream.conv:
            return False  # duplicate or hedged SYN while the owner decides; other triples wait
        if bits == F_SYN:
            self._send_flag(stream, conv, F_SYN_ACK)
            return False
        if bits & F_ACK_DATA == F_ACK_DATA or bits & F_FIN:
            self._establish_acceptor(stream)
            return True
        self._count("rx_unexpected")
        return False

    def _on_open(self, stream: _Stream, conv: int, flag: int, body: memoryview, now: float) -> None:
        bits = flag & F_HANDSHAKE_BITS
        if bits & F_RST:
            if stream.state is State.TIME_WAIT:
                self._drop(stream)
            else:
                self._finish(stream, CloseReason.RESET)
            return
        if stream.state is State.TIME_WAIT:
            if bits & F_FIN and stream.fin_left > 0:
                stream.fin_left -= 1
                self._send_flag(stream, conv, F_FIN)
            return
        if bits & F_DATA and len(body):
            self._input(stream, body, now)
            if stream.handle not in self._streams:
                return
        if bits & F_FIN:
            if not stream.peer_fin:
                stream.peer_fin = True
                self._deliver(stream)
                if stream.handle in self._streams:
                    self._progress(stream, now)
        elif bits == F_SYN_ACK and stream.initiator:
            self._send_flag(stream, conv, F_ACK_DATA)
        elif not bits & F_DATA and bits != F_SYN:
            self._count("rx_unexpected")

    def _input(self, stream: _Stream, body: memoryview, now: float) -> None:
        session = stream.session
        if session is None:
            return
        if not session.input(body, self._ms(now)):
            self._count("rx_kcp_rejected")
        self._dirty.add(stream.handle)
        self._deliver(stream)

    # ------------------------------------------------------------------------------------------
    # state changes

    def _establish_initiator(self, stream: _Stream, conv: int, now: float) -> None:
        for other in stream.attempts:
            if other != conv:
                self._send_flag(stream, other, F_RST)
                self._by_key.pop((False, other, self.my_peer_id, stream.peer), None)
        stream.attempts.clear()
        self._bind(stream, conv)
        stream.state = State.ESTABLISHED
        stream.deadline = -1.0
        stream.hedge_at = -1.0
        stream.last_ping = now
        stream.session = self._new_session(stream, now)
        self._send_flag(stream, conv, F_ACK_DATA)
        self._events.append(Connected(stream.handle))

    def _establish_acceptor(self, stream: _Stream) -> None:
        for other in stream.aliases:
            if other != stream.conv:
                self._send_flag(stream, other, F_RST)
                self._by_key.pop((True, other, stream.peer, self.my_peer_id), None)
        stream.aliases = [stream.conv]
        stream.state = State.ESTABLISHED
        stream.deadline = -1.0
        stream.synack_at = -1.0

    def _progress(self, stream: _Stream, now: float) -> None:
        """Send our FIN once everything is acknowledged; finish once both sides are done."""
        if stream.handle not in self._streams:
            return
        session = stream.session
        if (
            stream.want_fin
            and not stream.fin_sent
            and stream.state in (State.ESTABLISHED, State.PEER_CLOSED)
            and session is not None
            and session.unacked == 0
        ):
            stream.fin_sent = True
            self._send_flag(stream, stream.conv, F_FIN)
            if stream.state is State.ESTABLISHED:
                stream.state = State.LOCAL_CLOSED
                stream.fin_backoff = self.config.fin_retransmit_s
                stream.fin_at = now + stream.fin_backoff
                stream.fin_left = FIN_RETRANSMITS
        if stream.peer_fin and stream.state is State.ESTABLISHED:
            stream.state = State.PEER_CLOSED
        if stream.fin_sent and stream.peer_finished and stream.state is not State.TIME_WAIT:
            self._enter_time_wait(stream, now)

    def _deliver(self, stream: _Stream) -> None:
        """Hand received data to the owner (unless paused); then the peer's FIN, if it came."""
        session = stream.session
        if session is not None and not stream.read_paused and not stream.peer_finished:
            data = session.read()
            if data:
                if stream.closing:
                    for conv in self._all_convs(stream):
                        self._send_flag(stream, conv, F_RST)
                    self._finish(stream, CloseReason.ABORTED)
                    return
                self._events.append(DataReceived(stream.handle, data))
        if (
            stream.peer_fin
            and not stream.peer_finished
            and not stream.read_paused
            and (session is None or not session.has_unread)
        ):
            stream.peer_finished = True
            if not stream.closing:
                self._events.append(PeerFinished(stream.handle))

    def _enter_time_wait(self, stream: _Stream, now: float) -> None:
        self._events.append(ConnectionClosed(stream.handle, CloseReason.FINISHED, self._final_stats(stream)))
        self._release_session(stream)
        stream.state = State.TIME_WAIT
        stream.fin_at = -1.0
        stream.fin_left = TIME_WAIT_FIN_REPLIES
        stream.deadline = now + self.config.time_wait_s
        self._dirty.discard(stream.handle)

    def _finish(self, stream: _Stream, reason: CloseReason) -> None:
        """Terminal event and removal (for every ending but the FIN/FIN one)."""
        if stream.state is State.SYN_SENT:
            self._events.append(ConnectFailed(stream.handle, reason))
        elif stream.state is not State.TIME_WAIT:
            self._events.append(ConnectionClosed(stream.handle, reason, self._final_stats(stream)))
        self._drop(stream)

    def _drop(self, stream: _Stream) -> None:
        self._release_session(stream)
        self._streams.pop(stream.handle, None)
        self._dirty.discard(stream.handle)
        for conv in self._all_convs(stream):
            self._by_key.pop(self._key(stream, conv), None)
        hedge_key = (stream.peer, stream.conn_data)
        if self._hedge_index.get(hedge_key) == stream.handle:
            del self._hedge_index[hedge_key]
        stream.wake = -1.0

    def _new_session(self, stream: _Stream, now: float) -> KcpSession:
        ms = self._ms(now)
        path = self._paths.get(stream.peer)
        if path is None and self.config.pacing:
            path = self._paths[stream.peer] = PathRate(ms)
        return KcpSession(stream.conv, self.config, ms, path=path, flow_id=stream.handle)

    def _release_session(self, stream: _Stream) -> None:
        if stream.session is not None:
            stream.session.close()
            stream.session = None
            path = self._paths.get(stream.peer)
            if path is not None and path.flows <= 0:
                del self._paths[stream.peer]

    def _final_stats(self, stream: _Stream) -> dict[str, int | float | str]:
        figures: dict[str, int | float | str] = {"peer": stream.peer, "initiator": int(stream.initiator)}
        if stream.session is not None:
            figures.update(stream.session.stats())
        return figures

    # ------------------------------------------------------------------------------------------
    # timers

    def _on_timer(self, stream: _Stream, now: float, ms: int) -> None:
        cfg = self.config
        state = stream.state
        if state is State.TIME_WAIT:
            if now >= stream.deadline:
                self._drop(stream)
            return
        if state is State.SYN_SENT:
            self._connect_timer(stream, now)
            return
        if state is State.PENDING:
            if now >= stream.deadline:
                for conv in stream.aliases:
                    self._send_flag(stream, conv, F_RST)
                self._finish(stream, CloseReason.ACCEPT_TIMEOUT)
            return
        if now - stream.last_rx >= cfg.idle_timeout_s:
            self._send_flag(stream, stream.conv, F_RST)
            self._finish(stream, CloseReason.IDLE_TIMEOUT)
            return
        if state is State.SYN_RECEIVED:
            if now >= stream.deadline:
                for conv in stream.aliases:
                    self._send_flag(stream, conv, F_RST)
                self._finish(stream, CloseReason.HANDSHAKE_TIMEOUT)
                return
            if 0 <= stream.synack_at <= now:
                self._send_flag(stream, stream.conv, F_SYN_ACK)
                stream.synack_backoff *= 2
                stream.synack_at = now + stream.synack_backoff
        if state is State.LOCAL_CLOSED and 0 <= stream.fin_at <= now:
            self._send_flag(stream, stream.conv, F_FIN)
            stream.fin_left -= 1
            stream.fin_backoff *= 2
            stream.fin_at = now + stream.fin_backoff if stream.fin_left > 0 else -1.0
        if state in PINGING_STATES and now - max(stream.last_rx, stream.last_ping) >= cfg.keepalive_s:
            stream.last_ping = now
            self._send_flag(stream, stream.conv, F_PING)
        session = stream.session
        if session is not None:
            due = session.next_timer_ms()
            if due is not None and due <= ms:
                self._flush(stream, ms)
                self._progress(stream, now)

    def _connect_timer(self, stream: _Stream, now: float) -> None:
        if now >= stream.deadline:
            for conv in stream.attempts:
                self._send_flag(stream, conv, F_RST)
            self._finish(stream, CloseReason.CONNECT_TIMEOUT)
            return
        for attempt in stream.attempts.values():
            if attempt.syn_at <= now:
                self._send_flag(stream, attempt.conv, F_SYN, stream.conn_data)
                attempt.syn_backoff *= 2
                attempt.syn_at = now + attempt.syn_backoff
        if 0 <= stream.hedge_at <= now:
            self._start_attempt(stream, now)

    def _start_attempt(self, stream: _Stream, now: float) -> None:
        conv = self._take_conv(stream.peer)
        self._by_key[(False, conv, self.my_peer_id, stream.peer)] = stream.handle
        backoff = self.config.syn_retransmit_s
        stream.attempts[conv] = _Attempt(conv, now + backoff, backoff)
        stream.hedges_started += 1
        self._send_flag(stream, conv, F_SYN, stream.conn_data)
        if stream.hedges_started < self.config.hedge_attempts:
            stream.hedge_at = now + self.config.hedge_interval_s
        else:
            stream.hedge_at = -1.0

    def _schedule(self, stream: _Stream) -> None:
        wake = self._wake_time(stream)
        if wake == stream.wake:
            return
        stream.wake = wake
        if wake >= 0:
            self._timer_seq += 1
            heapq.heappush(self._timers, (wake, self._timer_seq, stream.handle))

    def _wake_time(self, stream: _Stream) -> float:
        cfg = self.config
        state = stream.state
        wake = stream.deadline if stream.deadline >= 0 else math.inf
        if state is State.SYN_SENT:
            for attempt in stream.attempts.values():
                wake = min(wake, attempt.syn_at)
            if stream.hedge_at >= 0:
                wake = min(wake, stream.hedge_at)
        elif state is not State.PENDING and state is not State.TIME_WAIT:
            wake = min(wake, stream.last_rx + cfg.idle_timeout_s)
            if state in PINGING_STATES:
                wake = min(wake, max(stream.last_rx, stream.last_ping) + cfg.keepalive_s)
            if stream.synack_at >= 0 and state is State.SYN_RECEIVED:
                wake = min(wake, stream.synack_at)
            if stream.fin_at >= 0 and state is State.LOCAL_CLOSED:
                wake = min(wake, stream.fin_at)
            if stream.session is not None:
                due = stream.session.next_timer_ms()
                if due is not None:
                    wake = min(wake, self._epoch + due / 1000.0)
        return wake if wake != math.inf else -1.0

    # ------------------------------------------------------------------------------------------
    # output

    def _flush(self, stream: _Stream, ms: int) -> None:
        session = stream.session
        if session is None:
            return
        bodies = session.flush(ms)
        if bodies:
            prefix = stream.prefix
            to_peer = stream.peer
            ptype = KCP_DST if not stream.initiator else KCP_SRC
            self._out.extend((to_peer, ptype, prefix + body) for body in bodies)
        if session.dead:
            self._on_dead_link(stream, session)

    def _on_dead_link(self, stream: _Stream, session: KcpSession) -> None:
        """A segment went through `dead_link` transmissions. That ends the conversation only if the
        peer is heard from afterwards (it answers pings) and still nothing more gets acknowledged
        for `dead_link_grace_s`: counted alone, an outage of ~10 s on a fast path (the
        retransmission timer grows slowly) reset every connection that the path, once back, would
        have carried on. A silent peer is the idle timeout's (and the peer table's) to end."""
        session.clear_dead()
        now = self._now
        una = session.snd_una
        if stream.dead_since < 0 or stream.dead_una != una:
            stream.dead_since = now
            stream.dead_una = una
            stream.dead_heard = -1.0
        elif stream.last_rx > stream.dead_since:
            # The grace runs from when the peer was heard again, so a path that comes back after
            # a long outage has the grace to get its acknowledgements through.
            if stream.dead_heard < 0:
                stream.dead_heard = now
            elif now - stream.dead_heard >= self.config.dead_link_grace_s:
                self._send_flag(stream, stream.conv, F_RST)
                self._finish(stream, CloseReason.DEAD_LINK)

    def _send_flag(self, stream: _Stream, conv: int, flag: int, body: bytes = b"") -> None:
        if stream.initiator:
            self._emit_raw(False, conv, self.my_peer_id, stream.peer, flag, body)
        else:
            self._emit_raw(True, conv, stream.peer, self.my_peer_id, flag, body)

    def _emit_raw(self, acceptor: bool, conv: int, src: int, dst: int, flag: int, body: bytes = b"") -> None:
        """A control packet on triple (conv, src, dst) from the given role."""
        payload = pack_kcp_header(conv, src, dst, flag) + body
        if acceptor:
            self._out.append((src, KCP_DST, payload))
        else:
            self._out.append((dst, KCP_SRC, payload))

    # ------------------------------------------------------------------------------------------
    # helpers

    def _bind(self, stream: _Stream, conv: int) -> None:
        stream.conv = conv
        if stream.initiator:
            stream.prefix = pack_kcp_header(conv, self.my_peer_id, stream.peer, F_ACK_DATA)
        else:
            stream.prefix = pack_kcp_header(conv, stream.peer, self.my_peer_id, F_ACK_DATA)

    def _key(self, stream: _Stream, conv: int) -> Key:
        if stream.initiator:
            return (False, conv, self.my_peer_id, stream.peer)
        return (True, conv, stream.peer, self.my_peer_id)

    def _all_convs(self, stream: _Stream) -> Iterable[int]:
        convs = set(stream.attempts) | set(stream.aliases)
        if stream.conv >= 0:
            convs.add(stream.conv)
        return sorted(convs)

    def _take_conv(self, peer: int) -> int:
        while True:
            conv = self._next_conv
            self._next_conv = (conv + 1) & MASK32
            if (False, conv, self.my_peer_id, peer) not in self._by_key:
                return conv

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _ms(self, now: float) -> int:
        # The epsilon keeps a timer set for an exact millisecond from reading as the one before.
        return max(0, int((now - self._epoch) * 1000.0 + 1e-6))

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


def _hedgeable(conn_data: bytes) -> bool:
    """Only SYNs naming a concrete TCP source can be recognised as hedges of one another."""
    try:
        src = KcpConnData.decode(conn_data).src
    except WireError:
        return False
    return src.port != 0 and not src.ip.is_unspecified
