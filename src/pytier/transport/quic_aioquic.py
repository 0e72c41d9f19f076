"""aioquic 1.7.2 turned into EasyTier's QUIC: every aioquic internal pytier touches is in this module.

EasyTier's QUIC proxy runs quinn with a null crypto provider, which aioquic does not have. What this
module changes, and the aioquic internals each change leans on (tests/unit/test_quic_aioquic.py
fails loudly if an upgrade moves any of them):

* Packet protection: `NullCryptoPair` stands in for `aioquic.quic.crypto.CryptoPair` in
  `QuicConnection._cryptos` / `_cryptos_initial`: an 8-byte SeaHash tag (quic_null_crypto) instead
  of AEAD, no header protection, no key derivation; the packet builder sizes packets from its
  `aead_tag_size`.
* Handshake: `RawParamsTls` replaces the `tls.Context` in `QuicConnection.tls`. The CRYPTO streams
  carry raw transport parameters, and the epochs advance as quinn drives them (§7.2): the client
  sends its parameters in Initial; the server answers in Handshake space and installs all its keys;
  the client's handshake completes when it has the server's parameters; the server's when the first
  Handshake or 1-RTT packet proves the client got them (`_payload_received`). Both call aioquic's own
  callbacks (`alpn_cb` to parse the peer's parameters, `update_traffic_key_cb` to "install" keys).
* Transport parameters: our own codec (quic_params) replaces `_serialize_transport_parameters`,
  so that a client sends no stateless-reset token and no version information, and both sides
  announce max_udp_payload_size 1200 and no unidirectional streams; pytier grants 8192 concurrent
  bidirectional streams (quinn, in EasyTier, 255).
* Datagram size: 1200 bytes, as quinn is configured; between two pytier nodes, which say so in a private
  transport parameter, 1380 (`QuicConnection._max_datagram_size`, read by the packet builder).
* Flow control: aioquic doubles a stream's receive window whenever half is used, whatever the
  application has read; `_write_stream_limits` instead grants credit up to what was consumed plus a
  fixed window, so a slow TCP writer on the far side slows the sender down.
* Congestion control: BBR (pytier.transport.bbr) registered as "pytier-bbr" with aioquic's registry,
  and `BbrPacer` in place of `QuicPacketRecovery._pacer`, so datagrams leave at BBR's pacing rate.
* Loss detection: `ReorderTolerantRecovery` replaces the class of `QuicConnection._loss` (aioquic's
  `QuicPacketRecovery`) and its `_detect_loss`, so that the packet and time thresholds (RFC 9002
  §6.1, there module constants) grow when a packet declared lost is acknowledged after all, as RFC
  9002 allows: on a path that reorders, fixed thresholds resend every reordered packet.
* The fixed bit: we never advertise grease_quic_bit, so a quinn peer keeps it set and aioquic's
  header parser (which requires it) accepts every packet.
* Stream scheduling: `_write_application` (aioquic's packet loop) is replaced so that a packet's
  work does not grow with the number of streams: aioquic walks every stream twice per packet (for
  MAX_STREAM_DATA and for STREAM frames, then rebuilds `_streams_queue`); here streams enter a queue
  when something may give them a frame (see "the stream scheduler" below), which leans on
  `_get_or_create_stream(_for_send)`, `_unblock_streams`, `_handle_max_data_frame`, the senders'
  `_pending` / `_pending_eof`, and the delivery callbacks of QuicStreamSender / QuicStreamReceiver.
* Speed: `RangeSet.add` (ACK ranges, received packet numbers, stream reassembly) scans its ranges
  linearly, which at 10-20% loss, with hundreds of ranges, was the largest single cost of a transfer;
  it is replaced, process-wide, by a binary search with the same results.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    RESET_STREAM_FRAME_CAPACITY,
    STOP_SENDING_FRAME_CAPACITY,
    QuicConnection,
    QuicNetworkPath,
    QuicReceiveContext,
    stream_is_client_initiated,
)
from aioquic.quic.crypto import CryptoError, KeyUnavailableError
from aioquic.quic.packet import QuicFrameType, QuicPacketType, QuicProtocolVersion, decode_packet_number
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import K_PACKET_THRESHOLD, K_TIME_THRESHOLD, QuicPacketRecovery, QuicPacketSpace
from aioquic.quic.stream import QuicStream

from pytier.transport import quic_null_crypto
from pytier.transport.bbr import Bbr, SentState
from pytier.transport.quic_params import TransportParams
from pytier.wire.errors import WireError

CONGESTION_CONTROL = "pytier-bbr"
MAX_UDP_PAYLOAD = 1200
# Datagram size between two pytier nodes (agreed through a private transport parameter): a peer packet
# carrying it is as large on the underlay as one carrying a full packet of the default 1380-byte TUN
# MTU, and every datagram saved is ~30 µs of Python on each side.
PYTIER_DATAGRAM_SIZE = 1380
CONNECTION_ID_LENGTH = 8
# EasyTier (quinn) grants 255 concurrent streams, which caps a peer at 255 proxied connections at
# once; pytier grants as many as KCP has conversations. A peer still opens only what it is granted.
MAX_STREAMS_BIDI = 8192
# Connection-level credit is effectively unlimited, as quinn's; the per-stream window does the work.
CONNECTION_MAX_DATA = 1 << 60
# A stream's receive credit starts at this (the transport parameters' initial_max_stream_data); it
# grows toward the configured stream window (16 MiB in the proxy) as the application reads, but past
# this initial window all the streams of a connection share RECEIVE_CREDIT_BUDGET: what a peer may
# have sent that the application has not read is at most N x INITIAL_STREAM_WINDOW + the budget,
# where every stream's full window would be N x 16 MiB. One bulk stream still gets its whole window;
# a thousand busy ones get 32 KiB plus a share each.
INITIAL_STREAM_WINDOW = 32 << 10
RECEIVE_CREDIT_BUDGET = 16 << 20
ACK_DELAY_EXPONENT = 3
MAX_ACK_DELAY_MS = 25


# ---- RangeSet.add ----------------------------------------------------------------------------

_range_stop = attrgetter("stop")


def _rangeset_add(self: RangeSet, start: int, stop: int | None = None) -> None:
    """aioquic's RangeSet.add (merge [start, stop) into sorted, disjoint, non-touching ranges) with a
    binary search for the first range it can touch instead of a scan from the front."""
    if stop is None:
        stop = start + 1
    assert stop > start
    ranges: list[range] = self._RangeSet__ranges  # type: ignore[attr-defined]
    i = bisect_left(ranges, start, key=_range_stop)  # first range with r.stop >= start
    if i == len(ranges):
        ranges.append(range(start, stop))
        return
    first = ranges[i]
    if stop < first.start:
        ranges.insert(i, range(start, stop))
        return
    start = min(start, first.start)
    j = i + 1
    stop = max(stop, first.stop)
    while j < len(ranges) and ranges[j].start <= stop:
        stop = max(stop, ranges[j].stop)
        j += 1
    ranges[i:j] = [range(start, stop)]


ORIGINAL_RANGESET_ADD = RangeSet.add
RangeSet.add = _rangeset_add  # type: ignore[method-assign]


# ---- packet protection ------------------------------------------------------------------------


class _NullKey:
    """One direction of a NullCryptoPair: only "installed or not" (there is no key)."""

    __slots__ = ("_setup_cb", "_teardown_cb", "_valid", "key_phase")

    def __init__(self, valid: bool = False) -> None:
        self._valid = valid
        self.key_phase = 0
        self._setup_cb: Callable[[str], None] = _ignore
        self._teardown_cb: Callable[[str], None] = _ignore

    def is_valid(self) -> bool:
        return self._valid

    def setup(self, *, cipher_suite: object = None, secret: bytes = b"", version: int = 0) -> None:
        self._valid = True

    def teardown(self) -> None:
        self._valid = False


def _ignore(_trigger: str) -> None:
    return None


class NullCryptoPair:
    """Duck-types aioquic's CryptoPair with quinn's null crypto: tag instead of AEAD, no header
    protection; key updates change nothing (the key phase bit is ignored and always sent as 0)."""

    aead_tag_size = quic_null_crypto.TAG_SIZE
    key_phase = 0

    def __init__(self, valid: bool = False) -> None:
        self.recv = _NullKey(valid)
        self.send = _NullKey(valid)

    def decrypt_packet(self, packet: bytes, encrypted_offset: int,
                       expected_packet_number: int) -> tuple[bytes, bytes, int]:
        if not self.recv.is_valid():
            raise KeyUnavailableError("no keys for this packet space yet")
        try:
            header, payload, truncated = quic_null_crypto.unprotect(packet, encrypted_offset)
        except WireError as exc:
            raise CryptoError(str(exc)) from exc
        pn_bits = ((packet[0] & 0x03) + 1) * 8
        return header, payload, decode_packet_number(truncated, pn_bits, expected_packet_number)

    def encrypt_packet(self, plain_header: bytes, plain_payload: bytes, packet_number: int) -> bytes:
        return quic_null_crypto.protect(plain_header, plain_payload)

    def setup_initial(self, cid: bytes, is_client: bool, version: int) -> None:
        self.recv.setup()
        self.send.setup()

    def teardown(self) -> None:
        self.recv.teardown()
        self.send.teardown()

    def update_key(self) -> None:
        return None


# ---- the handshake ------------------------------------------------------------------------------


class RawParamsTls:
    """Stands in for aioquic's tls.Context: the CRYPTO stream carries raw transport parameters."""

    def __init__(self, *, is_client: bool, local_params: bytes, alpn_cb: Callable[[Any], None],
                 update_traffic_key_cb: Callable[..., None]) -> None:
        self.is_client = is_client
        self.state = tls.State.CLIENT_HANDSHAKE_START if is_client else tls.State.SERVER_EXPECT_CLIENT_HELLO
        self.local_params = local_params
        self.peer_params: TransportParams | None = None
        self.received_extensions: list[tuple[int, bytes]] = []
        self.handshake_extensions: list[tuple[int, bytes]] = []
        self.alpn_negotiated: str | None = None
        self.early_data_accepted = False
        self.session_resumed = False
        self.legacy_session_id = b""
        self.client_random = b""
        self.alpn_cb = alpn_cb
        self.update_traffic_key_cb = update_traffic_key_cb

    def _install(self, epoch: tls.Epoch, *directions: tls.Direction) -> None:
        for direction in directions:
            self.update_traffic_key_cb(direction, epoch, tls.CipherSuite.AES_128_GCM_SHA256, b"")

    def handle_message(self, input_data: bytes, output_buf: dict[tls.Epoch, Buffer]) -> None:
        if self.state is tls.State.CLIENT_HANDSHAKE_START:
            output_buf[tls.Epoch.INITIAL].push_bytes(self.local_params)
            # The server's parameters arrive in Handshake space.
            self._install(tls.Epoch.HANDSHAKE, tls.Direction.DECRYPT)
            self.state = tls.State.CLIENT_EXPECT_SERVER_HELLO
            return
        if not input_data:
            return
        if self.state is tls.State.CLIENT_EXPECT_SERVER_HELLO:
            self._take_peer_params(input_data)
            self._install(tls.Epoch.HANDSHAKE, tls.Direction.ENCRYPT)
            self._install(tls.Epoch.ONE_RTT, tls.Direction.ENCRYPT, tls.Direction.DECRYPT)
            self.state = tls.State.CLIENT_POST_HANDSHAKE
        elif self.state is tls.State.SERVER_EXPECT_CLIENT_HELLO:
            self._take_peer_params(input_data)
            output_buf[tls.Epoch.HANDSHAKE].push_bytes(self.local_params)
            self._install(tls.Epoch.HANDSHAKE, tls.Direction.ENCRYPT, tls.Direction.DECRYPT)
            self._install(tls.Epoch.ONE_RTT, tls.Direction.ENCRYPT, tls.Direction.DECRYPT)
            self.state = tls.State.SERVER_EXPECT_FINISHED
        # Anything later on a CRYPTO stream (quinn sends nothing more) is ignored.

    def _take_peer_params(self, data: bytes) -> None:
        try:
            self.peer_params = TransportParams.decode(data)
        except WireError as exc:
            raise tls.AlertDecodeError(f"transport parameters: {exc}") from exc
        self.received_extensions = [(tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS, bytes(data))]
        self.alpn_cb(None)


