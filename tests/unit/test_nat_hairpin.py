"""The NAT hairpin on hand-built packets; every checksum is checked by an independent full recompute."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytier.proxy.nat_hairpin import EntryState, NatHairpin
from pytier.wire.errors import WireError

V = IPv4Address("10.144.144.1")
F = IPv4Address("10.144.144.0")
NET = IPv4Network("10.144.144.0/24")
D = IPv4Address("10.144.144.2")
SUBNET_HOST = IPv4Address("192.168.50.7")
L = 15000
SPORT = 40000

SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
LINUX_SYN_OPTIONS = bytes.fromhex("020405b40402080a0001e2400000000001030307")


def ref_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def packet(
    src: IPv4Address,
    sport: int,
    dst: IPv4Address,
    dport: int,
    flags: int,
    *,
    payload: bytes = b"",
    options: bytes = b"",
    seq: int = 1000,
    ack: int = 0,
    ip_options: bytes = b"",
    frag: int = 0x4000,
    ident: int = 7,
) -> bytes:
    thl = 20 + len(options)
    seg = (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, 64240, 0, 0)
        + options
        + payload
    )
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(seg))
    seg = seg[:16] + struct.pack("!H", ref_checksum(pseudo + seg)) + seg[18:]
    ihl = 20 + len(ip_options)
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + len(seg), ident, frag, 64, 6, 0, src.packed, dst.packed
        )
        + ip_options
    )
    hdr = hdr[:10] + struct.pack("!H", ref_checksum(hdr)) + hdr[12:]
    return hdr + seg


class Seen:
    """The fields of a packet, read independently of the code under test, checksums verified."""

    def __init__(self, pkt: bytes | bytearray) -> None:
        pkt = bytes(pkt)
        ihl = (pkt[0] & 0x0F) * 4
        assert ref_checksum(pkt[:ihl]) == 0, "IPv4 header checksum"
        self.src = IPv4Address(pkt[12:16])
        self.dst = IPv4Address(pkt[16:20])
        seg = pkt[ihl:]
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(seg))
        assert ref_checksum(pseudo + seg) == 0, "TCP checksum"
        self.sport, self.dport, self.seq, self.ack = struct.unpack_from("!HHII", seg)
        self.flags = seg[13]
        thl = (seg[12] >> 4) * 4
        self.options = seg[20:thl]
        self.payload = seg[thl:]
        self.ip_rest = pkt[1:10] + pkt[20:ihl]  # everything but checksum and addresses


def hairpin(**kwargs: float) -> NatHairpin:
    return NatHairpin(V, NET, L, **kwargs)  # type: ignore[arg-type]


def test_syn_from_own_address_goes_to_listener_from_fake_address() -> None:
    nat = hairpin()
    syn = packet(V, SPORT, D, 80, SYN, options=LINUX_SYN_OPTIONS, seq=0xDEADBEEF)
    out = nat.intercept_syn(syn, now=0.0)
    assert out is not None
    seen = Seen(out)
    assert (seen.src, seen.sport, seen.dst, seen.dport) == (F, SPORT, V, L)
    assert seen.seq == 0xDEADBEEF and seen.flags == SYN and seen.options == LINUX_SYN_OPTIONS
    assert seen.ip_rest == syn[1:10]
    assert syn == packet(V, SPORT, D, 80, SYN, options=LINUX_SYN_OPTIONS, seq=0xDEADBEEF)  # input untouched
    [entry] = nat.entries()
    assert entry.client == (V, SPORT) and entry.destination == (D, 80)
    assert entry.state is EntryState.SYN_SEEN and entry.created == 0.0
    assert nat.fake_ip == F and len(nat) == 1


def test_full_conversation_through_the_hairpin() -> None:
    nat = hairpin()
    assert nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=1.0) is not None

    syn_ack = nat.rewrite_reply(packet(V, L, F, SPORT, SYN | ACK, seq=5000, ack=1001))
    assert syn_ack is not None
    seen = Seen(syn_ack)
    assert (seen.src, seen.sport, seen.dst, seen.dport) == (D, 80, V, SPORT)
    assert (seen.seq, seen.ack, seen.flags) == (5000, 1001, SYN | ACK)

    assert nat.original_destination(("10.144.144.0", SPORT)) == (D, 80)
    assert nat.entries()[0].state is EntryState.ACCEPTED

    for flags, payload in ((ACK, b""), (PSH | ACK, b"GET / HTTP/1.0\r\n\r\n"), (FIN | ACK, b""), (RST, b"")):
        out = nat.rewrite_inbound(packet(V, SPORT, D, 80, flags, payload=payload, seq=1001, ack=5001))
        assert out is not None
        seen = Seen(out)
        assert (seen.src, seen.sport, seen.dst, seen.dport) == (F, SPORT, V, L)
        assert (seen.flags, seen.payload, seen.seq, seen.ack) == (flags, payload, 1001, 5001)

    for flags, payload in ((PSH | ACK, b"HTTP/1.0 200 OK\r\n" * 50), (FIN | ACK, b"")):
        out = nat.rewrite_reply(packet(V, L, F, SPORT, flags, payload=payload, seq=5001, ack=1019))
        assert out is not None
        seen = Seen(out)
        assert (seen.src, seen.sport, seen.dst, seen.dport) == (D, 80, V, SPORT)
        assert (seen.flags, seen.payload) == (flags, payload)


def test_client_other_than_own_address_keeps_its_source() -> None:
    nat = hairpin()
    client = IPv4Address("10.144.144.9")
    out = nat.intercept_syn(packet(client, 5555, SUBNET_HOST, 443, SYN), now=0.0)
    assert out is not None
    seen = Seen(out)
    assert (seen.src, seen.sport, seen.dst, seen.dport) == (client, 5555, V, L)
    reply = nat.rewrite_reply(packet(V, L, client, 5555, SYN | ACK))
    assert reply is not None
    seen = Seen(reply)
    assert (seen.src, seen.sport, seen.dst, seen.dport) == (SUBNET_HOST, 443, client, 5555)
    assert nat.original_destination((str(client), 5555)) == (SUBNET_HOST, 443)
    assert nat.client_of((client, 5555)) == (client, 5555)


def test_ip_options_shift_the_tcp_header() -> None:
    nat = hairpin()
    syn = packet(V, SPORT, D, 80, SYN, ip_options=b"\x94\x04\x00\x00", payload=b"x")  # router alert
    out = nat.intercept_syn(syn, now=0.0)
    assert out is not None
    seen = Seen(out)
    assert (seen.src, seen.sport, seen.dst, seen.dport, seen.payload) == (F, SPORT, V, L, b"x")
    assert seen.ip_rest == syn[1:10] + b"\x94\x04\x00\x00"


def test_retransmitted_syn_reuses_the_entry() -> None:
    nat = hairpin()
    syn = packet(V, SPORT, D, 80, SYN)
    first = nat.intercept_syn(syn, now=0.0)
    again = nat.intercept_syn(syn, now=3.0)
    assert first == again and len(nat) == 1
    [entry] = nat.entries()
    assert entry.created == 0.0 and entry.touched == 3.0
    nat.original_destination((str(F), SPORT))
    assert nat.intercept_syn(syn, now=4.0) == first  # a late retransmit after accept still passes
    assert nat.entries()[0].state is EntryState.ACCEPTED


def test_same_client_port_to_another_destination_is_not_intercepted() -> None:
    nat = hairpin()
    assert nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0) is not None
    assert nat.intercept_syn(packet(V, SPORT, D, 81, SYN), now=0.0) is None
    assert nat.intercept_syn(packet(V, SPORT, SUBNET_HOST, 80, SYN), now=0.0) is None
    assert nat.rewrite_inbound(packet(V, SPORT, D, 81, ACK)) is None
    assert [e.destination for e in nat.entries()] == [(D, 80)]


def test_packets_that_are_not_ours() -> None:
    nat = hairpin()
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0)
    assert nat.rewrite_inbound(packet(V, SPORT + 1, D, 80, ACK)) is None  # unknown client port
    assert nat.rewrite_inbound(packet(IPv4Address("10.144.144.5"), SPORT, D, 80, ACK)) is None
    assert nat.rewrite_reply(packet(V, L + 1, F, SPORT, ACK)) is None  # not from the listener
    assert nat.rewrite_reply(packet(D, L, F, SPORT, ACK)) is None  # not from our address
    assert nat.rewrite_reply(packet(V, L, F, SPORT + 1, ACK)) is None  # unknown client
    assert nat.rewrite_reply(packet(V, L, V, SPORT, ACK)) is None  # V itself is never a hairpin client
    udp = bytearray(packet(V, SPORT, D, 80, SYN))
    udp[9] = 17
    assert nat.rewrite_inbound(udp) is None and nat.intercept_syn(udp, now=0.0) is None
    fragment = packet(V, SPORT, D, 80, ACK, frag=0x2000)
    assert nat.rewrite_inbound(fragment) is None
    assert nat.intercept_syn(packet(V, 1, D, 80, SYN, frag=0x0001), now=0.0) is None
    assert nat.original_destination(("10.144.144.1", SPORT)) is None  # direct local connection
    assert nat.original_destination(("10.144.144.0", SPORT + 1)) is None
    assert nat.original_destination(("not an address", SPORT)) is None
    assert nat.original_destination(("fe80::1", SPORT)) is None


def test_intercept_syn_wants_a_bare_syn() -> None:
    nat = hairpin()
    for flags in (ACK, SYN | ACK, SYN | RST, FIN, PSH | ACK):
        assert nat.intercept_syn(packet(V, SPORT, D, 80, flags), now=0.0) is None
    assert len(nat) == 0
    assert nat.intercept_syn(packet(V, SPORT, D, 80, SYN | 0x40 | 0x80), now=0.0) is not None  # ECN SYN


def test_ipv4_mapped_peer_address() -> None:
    nat = hairpin()
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0)
    assert nat.original_destination(("::ffff:10.144.144.0", SPORT)) == (D, 80)


def test_half_open_entries_expire() -> None:
    nat = hairpin(entry_timeout_s=120.0)
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0)
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=10.0)  # retransmit refreshes
    assert nat.expire(129.0) == 0 and len(nat) == 1
    assert nat.expire(130.0) == 1 and len(nat) == 0
    assert nat.rewrite_reply(packet(V, L, F, SPORT, SYN | ACK)) is None


def test_expiry_also_runs_from_intercept_syn() -> None:
    nat = hairpin(entry_timeout_s=30.0)
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0)
    nat.intercept_syn(packet(V, SPORT + 1, D, 80, SYN), now=31.0)
    assert [e.client for e in nat.entries()] == [(V, SPORT + 1)]


def test_accepted_entries_live_until_closed_then_linger() -> None:
    nat = hairpin(entry_timeout_s=30.0, linger_s=10.0)
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0)
    assert nat.original_destination((str(F), SPORT)) == (D, 80)
    assert nat.expire(1000.0) == 0
    client = nat.client_of((str(F), SPORT))
    assert client == (V, SPORT)
    assert nat.close(client, now=1000.0)
    assert nat.entries()[0].state is EntryState.CLOSED
    # The listener's FIN after close still finds its way back to the client, and the client's ACK in.
    assert nat.rewrite_reply(packet(V, L, F, SPORT, FIN | ACK)) is not None
    assert nat.rewrite_inbound(packet(V, SPORT, D, 80, ACK)) is not None
    assert nat.original_destination((str(F), SPORT)) is None  # closed: no new accept on it
    assert nat.expire(1009.0) == 0
    assert nat.expire(1010.0) == 1
    assert nat.rewrite_reply(packet(V, L, F, SPORT, ACK)) is None
    assert not nat.close(client)


def test_close_without_time_uses_the_latest_time_seen() -> None:
    nat = hairpin(linger_s=10.0)
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=50.0)
    nat.close((V, SPORT))
    assert nat.entries()[0].touched == 50.0
    assert nat.expire(59.0) == 0 and nat.expire(60.0) == 1


def test_new_syn_on_a_closed_entry_starts_afresh() -> None:
    nat = hairpin()
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0)
    nat.original_destination((str(F), SPORT))
    nat.close((V, SPORT), now=5.0)
    assert nat.intercept_syn(packet(V, SPORT, D, 8080, SYN), now=6.0) is not None
    [entry] = nat.entries()
    assert entry.destination == (D, 8080) and entry.state is EntryState.SYN_SEEN and entry.created == 6.0


def test_table_size_is_bounded() -> None:
    nat = NatHairpin(V, NET, L, max_entries=3)
    for i in range(3):
        assert nat.intercept_syn(packet(V, 1000 + i, D, 80, SYN), now=float(i)) is not None
    nat.original_destination((str(F), 1001))
    # Full: the stalest SYN-only entry (port 1000) makes room.
    assert nat.intercept_syn(packet(V, 2000, D, 80, SYN), now=3.0) is not None
    assert sorted(e.client[1] for e in nat.entries()) == [1001, 1002, 2000]
    nat.close((V, 1001), now=3.5)
    # A closed entry goes before any SYN-only one.
    assert nat.intercept_syn(packet(V, 2001, D, 80, SYN), now=4.0) is not None
    assert sorted(e.client[1] for e in nat.entries()) == [1002, 2000, 2001]
    for port in (1002, 2000, 2001):
        nat.original_destination((str(F), port))
    # Full of live connections: the new SYN is not intercepted and nothing is evicted.
    assert nat.intercept_syn(packet(V, 3000, D, 80, SYN), now=5.0) is None
    assert len(nat) == 3


def test_malformed_packets() -> None:
    nat = hairpin()
    good = packet(V, SPORT, D, 80, SYN)
    bad = [
        good[:19],
        good[:30],
        b"\x60" + good[1:],  # IPv6 version nibble
        b"\x44" + good[1:],  # IHL below 5
        good[:2] + struct.pack("!H", len(good) + 1) + good[4:],  # longer than the buffer
        good[:2] + struct.pack("!H", 30) + good[4:],  # TCP header cut
        good[:32] + b"\x40" + good[33:],  # TCP data offset 4
        good[:32] + b"\xf0" + good[33:],  # TCP data offset beyond the packet
    ]
    for pkt in bad:
        with pytest.raises(WireError):
            nat.intercept_syn(pkt, now=0.0)
        assert nat.rewrite_inbound(pkt) is None
        assert nat.rewrite_reply(pkt) is None
    assert len(nat) == 0


@given(st.binary(max_size=80))
def test_arbitrary_bytes(data: bytes) -> None:
    nat = hairpin()
    nat.intercept_syn(packet(V, SPORT, D, 80, SYN), now=0.0)
    assert nat.rewrite_inbound(data) is None or len(data) >= 40
    nat.rewrite_reply(data)
    with contextlib.suppress(WireError):
        nat.intercept_syn(data, now=1.0)


@given(
    sport=st.integers(1, 65535),
    dport=st.integers(1, 65535),
    dst=st.integers(0, 0xFFFFFFFF).map(IPv4Address),
    seq=st.integers(0, 0xFFFFFFFF),
    ack=st.integers(0, 0xFFFFFFFF),
    flags=st.integers(0, 0xFF),
    payload=st.binary(max_size=64),
    ident=st.integers(0, 0xFFFF),
    from_own=st.booleans(),
)
def test_rewrites_keep_checksums_exact(
    sport: int,
    dport: int,
    dst: IPv4Address,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes,
    ident: int,
    from_own: bool,
) -> None:
    """Incremental checksums equal what a full recomputation of the rewritten packet gives."""
    nat = hairpin()
    client = V if from_own else IPv4Address("10.144.144.77")
    seen_client = F if from_own else client
    out = nat.intercept_syn(packet(client, sport, dst, dport, SYN, ident=ident), now=0.0)
    assert out is not None
    assert bytes(out) == packet(seen_client, sport, V, L, SYN, ident=ident)
    args = {"payload": payload, "seq": seq, "ack": ack, "ident": ident}
    inbound = nat.rewrite_inbound(packet(client, sport, dst, dport, flags, **args))  # type: ignore[arg-type]
    assert inbound is not None
    assert bytes(inbound) == packet(seen_client, sport, V, L, flags, **args)  # type: ignore[arg-type]
    reply = nat.rewrite_reply(packet(V, L, seen_client, sport, flags, **args))  # type: ignore[arg-type]
    assert reply is not None
    assert bytes(reply) == packet(dst, dport, client, sport, flags, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("own", "net", "port"),
    [
        ("10.144.145.1", "10.144.144.0/24", L),
        ("10.144.144.0", "10.144.144.0/24", L),
        ("10.144.144.255", "10.144.144.0/24", L),
        ("10.144.144.1", "10.144.144.0/31", L),
        ("10.144.144.1", "10.144.144.0/24", 0),
        ("10.144.144.1", "10.144.144.0/24", 65536),
    ],
)
def test_constructor_refuses_unusable_settings(own: str, net: str, port: int) -> None:
    with pytest.raises(ValueError):
        NatHairpin(IPv4Address(own), IPv4Network(net), port)


def test_views_and_bytearrays_are_accepted_and_left_alone() -> None:
    nat = hairpin()
    syn = packet(V, SPORT, D, 80, SYN)
    expected = nat.intercept_syn(syn, now=0.0)
    for buf in (bytearray(syn), memoryview(syn)):
        assert nat.intercept_syn(buf, now=0.0) == expected
        assert nat.rewrite_inbound(buf) == expected
    assert syn == packet(V, SPORT, D, 80, SYN)
