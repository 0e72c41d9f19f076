"""The aioquic adapter: the internals it leans on, and the null-crypto handshake as quinn runs it.

If an aioquic upgrade moves any internal that pytier.transport.quic_aioquic uses, a test here fails
with the name of what moved, before anything subtler breaks.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aioquic
import pytest
from aioquic import tls
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import QuicPacketRecovery
from aioquic.quic.stream import QuicStream, QuicStreamSender
from hypothesis import given
from hypothesis import strategies as st

from pytier.transport import quic_aioquic
from pytier.transport import quic_null_crypto as nc
from pytier.transport.quic_aioquic import (
    CONGESTION_CONTROL,
    MAX_STREAMS_BIDI,
    BbrCongestionControl,
    BbrPacer,
    NullCryptoPair,
    NullCryptoQuicConnection,
    make_configuration,
)
from pytier.transport.quic_params import TransportParams, decode_varint, encode_varint

# ---- the internals -----------------------------------------------------------------------------


def test_aioquic_is_the_pinned_version() -> None:
    assert aioquic.__version__ == "1.7.2"


@pytest.mark.parametrize(("name", "params"), [
    ("_initialize", ["peer_cid"]),
    ("_serialize_transport_parameters", []),
    ("_payload_received", ["context", "plain", "crypto_frame_required"]),
    ("_write_stream_limits", ["builder", "space", "stream"]),
    ("_alpn_handler", ["alpn_protocol"]),
    ("_update_traffic_key", ["direction", "epoch", "cipher_suite", "secret"]),
    ("_confirm_handshake", []),
    ("_replenish_connection_ids", []),
    ("_unblock_streams", ["is_unidirectional"]),
    ("_on_max_stream_data_delivery", ["delivery", "stream"]),
    ("_parse_transport_parameters", ["data", "from_session_ticket"]),
    ("_write_application", ["builder", "network_path", "now"]),
    ("_get_or_create_stream", ["frame_type", "stream_id"]),
    ("_get_or_create_stream_for_send", ["stream_id"]),
    ("_handle_max_data_frame", ["context", "frame_type", "buf"]),
    ("stop_stream", ["stream_id", "error_code"]),
    ("_stream_limit", ["stream_id"]),
    ("_write_ack_frame", ["builder", "space", "now"]),
    ("_write_connection_limits", ["builder", "space"]),
    ("_write_crypto_frame", ["builder", "space", "stream"]),
    ("_write_ping_frame", ["builder", "uids", "comment"]),
    ("_write_streams_blocked_frame", ["builder", "frame_type", "limit"]),
])
def test_overridden_and_called_connection_methods_keep_their_signatures(name: str, params: list[str]) -> None:
    method = getattr(QuicConnection, name, None)
    assert method is not None, f"QuicConnection.{name} is gone"
    assert list(inspect.signature(method).parameters)[1:] == params, f"QuicConnection.{name} changed"


def test_internal_attributes_are_where_the_adapter_expects_them() -> None:
    conn = NullCryptoQuicConnection(configuration=make_configuration(is_client=True))
    for attr in ("_loss", "_local_max_streams_bidi", "_local_max_streams_uni", "_host_cids", "_streams",
                 "_handshake_complete", "_pacing_at", "_consumed", "_local_max_data", "_events",
                 "_original_destination_connection_id", "_local_initial_source_connection_id",
                 "_local_max_stream_data_bidi_local", "_local_active_connection_id_limit", "_state"):
        assert hasattr(conn, attr), attr
    assert isinstance(conn._loss, QuicPacketRecovery)
    assert isinstance(conn._loss._cc, BbrCongestionControl)
    assert isinstance(conn._loss._pacer, BbrPacer)
    assert {"_rtt_smoothed", "_rtt_initialized", "_rtt_latest", "_rtt_initial"} <= set(vars(conn._loss))
    # ReorderTolerantRecovery replaces _detect_loss and calls what aioquic's own calls.
    for method in ("_detect_loss", "_on_packets_lost", "_in_persistent_congestion", "on_ack_received"):
        assert callable(getattr(QuicPacketRecovery, method, None)), method
    assert "K_PACKET_THRESHOLD" in inspect.getsource(QuicPacketRecovery._detect_loss)
    assert type(conn._loss).__name__ == "ReorderTolerantRecovery"
    sender = QuicStreamSender(stream_id=0, writable=True)
    assert {"_buffer_stop", "highest_offset", "_pending", "_pending_eof"} <= set(vars(sender))
    # The stream scheduler replaces the packet loop's walks over these, and keeps the queue empty.
    for attr in ("_streams_queue", "_streams_blocked_bidi", "_streams_blocked_uni", "_remote_max_data",
                 "_remote_max_data_used", "_ping_pending", "_probe_pending", "_crypto_streams"):
        assert hasattr(conn, attr), attr
    assert "_streams_queue" in inspect.getsource(QuicConnection._write_application)
    # The builder sizes packets from the crypto pair's tag size and calls encrypt_packet.
    source = inspect.getsource(QuicPacketBuilder)
    assert "aead_tag_size" in source and "encrypt_packet" in source
    for state in ("CLIENT_HANDSHAKE_START", "CLIENT_EXPECT_SERVER_HELLO", "CLIENT_POST_HANDSHAKE",
                  "SERVER_EXPECT_CLIENT_HELLO", "SERVER_EXPECT_FINISHED", "SERVER_POST_HANDSHAKE"):
        assert hasattr(tls.State, state), state


def test_configuration() -> None:
    client = make_configuration(is_client=True)
    assert client.max_datagram_size == 1200 and client.connection_id_length == 8
    assert client.congestion_control_algorithm == CONGESTION_CONTROL and client.supported_versions == [1]
    assert client.idle_timeout == 30.0


def test_null_crypto_pair() -> None:
    pair = NullCryptoPair()
    with pytest.raises(Exception, match="keys"):
        pair.decrypt_packet(b"\x41" + bytes(20), 9, 0)
    pair.recv.setup(cipher_suite=None, secret=b"", version=1)
    header = b"\x41" + bytes(8) + b"\x00\x07"
    packet = pair.encrypt_packet(header, b"\x01\x00", 7)
    assert packet == header + b"\x01\x00" + nc.tag(header, b"\x01\x00")
    assert pair.decrypt_packet(packet, 9, 8) == (header, b"\x01\x00", 7)
    # The tag is 8 bytes, there is no header protection, and key updates do nothing.
    assert pair.aead_tag_size == 8 and pair.key_phase == 0
    pair.update_key()
    assert pair.key_phase == 0
    with pytest.raises(Exception, match="tag"):
        pair.decrypt_packet(packet[:-1] + bytes([packet[-1] ^ 1]), 9, 8)


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 20)), max_size=80))
def test_faster_rangeset_add_gives_aioquics_results(adds: list[tuple[int, int]]) -> None:
    fast, slow = RangeSet(), RangeSet()
    for start, length in adds:
        fast.add(start, start + length)
        quic_aioquic.ORIGINAL_RANGESET_ADD(slow, start, start + length)
        assert list(fast) == list(slow)
    for start, _ in adds[:10]:
        fast.add(start)
        quic_aioquic.ORIGINAL_RANGESET_ADD(slow, start)
        assert list(fast) == list(slow)
    assert RangeSet.add is quic_aioquic._rangeset_add


# ---- a look at the packets ---------------------------------------------------------------------


@dataclass
class Packet:
    kind: str  # "initial", "handshake", "1rtt"
    first_byte: int
    dcid: bytes
    scid: bytes
    frames: list[tuple[int, bytes]]  # (frame type, CRYPTO data or b"")


def _frames(payload: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(payload):
        ftype, pos = decode_varint(payload, pos)
        if ftype in (0x00, 0x01, 0x1E):  # PADDING, PING, HANDSHAKE_DONE
            out.append((ftype, b""))
        elif ftype in (0x02, 0x03):  # ACK
            _, pos = decode_varint(payload, pos)
            _, pos = decode_varint(payload, pos)
            count, pos = decode_varint(payload, pos)
            _, pos = decode_varint(payload, pos)
            for _ in range(2 * count + (3 if ftype == 0x03 else 0)):
                _, pos = decode_varint(payload, pos)
            out.append((ftype, b""))
        elif ftype == 0x06:  # CRYPTO
            offset, pos = decode_varint(payload, pos)
            length, pos = decode_varint(payload, pos)
            assert offset == 0
            out.append((ftype, payload[pos:pos + length]))
            pos += length
        else:
            out.append((ftype, b""))
            break  # the rest is not needed by these tests
    return out


def packets(datagram: bytes, short_dcid_len: int = 8) -> Iterator[Packet]:
    pos = 0
    while pos < len(datagram):
        first = datagram[pos]
        if first == 0:
            # aioquic pads a client's Initial datagram after its packets (quinn ignores the rest)
            assert not any(datagram[pos:])
            return
        assert first & 0x40, "fixed bit"
        if first & 0x80:
            kind = {0: "initial", 2: "handshake"}[(first & 0x30) >> 4]
            p = pos + 5
            dcid = datagram[p + 1:p + 1 + datagram[p]]
            p += 1 + len(dcid)
            scid = datagram[p + 1:p + 1 + datagram[p]]
            p += 1 + len(scid)
            if kind == "initial":
                token_len, p = decode_varint(datagram, p)
                p += token_len
            length, p = decode_varint(datagram, p)
            end = p + length
            _header, payload, _pn = nc.unprotect(datagram[pos:end], p - pos)
        else:
            kind, dcid, scid = "1rtt", datagram[pos + 1:pos + 1 + short_dcid_len], b""
            end = len(datagram)
            _header, payload, _pn = nc.unprotect(datagram[pos:end], 1 + short_dcid_len)
        yield Packet(kind, first, bytes(dcid), bytes(scid), _frames(payload))
        pos = end


def test_handshake_sequence_is_quinns() -> None:
    now = 0.0
    client = NullCryptoQuicConnection(configuration=make_configuration(is_client=True))
    client.connect(("server", 0), now)
    [(d1, _)] = client.datagrams_to_send(now)
    # 1. Client: Initial padded to 1200 bytes, CRYPTO(offset 0) = its raw transport parameters.
    assert len(d1) == 1200
    [p1] = list(packets(d1))
    assert p1.kind == "initial" and p1.frames[0][0] == 0x06
    cparams = TransportParams.decode(p1.frames[0][1])
    assert cparams.initial_source_connection_id == p1.scid
    assert cparams.max_udp_payload_size == 1200
    assert cparams.initial_max_streams_bidi == MAX_STREAMS_BIDI == 8192
    assert cparams.initial_max_streams_uni == 0 and cparams.max_idle_timeout_ms == 30000
    assert cparams.stateless_reset_token is None and cparams.original_destination_connection_id is None
    assert not cparams.grease_quic_bit
    server = NullCryptoQuicConnection(configuration=make_configuration(is_client=False),
                                      original_destination_connection_id=p1.dcid)
    server.receive_datagram(d1, ("client", 0), now)
    [(d2, _)] = server.datagrams_to_send(now)
    # 2. Server: Initial with ACK only, then Handshake with CRYPTO = its parameters.
    p2 = list(packets(d2))
    assert [p.kind for p in p2] == ["initial", "handshake"]
    assert 0x06 not in [t for t, _ in p2[0].frames] and p2[0].frames[0][0] == 0x02
    sparams = TransportParams.decode(next(data for t, data in p2[1].frames if t == 0x06))
    assert sparams.original_destination_connection_id == p1.dcid
    assert sparams.initial_source_connection_id == p2[1].scid
    assert sparams.stateless_reset_token is not None and len(sparams.stateless_reset_token) == 16
    assert not server.handshake_complete
    client.receive_datagram(d2, ("server", 0), now)
    assert client.handshake_complete
    # 3. Client: Handshake with an ACK and no CRYPTO.
    d3 = [d for d, _ in client.datagrams_to_send(now)]
    p3 = [p for d in d3 for p in packets(d)]
    hs = [p for p in p3 if p.kind == "handshake"]
    assert hs and all(0x06 not in [t for t, _ in p.frames] for p in hs)
    for d in d3:
        server.receive_datagram(d, ("client", 0), now)
    # 4. The server's handshake completes on that packet; it sends HANDSHAKE_DONE in 1-RTT.
    assert server.handshake_complete
    p4 = [p for d, _ in server.datagrams_to_send(now) for p in packets(d)]
    assert any(p.kind == "1rtt" and (0x1E, b"") in p.frames for p in p4)
    assert server.peer_params == cparams and client.peer_params == sparams


def _quinn_like_initial(dcid: bytes, scid: bytes, params: bytes) -> bytes:
    """A client Initial as quinn sends it: 20-byte DCID, 2-byte packet number, padded to 1200."""
    crypto = b"\x06\x00" + encode_varint(len(params)) + params
    pn = b"\x00\x00"
    header_wo_len = (b"\xc1" + (1).to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
                     + b"\x00")
    payload_len = 1200 - len(header_wo_len) - 2 - len(pn) - nc.TAG_SIZE
    payload = crypto + bytes(payload_len - len(crypto))
    header = header_wo_len + (0x4000 | (len(pn) + len(payload) + nc.TAG_SIZE)).to_bytes(2, "big") + pn
    return nc.protect(header, payload)


def test_server_accepts_the_minimal_parameters_the_real_node_accepted_and_grease() -> None:
    dcid, scid = os.urandom(20), os.urandom(8)
    params = TransportParams(
        initial_source_connection_id=scid, initial_max_data=1 << 30,
        initial_max_stream_data_bidi_local=1250000, initial_max_stream_data_bidi_remote=1250000,
        initial_max_streams_bidi=255, max_idle_timeout_ms=30000,
        max_udp_payload_size=1200, active_connection_id_limit=2, grease_quic_bit=True, min_ack_delay_us=1000,
        unknown=((0x1B + 31 * 1234, b"grease"),),
    ).encode()
    datagram = _quinn_like_initial(dcid, scid, params)
    assert len(datagram) == 1200
    server = NullCryptoQuicConnection(configuration=make_configuration(is_client=False),
                                      original_destination_connection_id=dcid)
    server.receive_datagram(datagram, ("client", 0), 0.0)
    [(reply, _)] = server.datagrams_to_send(0.0)
    hs = [p for p in packets(reply) if p.kind == "handshake"]
    assert hs and hs[0].dcid == scid
    sparams = TransportParams.decode(next(d for t, d in hs[0].frames if t == 0x06))
    assert sparams.original_destination_connection_id == dcid
    assert server.peer_params is not None and server.peer_params.grease_quic_bit


# ---- flow and pacing ---------------------------------------------------------------------------


class Pair:
    """Client and server joined by a zero-delay in-memory link, with a virtual clock."""

    def __init__(self, stream_window: int = 4 << 20,
                 receive_budget: int = quic_aioquic.RECEIVE_CREDIT_BUDGET) -> None:
        self.now = 0.0
        self.client = NullCryptoQuicConnection(configuration=make_configuration(
            is_client=True, stream_window=stream_window, receive_credit_budget=receive_budget))
        self.budget = receive_budget
        self.client.connect(("s", 0), self.now)
        self.server: NullCryptoQuicConnection | None = None
        self.window = stream_window
        self.received: dict[int, bytearray] = {}

    def exchange(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for data, _ in self.client.datagrams_to_send(self.now):
                if self.server is None:
                    self.server = NullCryptoQuicConnection(
                        configuration=make_configuration(is_client=False, stream_window=self.window,
                                                         receive_credit_budget=self.budget),
                        original_destination_connection_id=data[6:6 + data[5]])
                self.server.receive_datagram(data, ("c", 0), self.now)
                moved = True
            if self.server is not None:
                for data, _ in self.server.datagrams_to_send(self.now):
                    self.client.receive_datagram(data, ("s", 0), self.now)
                    moved = True
                while (ev := self.server.next_event()) is not None:
                    if isinstance(ev, events.StreamDataReceived):
                        self.received.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            if not moved:
                break


def test_stream_credit_follows_what_the_application_consumed() -> None:
    pair = Pair(stream_window=64 * 1024)
    pair.exchange()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(sid, os.urandom(1 << 20))
    for _ in range(40):
        pair.now += 0.01
        pair.exchange()
    first = quic_aioquic.INITIAL_STREAM_WINDOW
    assert len(pair.received[sid]) == first  # the initial window, not aioquic's doubling
    assert pair.client.unsent_bytes(sid) == (1 << 20) - first  # the rest waits in the send buffer
    assert pair.server is not None
    pair.server.consume(sid, first)
    for _ in range(40):
        pair.now += 0.01
        pair.exchange()
    assert len(pair.received[sid]) == first + 64 * 1024  # what was read, plus the stream window


def test_pacer_releases_datagrams_at_the_pacing_rate() -> None:
    pair = Pair()
    pair.exchange()
    assert pair.server is not None
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(sid, os.urandom(4 << 20))
    bbr = pair.client.congestion.bbr
    bbr.cwnd = 10 << 20  # let the pacer alone limit the sender
    pair.client._streams[sid].max_stream_data_remote = 1 << 30
    pair.client.congestion.congestion_window = bbr.cwnd
    rate = bbr.pacing_rate
    released = 0
    start = pair.now
    for _ in range(200):
        released += sum(len(d) for d, _ in pair.client.datagrams_to_send(pair.now))
        pair.now += 0.0005
    elapsed = pair.now - start
    burst = max(2 * 1200, rate * 0.002) + 1200
    assert released <= rate * elapsed + burst
    assert released >= rate * elapsed * 0.8  # and it does send at that rate, not slower


def test_two_pytier_nodes_use_larger_datagrams_quinn_gets_1200() -> None:
    pair = Pair()
    pair.exchange()
    assert pair.server is not None
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(sid, os.urandom(200000))
    sizes = []
    for _ in range(20):
        pair.now += 0.005
        sizes += [len(d) for d, _ in pair.client.datagrams_to_send(pair.now)]
    assert max(sizes) == quic_aioquic.PYTIER_DATAGRAM_SIZE
    # A peer without pytier's parameter (quinn) gets no datagram over 1200 bytes.
    dcid, scid = os.urandom(20), os.urandom(8)
    params = TransportParams(
        initial_source_connection_id=scid, initial_max_data=1 << 30,
        initial_max_stream_data_bidi_local=1 << 20, initial_max_stream_data_bidi_remote=1 << 20,
        initial_max_streams_bidi=255, max_idle_timeout_ms=30000, max_udp_payload_size=1200,
        active_connection_id_limit=2).encode()
    server = NullCryptoQuicConnection(configuration=make_configuration(is_client=False),
                                      original_destination_connection_id=dcid)
    server.receive_datagram(_quinn_like_initial(dcid, scid, params), ("client", 0), 0.0)
    assert server._max_datagram_size == 1200


def test_server_completing_on_a_1rtt_packet_keeps_its_path_validated() -> None:
    """The client's Handshake ACK is lost; its first 1-RTT packet completes the server's handshake.
    aioquic validates a client's address only on a Handshake packet, and would abandon the path (and
    the connection) a few PTOs later; the adapter validates it on that 1-RTT packet as well."""
    now = 0.0
    client = NullCryptoQuicConnection(configuration=make_configuration(is_client=True))
    client.connect(("s", 0), now)
    [(d1, _)] = client.datagrams_to_send(now)
    server = NullCryptoQuicConnection(configuration=make_configuration(is_client=False),
                                      original_destination_connection_id=d1[6:6 + d1[5]])
    server.receive_datagram(d1, ("c", 0), now)
    for d, _ in server.datagrams_to_send(now):
        client.receive_datagram(d, ("s", 0), now)
    client.datagrams_to_send(now)  # the Handshake ACK: lost
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"hello")
    now += 0.01
    for d, _ in client.datagrams_to_send(now):
        if d[0] & 0x80 == 0:  # only the 1-RTT packet arrives
            server.receive_datagram(d, ("c", 0), now)
    assert server.handshake_complete and server._network_paths[0].is_validated
    received = b""
    for _ in range(400):  # 4 s: well past the path validation deadline
        now += 0.01
        for d, _ in client.datagrams_to_send(now):
            server.receive_datagram(d, ("c", 0), now)
        for d, _ in server.datagrams_to_send(now):
            client.receive_datagram(d, ("s", 0), now)
        for conn in (client, server):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
        while (ev := server.next_event()) is not None:
            assert not isinstance(ev, events.ConnectionTerminated), ev
            if isinstance(ev, events.StreamDataReceived):
                received += ev.data
    assert received == b"hello" and not server.closed


# ---- the stream scheduler -------------------------------------------------------------------------


def _idle_streams_then_bulk(count: int, *, aioquic_loop: bool = False) -> tuple[int, int, bytes]:
    """`count` streams that each moved 100 bytes and went idle, then one stream sending 300 KB:
    (stream visits, datagrams) of the bulk transfer, and what the server received on the bulk stream.
    A visit is a look at one stream by the packet loop: a read of its is_finished or a
    _write_stream_limits call. `aioquic_loop` runs aioquic's own packet loop instead, to show
    what the count measures."""
    pair = Pair()
    pair.exchange()
    for _ in range(count):
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(sid, b"i" * 100)
    for _ in range(300):  # 3 s: all delivered, and any retransmission done with
        pair.now += 0.01
        pair.exchange()
    assert pair.server is not None and len(pair.received) == count
    bulk = pair.client.get_next_available_stream_id()
    data = os.urandom(300_000)
    pair.client.send_stream_data(bulk, data)
    if aioquic_loop:
        for name in ("_write_application", "_get_or_create_stream", "_get_or_create_stream_for_send"):
            setattr(pair.client, name, types.MethodType(getattr(QuicConnection, name), pair.client))
        pair.client._streams_queue = list(pair.client._streams.values())
    visits = [0]
    is_finished = vars(QuicStream)["is_finished"]
    assert isinstance(is_finished, property) and is_finished.fget is not None
    read_is_finished = is_finished.fget
    limits = NullCryptoQuicConnection._write_stream_limits

    def counted_is_finished(stream: QuicStream) -> bool:
        visits[0] += 1
        return bool(read_is_finished(stream))

    def counted_limits(self: NullCryptoQuicConnection, builder: Any, space: Any, stream: QuicStream) -> None:
        visits[0] += 1
        limits(self, builder, space, stream)

    datagrams = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QuicStream, "is_finished", property(counted_is_finished))
        mp.setattr(NullCryptoQuicConnection, "_write_stream_limits", counted_limits)
        for _ in range(400):
            pair.now += 0.002
            sent = pair.client.datagrams_to_send(pair.now)
            datagrams += len(sent)
            for d, _ in sent:
                pair.server.receive_datagram(d, ("c", 0), pair.now)
            for d, _ in pair.server.datagrams_to_send(pair.now):
                pair.client.receive_datagram(d, ("s", 0), pair.now)
            while (ev := pair.server.next_event()) is not None:
                if isinstance(ev, events.StreamDataReceived):
                    pair.received.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                    pair.server.consume(ev.stream_id, len(ev.data))
            if len(pair.received.get(bulk, b"")) == len(data):
                break
    return visits[0], datagrams, bytes(pair.received.get(bulk, b""))


def test_a_packet_costs_the_same_with_10_or_2000_idle_streams() -> None:
    few_visits, few_datagrams, few_got = _idle_streams_then_bulk(10)
    many_visits, many_datagrams, many_got = _idle_streams_then_bulk(2000)
    assert len(few_got) == 300_000 and len(many_got) == 300_000
    assert few_datagrams > 200 and many_datagrams > 200
    # A few looks per datagram (the bulk stream, a stream whose credit is due), whatever the count.
    assert few_visits / few_datagrams < 4 and many_visits / many_datagrams < 4
    assert many_visits / many_datagrams < 1.5 * few_visits / few_datagrams
    # aioquic's own loop looks at every stream for every packet it builds.
    old_visits, old_datagrams, old_got = _idle_streams_then_bulk(2000, aioquic_loop=True)
    assert len(old_got) == 300_000
    assert old_visits / old_datagrams > 2000


def test_what_a_peer_may_send_unread_is_bounded_per_connection() -> None:
    """16 streams each with 512 KiB to send; the receiver reads 48 KiB of each (which raises their
    credit toward the 256 KiB window) and then nothing. What arrived unread stays within 16 initial
    windows plus the connection's 512 KiB budget, where 16 full windows would be 4.5 MiB."""
    budget, window, count = 512 << 10, 256 << 10, 16
    pair = Pair(stream_window=window, receive_budget=budget)
    pair.exchange()
    sids = []
    for _ in range(count):
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(sid, os.urandom(512 << 10))
        sids.append(sid)
    consumed = dict.fromkeys(sids, 0)
    for _ in range(300):
        pair.now += 0.005
        pair.exchange()
        assert pair.server is not None
        for sid in sids:
            take = min(len(pair.received.get(sid, b"")), 48 << 10) - consumed[sid]
            if take > 0:
                pair.server.consume(sid, take)
                consumed[sid] += take
    assert pair.server is not None
    assert all(c == 48 << 10 for c in consumed.values())
    unread = sum(pair.server._streams[sid].receiver.highest_offset - consumed[sid] for sid in sids)
    assert unread <= count * quic_aioquic.INITIAL_STREAM_WINDOW + budget
    assert unread > budget  # the budget was used: the streams were granted more than their initial window
    assert pair.server.extra_credit_total <= budget
    # Reading frees the budget again: every stream then moves all its bytes.
    for _ in range(600):
        pair.now += 0.005
        pair.exchange()
        for sid in sids:
            take = len(pair.received.get(sid, b"")) - consumed[sid]
            if take > 0:
                pair.server.consume(sid, take)
                consumed[sid] += take
        if all(c == 512 << 10 for c in consumed.values()):
            break
    assert all(c == 512 << 10 for c in consumed.values())
