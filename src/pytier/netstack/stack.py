"""The user-space TCP stack behind `--use-smoltcp`: raw IPv4 packets in, byte streams and packets out.

Sans-IO, shaped like aioquic's QuicConnection. The owner:
* feeds every packet read from TUN that may be ours to `receive_packet(packet, now)`;
* drains `next_event()` (SynReceived, Connected, DataReceived, PeerFinished, Writable,
  ConnectionClosed) and acts on it with `accept`, `refuse`, `send`, `shutdown_write`, `close`,
  `abort`, `pause_reading`, `resume_reading`, `connect`;
* then writes out `packets_to_send(now)`: call it after each batch of received packets, after owner
  calls, and after `handle_timer` — it is also when ACKs are flushed;
* calls `handle_timer(now)` at `get_timer()`.

Any-IP: the stack answers for every four-tuple the `accept` predicate approves, whatever the
destination address, as smoltcp does with any_ip. An approved SYN is held (SynReceived) until the
owner accepts it (SYN|ACK) or refuses it (RST), so a proxy can first reach the real destination.
Segments of approved tuples without a connection get the RFC 9293 RST; packets of tuples the
predicate declines are dropped untouched (counted in `drops["not ours"]`), so the owner may feed
more than it means the stack to take.

Nothing received raises: malformed packets are counted in `drops` by reason and ignored.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from pytier.netstack.config import NetStackConfig
from pytier.netstack.connection import F_ACK, F_FIN, F_RST, F_SYN, MASK, Connection, State, unwrap
from pytier.netstack.events import (
    ConnectionClosed,
    Endpoint,
    FourTuple,
    NetStackError,
    NetStackEvent,
    SynReceived,
)
from pytier.netstack.segment import emit_packet
from pytier.wire import ipv4
from pytier.wire.errors import WireError
from pytier.wire.ipv4 import PROTO_TCP
from pytier.wire.tcp import HEADER as TCP_HEADER
from pytier.wire.tcp import TcpFlags, TcpRepr

__all__ = ["ConnectionInfo", "NetStack"]

ISN_CLOCK_HZ = 250_000  # RFC 6528: the clock part of an ISN ticks every 4 microseconds
_PORTS = struct.Struct("!HH")
_MULTICAST_FIRST_OCTET = 224  # 224.0.0.0/4 and, above it, 240.0.0.0/4 with the broadcast address


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    handle: int
    state: str
    src: Endpoint  # sent the opening SYN
    dst: Endpoint
    local: Endpoint
    remote: Endpoint
    bytes_sent: int  # acknowledged by the peer
    bytes_received: int
    send_buffered: int
    recv_buffered: int
    srtt: float | None  # seconds
    rto: float  # seconds
    cwnd: int  # bytes
    peer_window: int  # bytes
    mss: int  # bytes we send per segment
    retransmits: int


def _key(remote: Endpoint, local: Endpoint) -> bytes:
    """The demux key of a connection: how its peer's packets spell it (addresses, then ports)."""
    return remote.addr.packed + local.addr.packed + _PORTS.pack(remote.port, local.port)


