"""The TCP proxy of a node: kernel-mode interception on the source side, connect-and-pipe on the
destination side, the choice of transport, and the entry table.

Source side. A TCP SYN read from TUN toward a node that takes one of our outbound transports is
held, not forwarded: the stream to the destination node is opened first, and only when that node
has connected to the real destination is the SYN rewritten into our kernel listener (NAT hairpin).
A refused or unreachable destination therefore reaches the client as a refused connection (RST),
not as "connected, then closed" as in EasyTier. Destinations that take no transport of ours get the
SYN as a plain packet: that is the fallback, recorded as a `Tcp` row. With `auto_metrics` (the
`--proxy-transport auto` mode) the transport is chosen per connection from the measured path
(pytier.proxy.choice); a plain-TCP choice is a `Tcp` row too, and every row says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import resource
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address
from typing import Any, cast

from pytier.netstack.events import Endpoint
from pytier.proxy.choice import AutoChooser, PathMetrics
from pytier.proxy.entries import EntryState, EntryTable, ProxyEntry, TransportType
from pytier.proxy.nat_hairpin import NatHairpin
from pytier.proxy.pipe import ProxyStream, pipe, pipe_streams
from pytier.proxy.transport import ConnectRefused, Incoming, Transport
from pytier.proxy.userspace import UserspaceStack
from pytier.wire.errors import WireError
from pytier.wire.ipv4 import Ipv4Repr
from pytier.wire.messages import KcpConnData, RoutePeerInfo, SocketAddr
from pytier.wire.tcp import TcpFlags, TcpRepr

log = logging.getLogger("pytier.proxy")

DST_CONNECT_TIMEOUT_S = 10.0
# A stream opened for a client whose SYN then never reached the listener (the client gave up, or
# its SYNs kept being lost) is reset after this long; a later SYN of that client opens a new one.
# Without it each such connection held its stream and row on both nodes for as long as they ran.
READY_ACCEPT_TIMEOUT_S = 30.0
# Clients' SYNs let through to the kernel listener and not accepted yet, at most; the streams opened
# for more clients than that wait, their SYNs held. 5,000 connections opened at once overflowed the
# listener's queues (half of them then never got through: SYN cookies, dropped ACKs, the clients'
# backed-off retransmissions), and every one of those handshakes crosses TUN twice.
MAX_UNACCEPTED = 256
LISTEN_BACKLOG = 1024
# Sweeps (5 s each) after the last closed connection during which freed memory is handed back to the
# system: long enough to come after everything a closed connection leaves for a while (its row, 5 s;
# KCP's time-wait and the hairpin's closed entry, 10 s).
TRIM_SWEEPS = 4
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 3
PLAIN_FLOW_IDLE_S = 120.0
_TCP = 6
_SYN = 0x02
_RST = 0x04
_FIN = 0x01
_ACK = 0x10
_PORTS = struct.Struct("!HH")


def _addr_port(ip: bytes, port: int) -> str:
    return f"{IPv4Address(ip)}:{port}"


class _PlainFlow:
    __slots__ = ("entry_key", "last")

    def __init__(self, entry_key: int, now: float) -> None:
        self.entry_key = entry_key
        self.last = now


class ProxyService:
    def __init__(
        self,
        *,
        own: IPv4Interface,
        write_tun: Callable[[bytes | bytearray], object],
        peer_for_ip: Callable[[bytes], int | None],
        peer_info: Callable[[int], RoutePeerInfo | None],
        next_hop: Callable[[int], int | None],
        outbound: list[Transport],
        inbound: list[Transport],
        userspace: bool = False,
        mtu: int = 1360,
        netmaps: Sequence[tuple[IPv4Network, IPv4Network]] = (),
        auto_metrics: Callable[[int, bool, bool], PathMetrics] | None = None,
    ) -> None:
        """`netmaps`: (real, mapped) prefixes of the subnets this node exports under another prefix.
        `auto_metrics(peer, accepts_kcp, accepts_quic)`: the path toward a destination node, for
        choosing among the outbound transports per connection; None: the first one it takes."""
        self.own = own
        self._own_ip = own.ip.packed
        self._write_tun = write_tun
        self._peer_for_ip = peer_for_ip
        self._peer_info = peer_info
        self._next_hop = next_hop
        self._outbound = outbound
        self._inbound = inbound
        self.entries = EntryTable()
        self.nat: NatHairpin | None = None
        self._listener: asyncio.Server | None = None
        self._listener_port = b""
        self._pending: set[tuple[bytes, int]] = set()
        # Streams opened for a client, until the listener accepts it: (stream, row, opened at).
        self._ready: dict[tuple[bytes, int], tuple[ProxyStream, int, float]] = {}
        # Streams opened while MAX_UNACCEPTED SYNs were out: (client's SYN, key, stream, row); their
        # keys stay in _pending, so a retransmitted SYN is not taken for a new connection.
        self._held: deque[tuple[bytes, tuple[bytes, int], ProxyStream, int]] = deque()
        self._plain: dict[bytes, _PlainFlow] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._use_userspace = userspace
        self._mtu = mtu
        self._userspace: UserspaceStack | None = None
        self._us_choice: dict[bytes, tuple[int, Transport, ProxyEntry, int]] = {}
        self._netmaps = list(netmaps)
        self._auto_metrics = auto_metrics
        self._auto = AutoChooser()
        self._closed_seen = 0
        self._trim_sweeps_left = 0
        for transport in inbound:
            transport.on_incoming = self._on_incoming

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        _raise_open_files_limit()
        if self._outbound and self._use_userspace:
            self._userspace = UserspaceStack(mtu=self._mtu, write_tun=self._write_tun, on_syn=self._on_us_syn)
            log.info("TCP proxy: intercepting with the user-space TCP stack (%s)",
                     ", ".join(t.kind.name for t in self._outbound))
        elif self._outbound:
            # A burst of intercepted connections all lands here at once; the default backlog of
            # 100 would drop SYNs and cost the clients a second per retransmit.
            self._listener = await asyncio.start_server(self._on_accept, str(self.own.ip), 0,
                                                        reuse_address=True, backlog=LISTEN_BACKLOG)
            port = self._listener.sockets[0].getsockname()[1]
            self._listener_port = port.to_bytes(2, "big")
            self.nat = NatHairpin(self.own.ip, self.own.network, port)
            log.info("TCP proxy: intercepting via %s:%d (%s)", self.own.ip, port,
                     ", ".join(t.kind.name for t in self._outbound))
        self._spawn(self._sweep())

    async def close(self) -> None:
        if self._userspace is not None:
            self._userspace.close()
        if self._listener is not None:
            self._listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            # The local clients' sockets were reset above; their RSTs still have to come out of
            # TUN and through the hairpin before the device goes.
            await asyncio.sleep(0.05)
        for stream, _key, _at in self._ready.values():
            stream.abort()
        self._ready.clear()
        for _syn, _client, stream, _key in self._held:
            stream.abort()
        self._held.clear()
        # Resetting every stream now tells the other nodes at once, rather than after their timeouts.
        for transport in {id(t): t for t in (*self._outbound, *self._inbound)}.values():
            await transport.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for key, flow in list(self._plain.items()):
                if now - flow.last > PLAIN_FLOW_IDLE_S:
                    self.entries.close(flow.entry_key)
                    del self._plain[key]
            if self.nat is not None:
                self.nat.expire(now)
            self._expire_ready(now)
            self.entries.purge()
            self._give_back_memory()

    def _give_back_memory(self) -> None:
        """After connections closed, return the C library's free pages to the system: glibc keeps
        what a burst of connections freed (ikcp's buffers, packets, socket buffers copied into Python)
        in its heaps, so RSS stayed near its peak (10,000 sequential KCP connections: 56.7 -> 79.8
        MiB) though nothing was left allocated. Costs about a millisecond when there is nothing to
        give back."""
        closed = self.entries.closed_total
        if closed != self._closed_seen:
            self._closed_seen = closed
            self._trim_sweeps_left = TRIM_SWEEPS
        if self._trim_sweeps_left > 0 and _MALLOC_TRIM is not None:
            self._trim_sweeps_left -= 1
            _MALLOC_TRIM(0)

    def _expire_ready(self, now: float) -> None:
        for key, (stream, entry_key, at) in list(self._ready.items()):
            if now - at > READY_ACCEPT_TIMEOUT_S:
                del self._ready[key]
                stream.abort()
                self.entries.close(entry_key)
                entry = self.entries.get(entry_key)
                log.info("proxy %s -> %s over %s: the client never reached the listener; reset",
                         entry.src, entry.dst, entry.transport.name)
        self._release_held()

    # ---- source side: packets read from TUN -------------------------------------------------

    def choose(self, peer_id: int) -> Transport | None:
        """The transport for a new connection to `peer_id`; None: plain TCP."""
        return self._choose(peer_id)[0]

    def _choose(self, peer_id: int, port: int | None = None) -> tuple[Transport | None, str | None]:
        """The first outbound transport (KCP before QUIC) that the destination node takes, or in auto
        mode the one the measured path and the destination port call for; with auto mode's reason."""
        info = self._peer_info(peer_id)
        if info is None:
            return None, None
        hop = self._next_hop(peer_id)
        hop_info = self._peer_info(hop) if hop is not None and hop != peer_id else None
        taken = [t for t in self._outbound if t.accepts(info, hop_info)]
        if self._auto_metrics is None:
            return (taken[0] if taken else None), None
        kinds = {t.kind: t for t in taken}
        metrics = self._auto_metrics(peer_id, TransportType.Kcp in kinds, TransportType.Quic in kinds)
        choice = self._auto.choose(peer_id, metrics, time.monotonic(), port)
        return kinds.get(choice.transport), choice.reason

    def on_tun_packet(self, pkt: bytes) -> bool:
        """Take a packet read from TUN if it belongs to the proxy; False lets it go out as is."""
        if len(pkt) < 40 or pkt[9] != _TCP:
            return False
        hl = (pkt[0] & 0x0F) << 2
        if self._userspace is not None:
            return self._on_us_packet(pkt, hl)
        nat = self.nat
        if nat is None:
            return False
        flags = pkt[hl + 13]
        if pkt[12:16] == self._own_ip and pkt[hl:hl + 2] == self._listener_port:
            out = nat.rewrite_reply(pkt)
            if out is not None:
                self._write_tun(out)
            return True
        if flags & _SYN and not flags & _ACK:
            return self._on_syn(pkt, hl)
        out = nat.rewrite_inbound(pkt)
        if out is not None:
            self._write_tun(out)
            return True
        if self._plain:
            self._track_plain(pkt, hl, flags)
        return False

    def _on_syn(self, pkt: bytes, hl: int) -> bool:
        assert self.nat is not None
        src, dst = pkt[12:16], pkt[16:20]
        sport, dport = _PORTS.unpack_from(pkt, hl)
        key = (src, sport)
        if key in self._pending:
            return True  # a retransmitted SYN while the destination is still being reached
        if key in self._ready:
            try:
                out = self.nat.intercept_syn(pkt, time.monotonic())
            except WireError:
                return True
            if out is not None:
                self._write_tun(out)
            return True
        if dst == self._own_ip or src != self._own_ip:
            # Kernel mode proxies this node's own connections only; TCP that a LAN host routes
            # through us goes as plain packets (subnet-to-subnet needs the user-space stack).
            return False
        plan = self._plan(pkt, hl, src, dst)
        if plan is None:
            return False
        self._pending.add(key)
        self._spawn(self._connect(bytes(pkt), key, dst, dport, *plan))
        return True

    def _plan(self, pkt: bytes, hl: int, src: bytes, dst: bytes
              ) -> tuple[int, Transport, ProxyEntry, int] | None:
        """For a SYN toward another node: the destination node, the transport it takes and a new
        row; None when the SYN goes out as a plain packet (no route, or no transport it takes)."""
        peer = self._peer_for_ip(dst)
        if peer is None:
            return None
        sport, dport = _PORTS.unpack_from(pkt, hl)
        transport, why = self._choose(peer, dport)
        if transport is None:
            self._start_plain(pkt, hl, src, sport, dst, dport, peer, why)
            return None
        entry = ProxyEntry(_addr_port(src, sport), _addr_port(dst, dport), transport.kind, peer_id=peer,
                           why=why)
        return peer, transport, entry, self.entries.add(entry)

    async def _connect(self, syn: bytes, key: tuple[bytes, int], dst: bytes, dport: int, peer: int,
                       transport: Transport, entry: ProxyEntry, entry_key: int) -> None:
        conn_data = KcpConnData(
            src=SocketAddr(IPv4Address(key[0]), key[1]), dst=SocketAddr(IPv4Address(dst), dport)
        ).encode()
        entry.state = EntryState.ConnectingDst
        try:
            stream = await transport.open(peer, conn_data)
        except (ConnectRefused, OSError, TimeoutError) as exc:
            self._pending.discard(key)
            self.entries.close(entry_key)
            log.info("proxy %s -> %s over %s: destination not reached (%s); client gets RST",
                     entry.src, entry.dst, transport.kind.name, exc)
            self._write_tun(_rst_for(syn))
            return
        except asyncio.CancelledError:
            self._pending.discard(key)
            raise
        entry.stats = stream.stats
        if len(self._ready) >= MAX_UNACCEPTED:
            self._held.append((syn, key, stream, entry_key))
            return
        self._pending.discard(key)
        self._release(syn, key, stream, entry_key)

    def _release_held(self) -> None:
        while self._held and len(self._ready) < MAX_UNACCEPTED:
            syn, key, stream, entry_key = self._held.popleft()
            self._pending.discard(key)
            self._release(syn, key, stream, entry_key)

    def _release(self, syn: bytes, key: tuple[bytes, int], stream: ProxyStream, entry_key: int) -> None:
        """Let the client's SYN through to the listener; its stream waits in _ready for the accept."""
        self._ready[key] = (stream, entry_key, time.monotonic())
        assert self.nat is not None
        try:
            out = self.nat.intercept_syn(syn, time.monotonic())
        except WireError:
            out = None
        if out is None:
            # The hairpin could not take it (table full, port collision): give up cleanly.
            self._ready.pop(key, None)
            stream.abort()
            self.entries.close(entry_key)
            self._write_tun(_rst_for(syn))
            return
        self._write_tun(out)

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        nat = self.nat
        peer_addr = writer.get_extra_info("peername")
        client = nat.client_of(peer_addr) if nat is not None and peer_addr else None
        ready = self._ready.pop((client[0].packed, client[1]), None) if client is not None else None
        if self._held:
            self._release_held()
        if ready is None or nat is None or client is None:
            writer.close()
            return
        stream, entry_key, _at = ready
        nat.original_destination(peer_addr)
        entry = self.entries.get(entry_key)
        _tune_socket(writer)
        log.info("proxy %s -> %s over %s: connected", entry.src, entry.dst, entry.transport.name)
        try:
            await pipe(reader, writer, stream, entry, outbound=True)
        except asyncio.CancelledError:
            # Only close() cancels this task, and pipe() has reset both sides by then. The task is
            # asyncio's own (the server's client_connected_cb), whose done callback in Python 3.11
            # asks a cancelled task for its exception: every connection still open when the node
            # stopped logged a traceback.
            return
        finally:
            nat.close(client, time.monotonic())
            self.entries.close(entry_key)
            log.info("proxy %s -> %s over %s: closed (%d bytes out, %d back)", entry.src, entry.dst,
                     entry.transport.name, entry.tx_bytes, entry.rx_bytes)

    # ---- source side, user-space mode ---------------------------------------------------------

    def _on_us_packet(self, pkt: bytes, hl: int) -> bool:
        us = self._userspace
        assert us is not None
        key = us.tuple_key(pkt, hl)
        if us.owns(key):
            us.feed(key, pkt)
            return True
        flags = pkt[hl + 13]
        if not (flags & _SYN and not flags & _ACK):
            if self._plain:
                self._track_plain(pkt, hl, flags)
            return False
        src, dst = pkt[12:16], pkt[16:20]
        if dst == self._own_ip:
            return False
        plan = self._plan(pkt, hl, src, dst)
        if plan is None:
            return False
        self._us_choice[key] = plan
        us.feed(key, pkt)
        return True

    def _on_us_syn(self, handle: int, src: Endpoint, dst: Endpoint) -> None:
        key = src.addr.packed + dst.addr.packed + src.port.to_bytes(2, "big") + dst.port.to_bytes(2, "big")
        choice = self._us_choice.pop(key, None)
        if choice is None:
            assert self._userspace is not None
            self._userspace.call(handle, "refuse")
            return
        self._spawn(self._connect_us(handle, src, dst, *choice))

    async def _connect_us(self, handle: int, src: Endpoint, dst: Endpoint, peer: int, transport: Transport,
                          entry: ProxyEntry, entry_key: int) -> None:
        us = self._userspace
        assert us is not None
        conn_data = KcpConnData(src=SocketAddr(src.addr, src.port),
                                dst=SocketAddr(dst.addr, dst.port)).encode()
        entry.state = EntryState.ConnectingDst
        try:
            remote = await transport.open(peer, conn_data)
        except (ConnectRefused, OSError, TimeoutError) as exc:
            self.entries.close(entry_key)
            log.info("proxy %s -> %s over %s: destination not reached (%s); client gets RST",
                     entry.src, entry.dst, transport.kind.name, exc)
            us.call(handle, "refuse")
            return
        entry.stats = remote.stats
        local = us.stream_for(handle)
        us.call(handle, "accept")
        log.info("proxy %s -> %s over %s: connected (user-space stack)", entry.src, entry.dst,
                 transport.kind.name)
        try:
            await pipe_streams(local, remote, entry)
        finally:
            self.entries.close(entry_key)
            log.info("proxy %s -> %s over %s: closed (%d bytes out, %d back)", entry.src, entry.dst,
                     entry.transport.name, entry.tx_bytes, entry.rx_bytes)

    # ---- plain (fallback) flows: rows only ---------------------------------------------------

    def _start_plain(self, pkt: bytes, hl: int, src: bytes, sport: int, dst: bytes, dport: int,
                     peer: int, why: str | None = None) -> None:
        flow_key = pkt[12:20] + pkt[hl:hl + 4]
        if flow_key in self._plain:
            self._plain[flow_key].last = time.monotonic()
            return
        entry = ProxyEntry(_addr_port(src, sport), _addr_port(dst, dport), TransportType.Tcp,
                           state=EntryState.Connected, peer_id=peer, why=why)
        self._plain[flow_key] = _PlainFlow(self.entries.add(entry), time.monotonic())

    def _track_plain(self, pkt: bytes, hl: int, flags: int) -> None:
        flow = self._plain.get(pkt[12:20] + pkt[hl:hl + 4])
        if flow is None:
            return
        flow.last = time.monotonic()
        if flags & (_FIN | _RST):
            entry = self.entries.get(flow.entry_key)
            if flags & _RST:
                self.entries.close(flow.entry_key)
                del self._plain[pkt[12:20] + pkt[hl:hl + 4]]
            else:
                entry.state = EntryState.ClosingSrc

    # ---- destination side ----------------------------------------------------------------------

    def _on_incoming(self, incoming: Incoming) -> None:
        self._spawn(self._serve_incoming(incoming))

    async def _serve_incoming(self, incoming: Incoming) -> None:
        try:
            data = KcpConnData.decode(incoming.conn_data)
        except WireError:
            incoming.refuse()
            return
        kind = getattr(incoming, "kind", TransportType.Kcp)
        entry = ProxyEntry(f"{data.src.ip}:{data.src.port}", f"{data.dst.ip}:{data.dst.port}", kind,
                           state=EntryState.ConnectingDst, peer_id=incoming.from_peer)
        entry_key = self.entries.add(entry)
        # The source addressed the subnet as it is exported; the host has its real address.
        dst = self._real_address(data.dst.ip)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(str(dst), data.dst.port), DST_CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            log.info("proxy %s -> %s for peer %d: cannot connect (%s)", entry.src, entry.dst,
                     incoming.from_peer, exc)
            incoming.refuse()
            self.entries.close(entry_key)
            return
        stream = incoming.accept()
        entry.stats = stream.stats
        _tune_socket(writer)
        try:
            await pipe(reader, writer, stream, entry, outbound=False)
        finally:
            self.entries.close(entry_key)

    def _real_address(self, addr: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
        for real, mapped in self._netmaps:
            if addr in mapped:
                return real.network_address + (int(addr) - int(mapped.network_address))
        return addr

    def peer_gone(self, peer_id: int) -> None:
        self._auto.forget(peer_id)
        for transport in {id(t): t for t in (*self._outbound, *self._inbound)}.values():
            transport.peer_gone(peer_id)

    def rows(self) -> list[dict[str, Any]]:
        return self.entries.rows()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None under another C library."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_MALLOC_TRIM = _malloc_trim()


def _tune_socket(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay, and keep-alive probes: a local side that vanished without a word (its RST lost
    in a TUN queue that overflowed, a host gone) is found within KEEPALIVE_IDLE_S + KEEPALIVE_COUNT x
    KEEPALIVE_INTERVAL_S instead of holding its pipe, row and stream on both nodes for as long as they
    run (the transport's own keep-alive keeps the stream up)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def _raise_open_files_limit() -> None:
    """Every proxied connection holds a socket on each node, and services often start with a soft
    limit of 1024 open files: without this the thousandth connection fails (EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (soft >= hard and hard != resource.RLIM_INFINITY):
        return
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        log.info("TCP proxy: open files limited to %d (could not raise it to %d)", soft, wanted)
        return
    log.debug("TCP proxy: open files limit raised from %d to %d", soft, wanted)


def _rst_for(syn: bytes) -> bytes:
    """A RST|ACK as the destination would send it to refuse this SYN."""
    ip = Ipv4Repr.parse(syn, verify_checksum=False)
    tcp = TcpRepr.parse(ip.src_addr, ip.dst_addr, syn[ip.header_len:ip.total_len], verify_checksum=False)
    reply = TcpRepr(src_port=tcp.dst_port, dst_port=tcp.src_port, seq=0, ack=(tcp.seq + 1) & 0xFFFFFFFF,
                    flags=TcpFlags.RST | TcpFlags.ACK, window=0)
    segment = reply.emit(ip.dst_addr, ip.src_addr)
    return Ipv4Repr(src_addr=ip.dst_addr, dst_addr=ip.src_addr, protocol=_TCP,
                    payload_len=len(segment)).emit(segment)