# ---- congestion control -------------------------------------------------------------------------


class BbrCongestionControl(QuicCongestionControl):
    """aioquic's congestion-control interface over pytier.transport.bbr."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.bbr = Bbr(mss=max_datagram_size)
        self._sent: dict[int, SentState] = {}
        self._rtt: float | None = None
        self.congestion_window = self.bbr.cwnd
        self.bytes_in_flight = 0

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        assert packet.sent_time is not None
        self._sent[id(packet)] = self.bbr.on_send(packet.sent_time, packet.sent_bytes)
        self.bytes_in_flight = self.bbr.bytes_in_flight

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        state = self._sent.pop(id(packet), None)
        if state is None:
            return
        self.bbr.on_ack(now, state, now - state.sent_time)
        self.congestion_window = self.bbr.cwnd
        self.bytes_in_flight = self.bbr.bytes_in_flight

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        self.bbr.on_forget(self._take(packets))
        self.bytes_in_flight = self.bbr.bytes_in_flight

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        self.bbr.on_loss(now, self._take(packets))
        self.congestion_window = self.bbr.cwnd
        self.bytes_in_flight = self.bbr.bytes_in_flight

    def on_persistent_congestion(self) -> None:
        self.bbr.on_persistent_congestion()
        self.congestion_window = self.bbr.cwnd

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        return None

    def _take(self, packets: Iterable[QuicSentPacket]) -> list[SentState]:
        out = []
        for packet in packets:
            state = self._sent.pop(id(packet), None)
            if state is not None:
                out.append(state)
        return out

    def get_log_data(self) -> dict[str, Any]:
        bbr = self.bbr
        return {"cwnd": bbr.cwnd, "bytes_in_flight": bbr.bytes_in_flight, "state": bbr.state.value,
                "btlbw": bbr.btlbw, "pacing_rate": bbr.pacing_rate}


register_congestion_control(CONGESTION_CONTROL, BbrCongestionControl)


class BbrPacer:
    """Token bucket at BBR's pacing rate, in place of aioquic's cwnd/srtt pacer.

    A send may go when a full datagram's worth of credit is there; credit accrues at the pacing rate
    up to `burst_s` of it. Once the bucket is empty, the next send time is when `wake_s` of credit
    has accrued: a packet every 96 µs at 100 Mbit/s cannot be timed one by one by an event loop, and
    waking up once per packet would cost more CPU than sending it."""

    def __init__(self, bbr: Bbr, *, max_datagram_size: int, burst_s: float = 0.002,
                 wake_s: float = 0.001) -> None:
        self._bbr = bbr
        self._size = max_datagram_size
        self._burst_s = burst_s
        self._wake_s = wake_s
        self._tokens = float(2 * max_datagram_size)
        self._last: float | None = None

    def _refill(self, now: float) -> float:
        rate = self._bbr.pacing_rate
        if self._last is not None and now > self._last:
            cap = max(2.0 * self._size, rate * self._burst_s)
            self._tokens = min(self._tokens + (now - self._last) * rate, cap)
        if self._last is None or now > self._last:
            self._last = now
        return rate

    def next_send_time(self, now: float) -> float | None:
        rate = self._refill(now)
        if self._tokens >= self._size:
            return None
        batch = min(max(float(self._size), rate * self._wake_s), max(2.0 * self._size, rate * self._burst_s))
        return now + (batch - self._tokens) / rate

    def update_after_send(self, now: float) -> None:
        self._refill(now)
        self._tokens -= self._size

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        return None

    def set_datagram_size(self, size: int) -> None:
        """Datagrams grew after the handshake: the bucket keeps its two-datagram minimum."""
        self._size = size
        self._tokens = max(self._tokens, 2.0 * size)


# ---- loss detection -----------------------------------------------------------------------------

# A packet declared lost is remembered this long (in smoothed RTTs) in case its ACK still arrives.
SPURIOUS_MEMORY_RTTS = 4.0
SPURIOUS_MEMORY_PACKETS = 4096  # per packet number space
MAX_PACKET_THRESHOLD = 1024
MAX_TIME_THRESHOLD = 2.0  # x RTT
TIME_THRESHOLD_STEP = 0.25  # x RTT, added when a time-declared loss proves spurious


class _Declared:
    """The packets of one packet number space declared lost lately, in declaration order, which is
    packet number order (loss detection declares the oldest outstanding packets first)."""

    __slots__ = ("at", "distance", "pns")

    def __init__(self) -> None:
        self.pns: list[int] = []
        self.at: list[float] = []  # when each was declared
        self.distance: list[int] = []  # later packets acknowledged by then; 0: by the time threshold

    def add(self, pn: int, at: float, distance: int) -> None:
        if self.pns and pn <= self.pns[-1]:
            return  # out of order (loss detection never does this): not remembered, the list stays sorted
        self.pns.append(pn)
        self.at.append(at)
        self.distance.append(distance)

    def forget(self, count: int) -> None:
        del self.pns[:count], self.at[:count], self.distance[:count]


class ReorderTolerantRecovery(QuicPacketRecovery):
    """aioquic's loss recovery with thresholds that learn how far the path reorders.

    A packet declared lost is remembered for a few round trips with how it was declared: by the
    packet threshold (with how many later packets were acknowledged) or by the time threshold. If an
    ACK then covers it, the loss was spurious: the packet threshold rises above the reordering seen,
    or the time threshold takes another quarter RTT. Neither comes down again: a path that reorders
    keeps doing so. Real losses are then found a little later, which costs far less than resending
    every reordered packet (2% of them on a multipath link) and telling the congestion controller
    that they were lost. The check runs on every ACK, so it costs a binary search per ACK range, as
    aioquic's own walk over the sent packets does.
    """

    packet_threshold: int
    time_threshold: float
    spurious_losses: int
    _declared: dict[int, _Declared]

    @classmethod
    def adopt(cls, recovery: QuicPacketRecovery) -> ReorderTolerantRecovery:
        recovery.__class__ = cls
        assert isinstance(recovery, ReorderTolerantRecovery)
        recovery.packet_threshold = K_PACKET_THRESHOLD
        recovery.time_threshold = K_TIME_THRESHOLD
        recovery.spurious_losses = 0
        recovery._declared = {}
        return recovery

    def on_ack_received(self, *, ack_rangeset: RangeSet, ack_delay: float, now: float,
                        space: QuicPacketSpace) -> None:
        declared = self._declared.get(id(space))
        if declared is not None and declared.pns:
            self._check_spurious(ack_rangeset, declared, now)
        super().on_ack_received(ack_rangeset=ack_rangeset, ack_delay=ack_delay, now=now, space=space)

    def _check_spurious(self, acked: RangeSet, declared: _Declared, now: float) -> None:
        horizon = now - SPURIOUS_MEMORY_RTTS * max(self._rtt_smoothed, self._rtt_initial)
        old = bisect_left(declared.at, horizon)
        if old:
            declared.forget(old)
        pns = declared.pns
        for r in acked:
            if not pns or r.start > pns[-1]:
                break
            i = bisect_left(pns, r.start)
            while i < len(pns) and pns[i] < r.stop:
                distance = declared.distance[i]
                del pns[i], declared.at[i], declared.distance[i]
                self.spurious_losses += 1
                if distance > 0:
                    self.packet_threshold = min(max(self.packet_threshold, distance + distance // 4 + 1),
                                                MAX_PACKET_THRESHOLD)
                else:
                    self.time_threshold = min(self.time_threshold + TIME_THRESHOLD_STEP, MAX_TIME_THRESHOLD)

    def _detect_loss(self, *, now: float, space: QuicPacketSpace) -> None:
        # aioquic's own, with the instance's thresholds, and each declaration remembered.
        loss_delay = self.time_threshold * (
            max(self._rtt_latest, self._rtt_smoothed) if self._rtt_initialized else self._rtt_initial)
        largest = space.largest_acked_packet
        packet_threshold = largest - self.packet_threshold
        time_threshold = now - loss_delay
        lost_packets = []
        space.loss_time = None
        declared = self._declared.get(id(space))
        if declared is None:
            declared = self._declared[id(space)] = _Declared()
        for packet_number, packet in space.sent_packets.items():
            if packet_number > largest:
                break
            sent_time = packet.sent_time
            if sent_time is None:  # never: aioquic stamps every packet it tracks
                continue
            if packet_number <= packet_threshold or sent_time <= time_threshold:
                lost_packets.append(packet)
                by_count = packet_number <= packet_threshold
                declared.add(packet_number, now, largest - packet_number if by_count else 0)
            else:
                packet_loss_time = sent_time + loss_delay
                if space.loss_time is None or space.loss_time > packet_loss_time:
                    space.loss_time = packet_loss_time
        if len(declared.pns) > SPURIOUS_MEMORY_PACKETS:
            declared.forget(len(declared.pns) - SPURIOUS_MEMORY_PACKETS)
        self._on_packets_lost(now=now, packets=lost_packets,
                              persistent_congestion=self._in_persistent_congestion(packets=lost_packets),
                              space=space)


# ---- the connection -----------------------------------------------------------------------------

# What serving a stream left it as (see NullCryptoQuicConnection._serve).
_MORE = "more"  # sent, and has more to send: back in the queue, at its end
_FULL = "full"  # the packet had no room for its next frame: first in line for the next packet
_IDLE = "idle"  # nothing to send until something queues it again
_DISCARDED = "discarded"  # finished, and forgotten
# Below this much room a packet takes no further STREAM frame of the stream being served.
MIN_FRAME_ROOM = 64


def _room(builder: QuicPacketBuilder) -> int:
    """Bytes the current packet can still take for a frame that counts toward the congestion window."""
    return min(builder.remaining_buffer_space, builder.remaining_flight_space)



@dataclass
class PytierQuicConfiguration(QuicConfiguration):
    # How far a stream's receive credit may grow past what the application read; every stream
    # starts with max_stream_data (INITIAL_STREAM_WINDOW at most).
    stream_window: int = 4 << 20
    receive_credit_budget: int = RECEIVE_CREDIT_BUDGET


def make_configuration(*, is_client: bool, idle_timeout_s: float = 30.0, stream_window: int = 4 << 20,
                       initial_rtt_s: float = 0.1,
                       receive_credit_budget: int = RECEIVE_CREDIT_BUDGET) -> PytierQuicConfiguration:
    config = PytierQuicConfiguration(
        is_client=is_client,
        congestion_control_algorithm=CONGESTION_CONTROL,
        connection_id_length=CONNECTION_ID_LENGTH,
        idle_timeout=idle_timeout_s,
        max_datagram_size=MAX_UDP_PAYLOAD,
        max_data=CONNECTION_MAX_DATA,
        max_stream_data=min(stream_window, INITIAL_STREAM_WINDOW),
        stream_window=stream_window,
        receive_credit_budget=receive_credit_budget,
        supported_versions=[QuicProtocolVersion.VERSION_1],
        initial_rtt=initial_rtt_s,
    )
    if not is_client:
        # aioquic insists on these for a server; the null handshake never looks at them.
        config.certificate = "null-crypto"
        config.private_key = "null-crypto"
    return config


class NullCryptoQuicConnection(QuicConnection):
    """A QuicConnection that speaks EasyTier's null-crypto QUIC (see the module docstring)."""

    def __init__(self, *, configuration: QuicConfiguration,
                 original_destination_connection_id: bytes | None = None) -> None:
        super().__init__(configuration=configuration,
                         original_destination_connection_id=original_destination_connection_id)
        self._local_max_streams_bidi.value = self._local_max_streams_bidi.sent = MAX_STREAMS_BIDI
        self._local_max_streams_uni.value = self._local_max_streams_uni.sent = 0
        self._initial_window = configuration.max_stream_data
        self._stream_window = max(self._initial_window, getattr(configuration, "stream_window", 0))
        self._credit_budget = getattr(configuration, "receive_credit_budget", RECEIVE_CREDIT_BUDGET)
        self._consumed: dict[int, int] = {}
        # Receive credit granted past each stream's initial window and not yet read, and its sum,
        # which RECEIVE_CREDIT_BUDGET bounds.
        self._extra_credit: dict[int, int] = {}
        self.extra_credit_total = 0
        cc = self._loss._cc
        assert isinstance(cc, BbrCongestionControl)
        self.congestion: BbrCongestionControl = cc
        self._pacer = BbrPacer(cc.bbr, max_datagram_size=configuration.max_datagram_size)
        self._loss._pacer = self._pacer  # type: ignore[assignment]
        self.recovery = ReorderTolerantRecovery.adopt(self._loss)
        # The stream scheduler's state (see _write_application): streams that may have a frame to
        # send, in service order, and the same as a set; streams stopped by the connection's credit;
        # streams whose receive credit may have to be raised.
        self._ready: deque[QuicStream] = deque()
        self._ready_set: set[QuicStream] = set()
        self._credit_blocked: set[QuicStream] = set()
        self._limits_due: set[QuicStream] = set()

    # -- the parts of aioquic replaced ------------------------------------------------------------

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls = RawParamsTls(  # type: ignore[assignment]
            is_client=self._is_client,
            local_params=self._serialize_transport_parameters(),
            alpn_cb=self._alpn_handler,
            update_traffic_key_cb=self._update_traffic_key,
        )
        initial = NullCryptoPair(valid=True)
        self._cryptos_initial = {self._version: initial}  # type: ignore[dict-item]
        self._cryptos = {epoch: NullCryptoPair()  # type: ignore[misc]
                         for epoch in (tls.Epoch.ZERO_RTT, tls.Epoch.HANDSHAKE, tls.Epoch.ONE_RTT)}
        self._cryptos[tls.Epoch.INITIAL] = initial  # type: ignore[assignment]

    def _serialize_transport_parameters(self) -> bytes:
        window = self._local_max_stream_data_bidi_local
        params = TransportParams(
            max_idle_timeout_ms=int(self._configuration.idle_timeout * 1000),
            max_udp_payload_size=MAX_UDP_PAYLOAD,
            initial_max_data=self._local_max_data.value,
            initial_max_stream_data_bidi_local=window,
            initial_max_stream_data_bidi_remote=self._local_max_stream_data_bidi_remote,
            initial_max_stream_data_uni=self._local_max_stream_data_uni,
            initial_max_streams_bidi=MAX_STREAMS_BIDI,
            initial_max_streams_uni=0,
            ack_delay_exponent=self._local_ack_delay_exponent,
            max_ack_delay_ms=MAX_ACK_DELAY_MS,
            active_connection_id_limit=self._local_active_connection_id_limit,
            initial_source_connection_id=self._local_initial_source_connection_id,
            pytier_datagram_size=PYTIER_DATAGRAM_SIZE,
        )
        if not self._is_client:
            params.original_destination_connection_id = self._original_destination_connection_id
            params.stateless_reset_token = self._host_cids[0].stateless_reset_token
        return params.encode()

    def _alpn_handler(self, alpn_protocol: str) -> None:
        super()._alpn_handler(alpn_protocol)
        peer = self.peer_params
        if peer is not None and peer.pytier_datagram_size:
            size = max(MAX_UDP_PAYLOAD, min(PYTIER_DATAGRAM_SIZE, peer.pytier_datagram_size))
            self._max_datagram_size = size
            self._pacer.set_datagram_size(size)

    def _payload_received(self, context: QuicReceiveContext, plain: bytes,
                          crypto_frame_required: bool = False) -> tuple[bool, bool]:
        if (
            not self._is_client
            and not self._handshake_complete
            and context.epoch in (tls.Epoch.HANDSHAKE, tls.Epoch.ONE_RTT)
            and self.tls.state is tls.State.SERVER_EXPECT_FINISHED
        ):
            # The client could only send this after it had our Handshake packet: that validates its
            # address as a Handshake packet does in aioquic, also when this is a 1-RTT packet (its
            # Handshake ACK was lost); an unvalidated path would be abandoned a few PTOs later.
            context.network_path.is_validated = True
            self._complete_server_handshake()
        return super()._payload_received(context, plain, crypto_frame_required=crypto_frame_required)

    def _complete_server_handshake(self) -> None:
        """What aioquic does when its TLS server sees the client's Finished (see _handle_crypto_frame);
        here the client's first Handshake or 1-RTT packet plays that part."""
        self.tls.state = tls.State.SERVER_POST_HANDSHAKE
        self._handshake_complete = True
        self._confirm_handshake()
        self._handshake_done_pending = True
        self._replenish_connection_ids()
        self._events.append(events.HandshakeCompleted(alpn_protocol=None, early_data_accepted=False,
                                                      session_resumed=False))
        self._unblock_streams(is_unidirectional=False)
        self._unblock_streams(is_unidirectional=True)

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: Any) -> None:
        if not stream.max_stream_data_local:
            return
        sid = stream.stream_id
        consumed = self._consumed.get(sid, 0)
        initial = self._initial_window
        room = self._credit_budget - (self.extra_credit_total - self._extra_credit.get(sid, 0))
        # Past the initial window, credit grows with what the stream has read so far, so a stream
        # that read its header only cannot take the budget. Four times what was read: with one
        # times, a long lossy path (200 ms, 5 %) spent most of an 8 s transfer growing its window,
        # since in-order reads lag a round trip or more behind each hole (model: 23.6 -> 61.8 Mbit/s).
        window = max(initial, min(self._stream_window, initial + room, initial + 4 * consumed))
        wanted = consumed + window
        # Batch the updates: a new limit only once a quarter of the window has been read.
        if wanted - stream.max_stream_data_local >= window // 4:
            stream.max_stream_data_local = wanted
            self._set_extra_credit(sid, wanted - consumed - initial)
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(QuicFrameType.MAX_STREAM_DATA, capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                                      handler=self._on_max_stream_data_delivery, handler_args=(stream,))
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    # -- the stream scheduler ----------------------------------------------------------------------
    #
    # aioquic's packet loop calls _write_stream_limits for every stream and walks its whole stream
    # queue for every packet it builds (and rebuilds the queue after each), so a packet's cost grows
    # with the number of open streams, idle or not: 5,000 proxied connections over one peer's QUIC
    # connection left the node too busy to move any of them. Here a stream is queued when something
    # may give it a frame to send (data written, a reset or stop asked for, a frame of it lost, a
    # frame received for it, which can also finish it, or credit granted), and the loop serves the
    # queue round-robin until the packet is full; a stream with nothing left leaves the queue. The
    # cost of a packet then depends on the frames it carries, not on how many streams exist.
    # (Frames written here are not given to a quic_logger, which pytier never configures.)

    def _mark(self, stream: QuicStream) -> None:
        if stream not in self._ready_set:
            self._ready_set.add(stream)
            self._ready.append(stream)

    def _get_or_create_stream(self, frame_type: int, stream_id: int) -> QuicStream:
        stream = super()._get_or_create_stream(frame_type, stream_id)
        self._streams_queue.clear()  # aioquic's own queue, which nothing here reads
        self._mark(stream)
        return stream

    def _get_or_create_stream_for_send(self, stream_id: int) -> QuicStream:
        stream = super()._get_or_create_stream_for_send(stream_id)
        self._streams_queue.clear()
        self._mark(stream)
        return stream

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        super().stop_stream(stream_id, error_code)
        self._mark(self._streams[stream_id])

    def _unblock_streams(self, is_unidirectional: bool) -> None:
        blocked = list(self._streams_blocked_uni if is_unidirectional else self._streams_blocked_bidi)
        super()._unblock_streams(is_unidirectional)
        for stream in blocked:
            if not stream.is_blocked:
                self._mark(stream)

    def _handle_max_data_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        before = self._remote_max_data
        super()._handle_max_data_frame(context, frame_type, buf)
        if self._remote_max_data > before:
            for stream in self._credit_blocked:
                self._mark(stream)
            self._credit_blocked.clear()

    def _on_max_stream_data_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        if delivery != QuicDeliveryState.ACKED:
            self._limits_due.add(stream)

    def _on_stream_data_delivery(self, delivery: QuicDeliveryState, stream: QuicStream, start: int,
                                 stop: int, fin: bool) -> None:
        sender = stream.sender
        sender.on_data_delivery(delivery, start, stop, fin)
        if delivery != QuicDeliveryState.ACKED or sender.is_finished:
            self._mark(stream)  # data to resend, or a finished stream to discard

    def _on_reset_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        stream.sender.on_reset_delivery(delivery)
        self._mark(stream)

    def _on_stop_sending_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        stream.receiver.on_stop_sending_delivery(delivery)
        if delivery != QuicDeliveryState.ACKED:
            self._mark(stream)

    def _write_application(self, builder: QuicPacketBuilder, network_path: QuicNetworkPath,
                           now: float) -> None:
        """aioquic's, with the stream scheduler above in place of its two walks over all streams."""
        crypto_stream: QuicStream | None = None
        if self._cryptos[tls.Epoch.ONE_RTT].send.is_valid():
            crypto = self._cryptos[tls.Epoch.ONE_RTT]
            crypto_stream = self._crypto_streams[tls.Epoch.ONE_RTT]
            packet_type = QuicPacketType.ONE_RTT
        elif self._cryptos[tls.Epoch.ZERO_RTT].send.is_valid():
            crypto = self._cryptos[tls.Epoch.ZERO_RTT]
            packet_type = QuicPacketType.ZERO_RTT
        else:
            return
        space = self._spaces[tls.Epoch.ONE_RTT]
        while True:
            if space.ack_at is None or space.ack_at >= now:
                self._pacing_at = self._loss._pacer.next_send_time(now=now)
                if self._pacing_at is not None:
                    break
            builder.start_packet(packet_type, crypto)
            if packet_type == QuicPacketType.ONE_RTT and space.ack_at is not None and space.ack_at <= now:
                self._write_ack_frame(builder=builder, space=space, now=now)
            if self._handshake_complete:
                self._write_control_frames(builder, space, network_path, now)
            if self._limits_due:
                self._write_due_stream_limits(builder, space)
            if self._ping_pending:
                self._write_ping_frame(builder, self._ping_pending)
                self._ping_pending.clear()
            if self._probe_pending:
                self._write_ping_frame(builder, comment="probe")
                self._probe_pending = False
            if crypto_stream is not None and not crypto_stream.sender.buffer_is_empty:
                self._write_crypto_frame(builder=builder, space=space, stream=crypto_stream)
            discarded = self._write_ready_streams(builder, space) if self._ready else False
            if builder.packet_is_empty:
                # A discarded stream may let the peer open another, which the next packet's
                # MAX_STREAMS announces.
                if not discarded:
                    break
            else:
                self._loss._pacer.update_after_send(now=now)

    def _write_control_frames(self, builder: QuicPacketBuilder, space: QuicPacketSpace,
                              network_path: QuicNetworkPath, now: float) -> None:
        """The connection-level frames of aioquic's packet loop, in its order."""
        if not (network_path.is_validated or network_path.local_challenge_sent):
            self._write_path_challenge_frame(builder=builder, network_path=network_path)
            if network_path.validation_deadline is None:
                network_path.validation_deadline = now + 3 * max(self._loss.get_probe_timeout(),
                                                                 2 * self._configuration.initial_rtt)
        if self._handshake_done_pending:
            self._write_handshake_done_frame(builder=builder)
            self._handshake_done_pending = False
        while network_path.remote_challenges:
            self._write_path_response_frame(builder=builder, challenge=network_path.remote_challenges[0])
            network_path.remote_challenges.popleft()
        for connection_id in self._host_cids:
            if not connection_id.was_sent:
                self._write_new_connection_id_frame(builder=builder, connection_id=connection_id)
        for sequence_number in self._retire_connection_ids[:]:
            self._write_retire_connection_id_frame(builder=builder, sequence_number=sequence_number)
            self._retire_connection_ids.pop(0)
        if self._streams_blocked_pending:
            if self._streams_blocked_bidi:
                self._write_streams_blocked_frame(
                    builder=builder, frame_type=QuicFrameType.STREAMS_BLOCKED_BIDI,
                    limit=self._remote_max_streams_bidi)
            if self._streams_blocked_uni:
                self._write_streams_blocked_frame(
                    builder=builder, frame_type=QuicFrameType.STREAMS_BLOCKED_UNI,
                    limit=self._remote_max_streams_uni)
            self._streams_blocked_pending = False
        self._write_connection_limits(builder=builder, space=space)

    def _write_due_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        due = self._limits_due
        streams = self._streams
        while due:
            if _room(builder) < MAX_STREAM_DATA_FRAME_CAPACITY:
                return  # the rest go in the next packet
            stream = due.pop()
            if streams.get(stream.stream_id or 0) is stream:
                self._write_stream_limits(builder, space, stream)

    def _write_ready_streams(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> bool:
        """Serve queued streams, round-robin, until the packet is full or each was served once;
        True when a finished stream was discarded."""
        ready, ready_set = self._ready, self._ready_set
        discarded = False
        for _ in range(len(ready)):
            stream = ready.popleft()
            outcome = self._serve(builder, space, stream)
            if outcome is _MORE:
                ready.append(stream)
            elif outcome is _FULL:
                ready.appendleft(stream)
                break
            else:
                ready_set.discard(stream)
                if outcome is _DISCARDED:
                    discarded = True
        return discarded

    def _serve(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream) -> object:
        if stream.is_finished:
            sid = stream.stream_id
            assert sid is not None
            if self._streams.get(sid) is stream:
                del self._streams[sid]
                if stream_is_client_initiated(sid) != self._is_client:
                    # Let the peer open a new stream for each one that closes (RFC 9000 §4.6).
                    self._stream_limit(sid).value += 1
            self._limits_due.discard(stream)
            self._credit_blocked.discard(stream)
            return _DISCARDED
        receiver, sender = stream.receiver, stream.sender
        if receiver.stop_pending:
            if _room(builder) < STOP_SENDING_FRAME_CAPACITY:
                return _FULL
            self._write_stop_sending(builder, stream)
        if sender.reset_pending:
            if _room(builder) < RESET_STREAM_FRAME_CAPACITY:
                return _FULL
            self._write_reset_stream(builder, stream)
            return _IDLE  # queued again when the reset is acknowledged (to discard) or lost
        if stream.is_blocked or sender.buffer_is_empty:
            return _IDLE
        pending = sender._pending
        wrote = False
        # A frame ends where a pending range does: while retransmitting, several go in one packet.
        while True:
            credit = self._remote_max_data - self._remote_max_data_used
            max_offset = min(sender.highest_offset + credit, stream.max_stream_data_remote)
            if len(pending) and pending[0].start >= max_offset:
                if max_offset < stream.max_stream_data_remote:
                    self._credit_blocked.add(stream)  # queued again by MAX_DATA
                return _IDLE  # else queued again by the peer's MAX_STREAM_DATA
            sent = self._write_stream(builder, stream, max_offset)
            if sent is None:
                if not (len(pending) or sender._pending_eof):
                    return _IDLE
                return _MORE if wrote else _FULL
            wrote = True
            self._remote_max_data_used += sent
            if not (len(pending) or sender._pending_eof):
                return _IDLE
            if builder.remaining_flight_space < MIN_FRAME_ROOM:  # flight space <= buffer space
                return _MORE

    def _write_stream(self, builder: QuicPacketBuilder, stream: QuicStream, max_offset: int) -> int | None:
        """One STREAM frame, as large as the packet and `max_offset` allow: the new bytes it carries
        (retransmitted ones not counted), or None when not even its header fits."""
        sender = stream.sender
        sid = stream.stream_id
        assert sid is not None
        next_offset = sender.next_offset
        overhead = 3 + size_uint_var(sid) + (size_uint_var(next_offset) if next_offset else 0)
        previous_highest = sender.highest_offset
        frame = sender.get_frame(builder.remaining_flight_space - overhead, max_offset)
        if frame is None:
            return None
        frame_type = QuicFrameType.STREAM_BASE | 2  # with a length
        if frame.offset:
            frame_type |= 4
        if frame.fin:
            frame_type |= 1
        stop = frame.offset + len(frame.data)
        buf = builder.start_frame(frame_type, capacity=overhead, handler=self._on_stream_data_delivery,
                                  handler_args=(stream, frame.offset, stop, frame.fin))
        buf.push_uint_var(sid)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint16(len(frame.data) | 0x4000)
        buf.push_bytes(frame.data)
        return sender.highest_offset - previous_highest

    def _write_reset_stream(self, builder: QuicPacketBuilder, stream: QuicStream) -> None:
        buf = builder.start_frame(QuicFrameType.RESET_STREAM, capacity=RESET_STREAM_FRAME_CAPACITY,
                                  handler=self._on_reset_delivery, handler_args=(stream,))
        frame = stream.sender.get_reset_frame()
        buf.push_uint_var(frame.stream_id)
        buf.push_uint_var(frame.error_code)
        buf.push_uint_var(frame.final_size)

    def _write_stop_sending(self, builder: QuicPacketBuilder, stream: QuicStream) -> None:
        buf = builder.start_frame(QuicFrameType.STOP_SENDING, capacity=STOP_SENDING_FRAME_CAPACITY,
                                  handler=self._on_stop_sending_delivery, handler_args=(stream,))
        frame = stream.receiver.get_stop_frame()
        buf.push_uint_var(frame.stream_id)
        buf.push_uint_var(frame.error_code)

    # -- what the endpoint asks of a connection ----------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return bool(self._handshake_complete)

    @property
    def closed(self) -> bool:
        return self._state in END_STATES

    @property
    def peer_params(self) -> TransportParams | None:
        tls_ctx = self.tls
        return tls_ctx.peer_params if isinstance(tls_ctx, RawParamsTls) else None

    def owns_cid(self, cid: bytes) -> bool:
        """Whether `cid` is one of our connection IDs (or the client's first destination CID)."""
        if cid == self._original_destination_connection_id:
            return True
        return any(c.cid == cid for c in self._host_cids)

    def consume(self, stream_id: int, nbytes: int) -> None:
        """The application read `nbytes` more of a stream: credit the peer with as much again."""
        consumed = self._consumed[stream_id] = self._consumed.get(stream_id, 0) + nbytes
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream_id in self._extra_credit:
                extra = stream.max_stream_data_local - consumed - self._initial_window
                self._set_extra_credit(stream_id, extra)
            self._limits_due.add(stream)

    def forget_stream(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)
        self.extra_credit_total -= self._extra_credit.pop(stream_id, 0)

    def _set_extra_credit(self, stream_id: int, extra: int) -> None:
        extra = max(0, extra)
        self.extra_credit_total += extra - self._extra_credit.get(stream_id, 0)
        if extra:
            self._extra_credit[stream_id] = extra
        else:
            self._extra_credit.pop(stream_id, None)

    def unsent_bytes(self, stream_id: int) -> int:
        """Bytes written to a stream that were never sent (retransmissions not counted)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender.highest_offset)

    def stream_known(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def note_app_limited(self) -> None:
        """Called after datagrams_to_send: if neither the window nor the pacer stopped the sender,
        it ran out of data, and the bandwidth samples of the packets now leaving are app-limited."""
        bbr = self.congestion.bbr
        if self._pacing_at is None and bbr.bytes_in_flight + bbr.mss <= bbr.cwnd:
            bbr.on_app_limited()

    @property
    def smoothed_rtt(self) -> float | None:
        loss = self._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    @property
    def pto_count(self) -> int:
        """Probe timeouts in a row that no acknowledgement answered (RFC 9002 §6.2.1's backoff exponent)."""
        return int(self._loss._pto_count)