class NetStack:
    """Every TCP connection of one user-space stack."""

    def __init__(
        self,
        *,
        accept: Callable[[FourTuple], bool],
        now: float,
        config: NetStackConfig | None = None,
        isn_secret: bytes | None = None,
    ) -> None:
        self.config = config or NetStackConfig()
        self._accept = accept
        self._epoch = now
        self._now = now
        self._isn_secret = isn_secret if isn_secret is not None else os.urandom(16)
        self._by_key: dict[bytes, Connection] = {}
        self._by_handle: dict[int, Connection] = {}
        self._time_wait: dict[bytes, Connection] = {}  # oldest first
        self._events: deque[NetStackEvent | Connection] = deque()
        self.out: list[bytes] = []
        self._dirty: list[Connection] = []
        self._timers: list[tuple[float, int, Connection]] = []
        self._timer_seq = 0
        self._next_handle = 1
        self.packets_in = 0
        self.packets_out = 0
        self.drops: Counter[str] = Counter()

    # ------------------------------------------------------------------------------------------
    # packets in

    def receive_packet(self, packet: bytes | bytearray | memoryview, now: float) -> None:
        """Take one IPv4 packet as read from TUN."""
        self._now = now
        self.packets_in += 1
        if type(packet) is not bytes:
            packet = bytes(packet)
        n = len(packet)
        if n >= 40 and packet[0] == 0x45:  # the usual case, without IPv4 options: checks inline
            hl = 20
            tlen = (packet[2] << 8) | packet[3]
            if not 40 <= tlen <= n:
                self.drops["malformed ipv4"] += 1
                return
        else:
            try:
                hl = ipv4.check(packet)
            except WireError:
                self.drops["malformed ipv4"] += 1
                return
            tlen = ipv4.total_len(packet)
            if tlen - hl < 20:
                self.drops["malformed tcp"] += 1
                return
        if packet[9] != PROTO_TCP:
            self.drops["not tcp"] += 1
            return
        if ipv4.is_fragment(packet):
            self.drops["fragment"] += 1
            return
        if self.config.verify_checksums:
            # Sums mod 0xFFFF, as wire.checksum explains: a valid header sums to 0 and so adds nothing
            # to the whole packet's sum, so one pass over the packet as it is checks the segment,
            # together with the pseudo-header (the 8 address bytes, the protocol and the length).
            if int.from_bytes(packet[:hl], "big") % 0xFFFF:
                self.drops["ipv4 checksum"] += 1
                return
            whole = int.from_bytes(packet if tlen == n else packet[:tlen], "big")
            if tlen & 1:
                whole <<= 8
            if (whole + int.from_bytes(packet[12:20], "big") + PROTO_TCP + tlen - hl) % 0xFFFF:
                self.drops["tcp checksum"] += 1
                return
        sport, dport, seq, ack, offset, flags, window, _, _ = TCP_HEADER.unpack_from(packet, hl)
        thl = (offset >> 4) << 2
        if thl < 20 or hl + thl > tlen or sport == 0 or dport == 0:
            self.drops["malformed tcp"] += 1
            return
        # addresses then ports, as _key() spells it; contiguous when there are no IPv4 options
        key = packet[12:24] if hl == 20 else packet[12:20] + packet[hl : hl + 4]
        conn = self._by_key.get(key)
        if (
            conn is not None
            and conn.state is State.TIME_WAIT
            and flags & (F_SYN | F_ACK | F_RST) == F_SYN
            and unwrap(seq, conn.rcv_nxt) > conn.rcv_nxt
        ):
            # RFC 6191-style reuse: a new SYN ahead of everything the old incarnation saw ends it.
            conn.state = State.CLOSED
            self.retire(conn)
            conn = None
        # Options matter in a SYN, and later only as SACK blocks (no timestamps are negotiated): the few
        # segments that carry any are parsed whole by the codec; the rest never are.
        opts: TcpRepr | None = None
        if flags & F_SYN or thl > 20:
            try:
                opts = TcpRepr.parse(packet[12:16], packet[16:20], packet[hl:tlen], verify_checksum=False)
            except WireError:
                self.drops["malformed tcp"] += 1
                return
        if conn is None:
            self._no_connection(packet, hl, tlen, sport, dport, seq, ack, flags, opts, now)
            return
        start = hl + thl
        payload = memoryview(packet)[start:tlen] if tlen > start else b""
        conn.on_segment(seq, ack, flags, window, payload, opts, now)

    def _no_connection(
        self,
        packet: bytes,
        hl: int,
        tlen: int,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        opts: TcpRepr | None,
        now: float,
    ) -> None:
        if packet[12] >= _MULTICAST_FIRST_OCTET or packet[16] >= _MULTICAST_FIRST_OCTET:
            self.drops["multicast"] += 1
            return
        src = Endpoint(IPv4Address(packet[12:16]), sport)
        dst = Endpoint(IPv4Address(packet[16:20]), dport)
        if not self._accept(FourTuple(src, dst)):
            self.drops["not ours"] += 1
            return
        if flags & F_RST:
            self.drops["rst without connection"] += 1
            return
        if flags & (F_SYN | F_ACK | F_FIN) == F_SYN and opts is not None:
            if len(self._by_key) - len(self._time_wait) >= self.config.max_connections:
                self.drops["connection limit"] += 1
                self._reset_reply(dst, src, 0, (seq + 1) & MASK, with_ack=True)
                return
            conn = self._new_connection(local=dst, remote=src, now=now)
            conn.open_passive(opts, now)
            self._events.append(SynReceived(conn.handle, src, dst))
            return
        # RFC 9293 3.10.7.1: a segment for no connection gets a RST that the sender will accept.
        if flags & F_ACK:
            self._reset_reply(dst, src, ack, 0, with_ack=False)
        else:
            seg_len = tlen - hl - ((packet[hl + 12] >> 4) << 2) + bool(flags & F_SYN) + bool(flags & F_FIN)
            self._reset_reply(dst, src, 0, (seq + seg_len) & MASK, with_ack=True)

    def _reset_reply(self, local: Endpoint, remote: Endpoint, seq: int, ack: int, *, with_ack: bool) -> None:
        segment = TcpRepr(
            src_port=local.port,
            dst_port=remote.port,
            seq=seq,
            ack=ack,
            flags=TcpFlags.RST | TcpFlags.ACK if with_ack else TcpFlags.RST,
            window=0,
        )
        self.out.append(emit_packet(local.addr, remote.addr, segment, self.config.ttl))

    def _new_connection(self, *, local: Endpoint, remote: Endpoint, now: float) -> Connection:
        key = _key(remote, local)
        handle = self._next_handle
        self._next_handle += 1
        conn = Connection(self, self.config, handle, key, local, remote, self._isn(key, now))
        self._by_key[key] = conn
        self._by_handle[handle] = conn
        return conn

    def _isn(self, key: bytes, now: float) -> int:
        """RFC 6528: a 4-microsecond clock plus a keyed hash of the four-tuple."""
        digest = hashlib.blake2b(key, digest_size=4, key=self._isn_secret).digest()
        return (int((now - self._epoch) * ISN_CLOCK_HZ) + int.from_bytes(digest, "big")) & MASK

    # ------------------------------------------------------------------------------------------
    # packets and events out, timers

    def packets_to_send(self, now: float) -> list[bytes]:
        """Everything to write to TUN now, in order."""
        self._now = now
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for conn in dirty:
                conn.dirty = False
                if conn.state is not State.CLOSED:
                    conn.transmit(now)
        out = self.out
        self.out = []
        self.packets_out += len(out)
        return out

    def next_event(self) -> NetStackEvent | None:
        events = self._events
        while events:
            item = events.popleft()
            if isinstance(item, Connection):
                data = item.take_data()
                if data is not None:
                    return data
                continue
            if isinstance(item, ConnectionClosed):
                self._by_handle.pop(item.handle, None)
            return item
        return None

    def get_timer(self) -> float | None:
        """When `handle_timer` is next due (it may find nothing to do: timers are re-armed lazily)."""
        timers = self._timers
        while timers:
            when, _, conn = timers[0]
            if conn.scheduled == when and conn.state is not State.CLOSED:
                return when
            heapq.heappop(timers)
        return None

    def handle_timer(self, now: float) -> None:
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, conn = heapq.heappop(timers)
            if conn.scheduled != when or conn.state is State.CLOSED:
                continue
            conn.scheduled = None
            conn.on_timer(now)
            if conn.state is not State.CLOSED:
                deadline = conn.next_deadline()
                if deadline is not None:
                    self.schedule(conn, deadline)

    # ------------------------------------------------------------------------------------------
    # the Host side that connections call

    def event(self, event: NetStackEvent) -> None:
        self._events.append(event)

    def queue_delivery(self, conn: Connection) -> None:
        self._events.append(conn)

    def wake(self, conn: Connection) -> None:
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def schedule(self, conn: Connection, when: float) -> None:
        # A connection has one live heap entry, at `scheduled`; later deadlines leave it in place and
        # `handle_timer` re-arms from the connection's own deadlines when it fires.
        if conn.scheduled is None or when < conn.scheduled:
            conn.scheduled = when
            self._timer_seq += 1
            heapq.heappush(self._timers, (when, self._timer_seq, conn))
            if len(self._timers) > 4 * len(self._by_key) + 64:
                self._compact_timers()

    def _compact_timers(self) -> None:
        self._timers = [
            (when, seq, conn)
            for when, seq, conn in self._timers
            if conn.scheduled == when and conn.state is not State.CLOSED
        ]
        heapq.heapify(self._timers)

    def retire(self, conn: Connection) -> None:
        if self._by_key.get(conn.key) is conn:
            del self._by_key[conn.key]
        self._time_wait.pop(conn.key, None)

    def time_wait(self, conn: Connection) -> None:
        self._time_wait[conn.key] = conn
        while len(self._time_wait) > self.config.max_time_wait:
            oldest = next(iter(self._time_wait.values()))
            oldest.state = State.CLOSED
            self.retire(oldest)
            self.drops["time-wait evicted"] += 1

    # ------------------------------------------------------------------------------------------
    # owner API

    def connect(self, src: Endpoint, dst: Endpoint) -> int:
        """Open a connection from `src` (any address) to `dst`; the SYN leaves at the next flush."""
        key = _key(dst, src)
        old = self._by_key.get(key)
        if old is not None:
            if old.state is not State.TIME_WAIT:
                raise NetStackError(f"connect: {src} -> {dst} is in use ({old.state.value})")
            old.state = State.CLOSED
            self.retire(old)
        if len(self._by_key) - len(self._time_wait) >= self.config.max_connections:
            raise NetStackError(f"connect: {self.config.max_connections} connections already open")
        conn = self._new_connection(local=src, remote=dst, now=self._now)
        conn.open_active()
        return conn.handle

    def accept(self, handle: int) -> None:
        """Answer a held SYN with SYN|ACK."""
        self._conn(handle).accept()

    def refuse(self, handle: int) -> None:
        """Answer a held SYN with RST."""
        self._conn(handle).refuse()

    def send(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes; return how many fit in the send buffer (a `Writable` follows a short count)."""
        return self._conn(handle).send(data)

    def send_capacity(self, handle: int) -> int:
        return self._conn(handle).send_capacity()

    def shutdown_write(self, handle: int) -> None:
        """FIN after the queued data; receiving goes on."""
        self._conn(handle).shutdown_write()

    def close(self, handle: int) -> None:
        """Shut both directions: FIN after the queued data; bytes still arriving reset the connection."""
        self._conn(handle).close(self._now)

    def abort(self, handle: int) -> None:
        """RST now; queued data is dropped."""
        self._conn(handle).abort()

    def pause_reading(self, handle: int) -> None:
        """Stop DataReceived for this handle; the receive window closes as the buffer fills."""
        self._conn(handle).pause_reading()

    def resume_reading(self, handle: int) -> None:
        self._conn(handle).resume_reading()

    def info(self, handle: int) -> ConnectionInfo:
        conn = self._conn(handle)
        return ConnectionInfo(
            handle=handle,
            state=conn.state.value,
            src=conn.src,
            dst=conn.dst,
            local=conn.local,
            remote=conn.remote,
            bytes_sent=conn.bytes_sent,
            bytes_received=conn.bytes_received,
            send_buffered=len(conn.snd_buf),
            recv_buffered=len(conn.rcv_buf),
            srtt=conn.rtt.srtt,
            rto=conn.rtt.rto,
            cwnd=conn.cwnd,
            peer_window=conn.snd_wnd,
            mss=conn.snd_mss,
            retransmits=conn.retransmits,
        )

    @property
    def connection_count(self) -> int:
        """Connections holding a four-tuple, TIME_WAIT included."""
        return len(self._by_key)

    @property
    def time_wait_count(self) -> int:
        return len(self._time_wait)

    def _conn(self, handle: int) -> Connection:
        conn = self._by_handle.get(handle)
        if conn is None:
            raise NetStackError(f"unknown connection handle {handle}")
        return conn
