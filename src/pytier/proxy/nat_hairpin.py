"""Kernel-mode interception: the NAT hairpin that turns a TCP connection read from TUN into one the
node's own kernel accepts on a local listener, sans-IO.

A client C:cp (usually the node itself, address V) connects to D:dp through the TUN device. Its SYN
is rewritten to C':cp -> V:L and written back to TUN, where L is the proxy's kernel listener and C'
is C, or the network's first address F when C is V: the kernel would not take a packet from its own
address arriving on TUN. The listener's replies V:L -> C':cp come out of TUN and are rewritten to
D:dp -> C:cp, so the client believes it talks to D. The accepted socket's peer address C':cp leads
back to D:dp (`original_destination`), which is where the proxy really connects.

Entries are keyed by the client's (address, port). One client port talking to two destinations at
once cannot be told apart at the listener (both would be C':cp -> V:L), so the second SYN is not
intercepted and the caller forwards it as a plain packet.

Per packet: one header unpack, one dict lookup, one bytearray copy, checksums fixed incrementally.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

from pytier.wire.checksum import apply_delta, delta16, delta32
from pytier.wire.errors import WireError

__all__ = [
    "DEFAULT_ENTRY_TIMEOUT_S",
    "DEFAULT_LINGER_S",
    "DEFAULT_MAX_ENTRIES",
    "ClientKey",
    "Endpoint",
    "EntryState",
    "NatEntry",
    "NatHairpin",
    "PeerAddr",
]

DEFAULT_ENTRY_TIMEOUT_S = 120.0  # seconds a SYN-only entry waits for the listener to accept it
DEFAULT_LINGER_S = 10.0  # seconds a closed entry still rewrites, so the final FIN/ACK exchange passes
DEFAULT_MAX_ENTRIES = 8192
SWEEP_INTERVAL_S = 1.0  # seconds between expiry sweeps driven by intercept_syn

ClientKey = tuple[IPv4Address, int]
Endpoint = tuple[IPv4Address, int]
PeerAddr = tuple[str | IPv4Address, int]  # a socket peer address as the kernel reports it

_PROTO_TCP = 6
_FRAGMENT_BITS = 0x3FFF  # MF flag and fragment offset
_SYN = 0x02
_RST = 0x04
_ACK = 0x10

# version/IHL, total length (skipping TOS), flags/fragment, protocol (skipping TTL), checksum, src, dst
_IP = struct.Struct("!BxH2xHxBHII")
_IP_CHECKSUM = 10
_IP_SRC = 12
_IP_DST = 16
_TCP_PORTS = struct.Struct("!HH")
_TCP_CHECKSUM = 16
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class EntryState(enum.Enum):
    SYN_SEEN = "syn-seen"  # the client's SYN was rewritten; the listener has not accepted yet
    ACCEPTED = "accepted"  # the listener accepted; the proxy owns the lifetime until close()
    CLOSED = "closed"  # the proxy closed; lingering so the last segments are still rewritten


@dataclass(frozen=True, slots=True)
class NatEntry:
    """A snapshot of one hairpin entry, for debugging and the management API."""

    client: ClientKey
    destination: Endpoint
    state: EntryState
    created: float
    touched: float  # last SYN, accept or close


class _Entry:
    __slots__ = ("created", "dst_addr", "dst_port", "state", "touched")

    def __init__(self, dst_addr: int, dst_port: int, now: float) -> None:
        self.dst_addr = dst_addr
        self.dst_port = dst_port
        self.state = EntryState.SYN_SEEN
        self.created = now
        self.touched = now


def _tcp_fields(packet: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int] | None:
    """(IP header length, src, dst, src port, dst port) of an unfragmented IPv4/TCP packet.

    None for other protocols and for fragments; WireError for a header that cannot be trusted.
    """
    n = len(packet)
    if n < 20:
        raise WireError(f"{n} bytes cannot hold an IPv4 header")
    ver_ihl, tlen, frag, proto, _, src, dst = _IP.unpack_from(packet)
    if ver_ihl >> 4 != 4:
        raise WireError(f"IP version {ver_ihl >> 4} is not 4")
    hl = (ver_ihl & 0x0F) << 2
    if hl < 20 or tlen > n or tlen < hl:
        raise WireError(f"IPv4 header length {hl} / total length {tlen} do not fit {n} bytes")
    if proto != _PROTO_TCP or frag & _FRAGMENT_BITS:
        return None
    if tlen < hl + 20 or (packet[hl + 12] >> 4) < 5 or hl + ((packet[hl + 12] >> 4) << 2) > tlen:
        raise WireError(f"TCP header does not fit the {tlen - hl}-byte IPv4 payload")
    sport, dport = _TCP_PORTS.unpack_from(packet, hl)
    return hl, src, dst, sport, dport


def _rewrite(
    packet: bytes | bytearray | memoryview,
    hl: int,
    src: int,
    new_src: int,
    dst: int,
    new_dst: int,
    port_offset: int,
    port: int,
    new_port: int,
) -> bytearray:
    """A copy of `packet` with new addresses and one new port, both checksums patched (RFC 1624)."""
    buf = bytearray(packet)
    addr_delta = delta32(src, new_src) + delta32(dst, new_dst)
    _U32.pack_into(buf, _IP_SRC, new_src)
    _U32.pack_into(buf, _IP_DST, new_dst)
    _U16.pack_into(buf, _IP_CHECKSUM, apply_delta(_U16.unpack_from(buf, _IP_CHECKSUM)[0], addr_delta))
    _U16.pack_into(buf, hl + port_offset, new_port)
    tcp_check = hl + _TCP_CHECKSUM
    tcp_delta = addr_delta + delta16(port, new_port)
    _U16.pack_into(buf, tcp_check, apply_delta(_U16.unpack_from(buf, tcp_check)[0], tcp_delta))
    return buf


def _key(addr: int, port: int) -> int:
    return (addr << 16) | port


class NatHairpin:
    """The NAT table and packet rewrites of kernel-mode interception for one node.

    `own_ip` is the TUN device's address V inside `network`; `listener_port` the port L of the
    proxy's kernel listener on V. Rewritten packets come back as new bytearrays; inputs are never
    modified. `now` is any monotonic clock in seconds.
    """

    def __init__(
        self,
        own_ip: IPv4Address,
        network: IPv4Network,
        listener_port: int,
        *,
        entry_timeout_s: float = DEFAULT_ENTRY_TIMEOUT_S,
        linger_s: float = DEFAULT_LINGER_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if own_ip not in network:
            raise ValueError(f"own address {own_ip} is outside the virtual network {network}")
        if network.prefixlen > 30 or own_ip in (network.network_address, network.broadcast_address):
            raise ValueError(
                f"{own_ip} in {network}: the hairpin needs a network of at least 4 addresses whose "
                "first address is free to serve as the fake client source"
            )
        if not 0 < listener_port < 65536:
            raise ValueError(f"listener port {listener_port} is not within 1..65535")
        if max_entries < 1:
            raise ValueError(f"max_entries {max_entries} must be at least 1")
        self.own_ip = own_ip
        self.fake_ip = network.network_address
        self.network = network
        self.listener_port = listener_port
        self.entry_timeout_s = entry_timeout_s
        self.linger_s = linger_s
        self.max_entries = max_entries
        self._own = int(own_ip)
        self._fake = int(self.fake_ip)
        self._entries: dict[int, _Entry] = {}
        self._now = float("-inf")
        self._next_sweep = float("-inf")

    def intercept_syn(self, packet: bytes | bytearray | memoryview, now: float) -> bytearray | None:
        """Record the client's SYN and return it rewritten toward the listener, for writing to TUN.

        None (forward the packet as usual) if it is not an unfragmented IPv4 TCP SYN without ACK, if
        the client port already has a live connection to another destination, or if the table is
        full of live connections. Raises WireError for a malformed packet.
        """
        fields = _tcp_fields(packet)
        if fields is None:
            return None
        hl, src, dst, sport, dport = fields
        if packet[hl + 13] & (_SYN | _ACK | _RST) != _SYN:
            return None
        self._tick(now)
        key = _key(src, sport)
        entry = self._entries.get(key)
        if entry is not None and entry.state is EntryState.CLOSED:
            del self._entries[key]
            entry = None
        if entry is None:
            if len(self._entries) >= self.max_entries and not self._make_room():
                return None
            entry = self._entries[key] = _Entry(dst, dport, now)
        elif entry.dst_addr != dst or entry.dst_port != dport:
            return None
        elif entry.state is EntryState.SYN_SEEN:
            entry.touched = now
        return self._to_listener(packet, hl, src, dst, dport)

    def rewrite_inbound(self, packet: bytes | bytearray | memoryview) -> bytearray | None:
        """A later client segment of an intercepted connection, rewritten toward the listener.

        None if the packet is not IPv4/TCP from a known client to that client's destination (this
        includes malformed packets: they are nobody's).
        """
        try:
            fields = _tcp_fields(packet)
        except WireError:
            return None
        if fields is None:
            return None
        hl, src, dst, sport, dport = fields
        entry = self._entries.get(_key(src, sport))
        if entry is None or entry.dst_addr != dst or entry.dst_port != dport:
            return None
        return self._to_listener(packet, hl, src, dst, dport)

    def rewrite_reply(self, packet: bytes | bytearray | memoryview) -> bytearray | None:
        """A segment from the listener (V:L), rewritten to come from the client's real destination.

        None if the packet is not from the listener to a known client.
        """
        try:
            fields = _tcp_fields(packet)
        except WireError:
            return None
        if fields is None:
            return None
        hl, src, dst, sport, dport = fields
        if src != self._own or sport != self.listener_port or dst == self._own:
            return None
        client = self._own if dst == self._fake else dst
        entry = self._entries.get(_key(client, dport))
        if entry is None:
            return None
        return _rewrite(packet, hl, src, entry.dst_addr, dst, client, 0, sport, entry.dst_port)

    def client_of(self, peer_addr: PeerAddr) -> ClientKey | None:
        """The client behind an accepted socket's peer address, or None if it did not come through
        the hairpin (a local process that connected straight to the listener appears as V itself).
        """
        host, port = peer_addr[0], peer_addr[1]
        try:
            addr = ip_address(host)
        except ValueError:
            return None
        if isinstance(addr, IPv6Address):
            if addr.ipv4_mapped is None:
                return None
            addr = addr.ipv4_mapped
        if addr == self.own_ip:
            return None
        return (self.own_ip if addr == self.fake_ip else addr), port

    def original_destination(self, peer_addr: PeerAddr) -> Endpoint | None:
        """Where the client behind an accepted socket meant to connect; marks its entry accepted.

        `peer_addr` is the socket's peer address as the kernel reports it (host string or address,
        port). None if no live entry matches: the listener should close that socket.
        """
        client = self.client_of(peer_addr)
        if client is None:
            return None
        entry = self._entries.get(_key(int(client[0]), client[1]))
        if entry is None or entry.state is EntryState.CLOSED:
            return None
        if entry.state is EntryState.SYN_SEEN:
            entry.state = EntryState.ACCEPTED
            entry.touched = max(entry.touched, self._now)
        return IPv4Address(entry.dst_addr), entry.dst_port

    def close(self, client: ClientKey, now: float | None = None) -> bool:
        """The proxied connection of `client` ended; its entry lingers `linger_s` more seconds.

        `now` defaults to the latest time this object was given. False if there was no entry.
        """
        if now is not None:
            self._tick(now)
        entry = self._entries.get(_key(int(client[0]), client[1]))
        if entry is None:
            return False
        entry.state = EntryState.CLOSED
        entry.touched = self._now
        return True

    def expire(self, now: float) -> int:
        """Drop SYN-only entries idle for `entry_timeout_s` and closed ones past their linger."""
        self._now = max(self._now, now)
        self._next_sweep = now + SWEEP_INTERVAL_S
        dead = [
            key
            for key, e in self._entries.items()
            if (e.state is EntryState.SYN_SEEN and now - e.touched >= self.entry_timeout_s)
            or (e.state is EntryState.CLOSED and now - e.touched >= self.linger_s)
        ]
        for key in dead:
            del self._entries[key]
        return len(dead)

    def entries(self) -> list[NatEntry]:
        return [
            NatEntry(
                client=(IPv4Address(key >> 16), key & 0xFFFF),
                destination=(IPv4Address(e.dst_addr), e.dst_port),
                state=e.state,
                created=e.created,
                touched=e.touched,
            )
            for key, e in self._entries.items()
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def _tick(self, now: float) -> None:
        if now > self._now:
            self._now = now
        if now >= self._next_sweep:
            self.expire(now)

    def _make_room(self) -> bool:
        """Evict one entry to admit a new SYN: the stalest closed one, else the stalest SYN-only one."""
        for state in (EntryState.CLOSED, EntryState.SYN_SEEN):
            candidates = [(e.touched, key) for key, e in self._entries.items() if e.state is state]
            if candidates:
                del self._entries[min(candidates)[1]]
                return True
        return False

    def _to_listener(
        self, packet: bytes | bytearray | memoryview, hl: int, src: int, dst: int, dport: int
    ) -> bytearray:
        new_src = self._fake if src == self._own else src
        return _rewrite(packet, hl, src, new_src, dst, self._own, 2, dport, self.listener_port)
