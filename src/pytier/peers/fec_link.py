"""FEC for plain UDP packets through the tunnel and for the KCP proxy's packets, per peer
(docs/fec.md, "What is wired").

Everything here travels in pytier's own peer packet type (PacketType.PytierFec), sealed like Data,
and only to a peer that advertised PeerFeatureFlag.pytier_fec over a direct UDP link: an EasyTier
node or relay never sees it. The payload starts with a kind byte:

    FRAME  0 | seq u32 | FEC frame (pytier.fec.framing)
    PLAIN  1 | seq u32 | IP packet      (FEC off, the path's loss still being measured)
    REPORT 2 | packets u32 | lost u32 | bursts u32 | millis u32   (receiver -> sender)

and the same three, 3 KCP_FRAME, 4 KCP_PLAIN, 5 KCP_REPORT, for the KCP lane, whose protected
packets are the peer packet type byte (KcpSrc 11 or KcpDst 12) then the KcpSrc/KcpDst payload. The
two lanes have their own sender, receiver and sequence space per peer: a KCP packet's repair is
worth something only before KCP's own retransmission timeout (30 ms floor), so its blocks close
after KCP_FLUSH_S, while a UDP stream's may wait UDP_FLUSH_S to fill deep interleaved groups.

`seq` counts every FRAME and PLAIN a sender sent to that peer, so the receiver sees the raw path
loss and its runs in wire order, whatever the FEC shape, and reports them back every
REPORT_INTERVAL_S; the sender's FecController turns them into the shape (or none). With FEC off the
sender sequences only a PROBE_S window every PROBE_EVERY_S and sends the rest as plain Data: on a
clean path a quarter of the packets carry 5 bytes more, none carry parity. (Until the controller
has its first estimate, every packet is sequenced.)

Sans-IO: FecSender and FecReceiver take bytes and times; FecService is the asyncio shell the node
drives (one timer for the encoders' flush deadlines, one tick for reports and decoder expiry).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pytier.fec import (
    ControllerConfig,
    FecController,
    FecDecoder,
    FecEncoder,
    FecFrameError,
    FecParams,
    LossSample,
)

log = logging.getLogger("pytier.fec")

KIND_FRAME = 0
KIND_PLAIN = 1
KIND_REPORT = 2
KIND_KCP_FRAME = 3
KIND_KCP_PLAIN = 4
KIND_KCP_REPORT = 5
LANE_UDP = 0
LANE_KCP = 1
# Lane l uses kinds 3l (FRAME), 3l + 1 (PLAIN), 3l + 2 (REPORT).
_LANE_KINDS = 3
_SEQ = struct.Struct(">BI")
_REPORT = struct.Struct(">BIIII")
SEQ_LEN = _SEQ.size
# A parity frame is the group's longest packet plus the FEC frame header (10) and symbol length (2),
# and the kind and sequence number go in front of every frame.
FRAME_OVERHEAD = SEQ_LEN + 12
# What a sealed peer packet may carry inside one 1500-byte underlay datagram over a UDP tunnel:
# IPv4 20, UDP 8, pytier/EasyTier UDP tunnel header 8, peer header 16, AES-GCM tag and nonce 28.
UNDERLAY_PAYLOAD = 1500 - 20 - 8 - 8 - 16 - 28
# Larger packets go out plain (unprotected) rather than as frames the underlay would fragment.
MAX_PROTECTED_PACKET = UNDERLAY_PAYLOAD - FRAME_OVERHEAD

# A block may stay open this long at low rates: long enough that a 5 Mbit/s stream fills blocks of
# 32-packet groups interleaved 8 deep, which a burst loss of ~8 frames needs to stay near 30 %
# parity (0.25 s allowed only 4 deep: 45-65 % parity on the bursty path). A repaired packet comes at
# most this late; packets that arrive are never delayed, and faster streams fill blocks sooner.
UDP_FLUSH_S = 0.5
# KCP resends a segment not acknowledged within its RTO (30 ms floor, kcp_config nodelay 2), and
# fast-resends one 2 acknowledgements later: a repair that comes after that only duplicates it, so
# a KCP block closes within about the RTO floor. A bulk transfer fills 32-packet groups much sooner.
KCP_FLUSH_S = 0.03
# What FEC leaves lost on the KCP lane KCP resends itself: a residual of 0.5 % costs it a resend in
# 200 segments, so the lane does not buy the UDP lane's stricter target with more parity.
KCP_TARGET_RESIDUAL = 0.005
# The KCP lane's protected packet: one byte of peer packet type, then the payload.
KCP_TAG_LEN = 1
# The first estimate spans at least this many frames (~0.5 s at 5 Mbit/s): a burst-loss path seen
# over 200 frames looked like anything from 4 % to 20 % loss, and the shape chosen then stuck.
MIN_PACKETS = 400
REPORT_INTERVAL_S = 0.5
PROBE_S = 0.5
PROBE_EVERY_S = 2.0
# A sequence jump larger than this is a resync (a sender restarted its numbering), not loss.
MAX_SEQ_GAP = 1 << 16


@dataclass(slots=True)
class LossMeter:
    """Counts, from sequence numbers in arrival order, what the path carried and lost, in runs."""

    top: int | None = None
    packets: int = 0
    lost: int = 0
    bursts: int = 0
    since: float = 0.0

    def see(self, seq: int, now: float) -> None:
        if self.top is None:
            self.top, self.packets, self.since = seq, self.packets + 1, self.since or now
            return
        gap = (seq - self.top) & 0xFFFFFFFF
        if gap == 0:
            return
        if gap <= MAX_SEQ_GAP:
            self.packets += gap
            if gap > 1:
                self.lost += gap - 1
                self.bursts += 1
            self.top = seq
        elif gap >= (1 << 32) - MAX_SEQ_GAP:
            # late (reordered): it was counted lost when the packets after it came; a late one that
            # filled a gap of one also ends that run (else the report would hold more runs than
            # losses, which the sender rejects as contradictory, losing the interval's sample)
            if self.lost:
                self.lost -= 1
                self.bursts = min(self.bursts, self.lost)
        else:
            self.top = seq
            self.packets += 1

    def take(self, now: float) -> tuple[int, int, int, float] | None:
        """(packets, lost, bursts, seconds) since the last take, or None if nothing came."""
        if not self.packets:
            self.since = now
            return None
        out = (self.packets, self.lost, self.bursts, max(0.0, now - self.since))
        self.packets = self.lost = self.bursts = 0
        self.since = now
        return out


def encode_report(packets: int, lost: int, bursts: int, seconds: float) -> bytes:
    cap = 0xFFFFFFFF
    return _REPORT.pack(KIND_REPORT, min(packets, cap), min(lost, cap), min(bursts, cap),
                        min(round(seconds * 1000), cap))


def decode_report(payload: bytes) -> LossSample | None:
    """The sample a REPORT carries; None if it is malformed or its counts contradict each other."""
    if len(payload) != _REPORT.size:
        return None
    _, packets, lost, bursts, millis = _REPORT.unpack(payload)
    if lost > packets or bursts > lost:
        return None
    return LossSample(packets, lost, bursts, millis / 1000)


class FecSender:
    """One destination peer: sequences and frames its UDP packets, follows its loss reports."""

    __slots__ = ("_kind", "_measured", "_next_probe", "_probe_until", "_seq", "controller", "encoder",
                 "plain", "reports")

    def __init__(self, flush_s: float = UDP_FLUSH_S, lane: int = LANE_UDP) -> None:
        self._kind = lane * _LANE_KINDS
        self.encoder = FecEncoder(None, flush_s=flush_s, first_group=secrets.randbits(32))
        config = ControllerConfig(flush_s=flush_s, min_packets=MIN_PACKETS)
        if lane == LANE_KCP:
            config = replace(config, target_residual=KCP_TARGET_RESIDUAL)
        self.controller = FecController(config)
        self._seq = secrets.randbits(32)
        self._probe_until = -math.inf
        self._next_probe = -math.inf
        self._measured = False
        self.plain = 0  # packets left to plain Data (FEC off, between probe windows)
        self.reports = 0

    @property
    def params(self) -> FecParams | None:
        return self.encoder.params

    def _tag(self, kind: int, body: bytes) -> bytes:
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFFFFFF
        return _SEQ.pack(kind, seq) + body

    def wrap(self, packet: bytes, now: float) -> list[bytes] | None:
        """Payloads to send for `packet`, or None: send it as plain Data."""
        if self.encoder.params is None:
            if now >= self._next_probe:
                self._probe_until = now + PROBE_S
                self._next_probe = now + PROBE_EVERY_S
            # Until the controller has seen enough to judge the path, every packet is measured.
            if now >= self._probe_until and self._measured:
                self.plain += 1
                return None
            return [self._tag(self._kind + KIND_PLAIN, packet)]
        frame = self._kind + KIND_FRAME
        return [self._tag(frame, f) for f in self.encoder.push(packet, now)]

    def poll(self, now: float) -> list[bytes]:
        frame = self._kind + KIND_FRAME
        return [self._tag(frame, f) for f in self.encoder.poll(now)]

    def next_deadline(self) -> float | None:
        return self.encoder.next_deadline()

    def on_report(self, sample: LossSample) -> list[bytes]:
        """Feed the controller; the parity of a block the old shape had open, if the shape changed."""
        self.reports += 1
        before = self.encoder.params
        params = self.controller.update(sample)
        self._measured = self.controller.estimate() is not None
        if params != before:
            est = self.controller.estimate()
            measured = "" if est is None else (
                f" (loss {est.loss:.1%}, mean burst {est.burst:.1f}, {est.runs} runs)")
            log.info("FEC shape %s -> %s%s", before or "off", params or "off", measured)
        frame = self._kind + KIND_FRAME
        return [self._tag(frame, f) for f in self.encoder.set_params(params)]


class FecReceiver:
    """One source peer (one lane): measures the path's loss, rebuilds packets, reports back."""

    __slots__ = ("_kind", "decoder", "malformed", "meter")

    def __init__(self, lane: int = LANE_UDP) -> None:
        self._kind = lane * _LANE_KINDS
        self.decoder = FecDecoder()
        self.meter = LossMeter()
        self.malformed = 0

    def receive(self, payload: bytes, now: float) -> list[bytes]:
        """The packets a FRAME or PLAIN of this lane delivers (none for a malformed one, counted)."""
        if len(payload) < SEQ_LEN:
            self.malformed += 1
            return []
        kind, seq = _SEQ.unpack_from(payload)
        kind -= self._kind
        if kind == KIND_PLAIN:
            self.meter.see(seq, now)
            return [payload[SEQ_LEN:]]
        if kind != KIND_FRAME:
            self.malformed += 1
            return []
        try:
            packets = self.decoder.receive(memoryview(payload)[SEQ_LEN:], now)
        except FecFrameError:
            self.malformed += 1
            return []
        self.meter.see(seq, now)
        return packets

    def report(self, now: float) -> bytes | None:
        self.decoder.poll(now)
        taken = self.meter.take(now)
        if taken is None:
            return None
        report = encode_report(*taken)
        return bytes((self._kind + KIND_REPORT,)) + report[1:] if self._kind else report


SendPayload = Callable[[int, bytes], bool]
Deliver = Callable[[int, bytes], None]
PeerPacketHandler = Callable[[int, bytes], None]


class _Lane:
    """One lane's per-peer senders and receivers."""

    __slots__ = ("flush_s", "lane", "receivers", "senders")

    def __init__(self, lane: int, flush_s: float) -> None:
        self.lane = lane
        self.flush_s = flush_s
        self.senders: dict[int, FecSender] = {}
        self.receivers: dict[int, FecReceiver] = {}

    def sender(self, peer: int) -> FecSender:
        sender = self.senders.get(peer)
        if sender is None:
            sender = self.senders[peer] = FecSender(self.flush_s, self.lane)
        return sender

    def receiver(self, peer: int) -> FecReceiver:
        receiver = self.receivers.get(peer)
        if receiver is None:
            receiver = self.receivers[peer] = FecReceiver(self.lane)
        return receiver


class FecService:
    """The node's FEC: a sender per destination and lane (UDP with --enable-fec-udp, KCP with
    --enable-fec-kcp), a receiver per source and lane.

    `send(peer, payload)` must deliver over a direct UDP link only (False otherwise); `usable(peer)`
    says whether the peer advertised FEC and is reached that way now. `deliver` takes the UDP lane's
    IP packets; the KCP lane's go to the handler `register`ed for their peer packet type.
    """

    def __init__(self, *, enabled: bool, send: SendPayload, deliver: Deliver,
                 usable: Callable[[int], bool], enabled_kcp: bool = False) -> None:
        self.enabled = enabled
        self.enabled_kcp = enabled_kcp
        self._send = send
        self._deliver = deliver
        self._usable = usable
        self._udp = _Lane(LANE_UDP, UDP_FLUSH_S)
        self._kcp = _Lane(LANE_KCP, KCP_FLUSH_S)
        self._lanes = (self._udp, self._kcp)
        self.senders = self._udp.senders
        self.receivers = self._udp.receivers
        self._handlers: dict[int, PeerPacketHandler] = {}
        self.too_big = 0  # packets above MAX_PROTECTED_PACKET, sent plain
        self.kcp_sent = 0  # KCP packets that went through the KCP lane
        self.kcp_received = 0  # KCP packets the KCP lane delivered (arrived or rebuilt)
        self.kcp_malformed = 0  # rebuilt or arrived with a packet type no handler takes
        # counts of peers that went away, so the totals never go backwards
        self._retired: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tick = self._loop.call_later(REPORT_INTERVAL_S, self._on_tick)

    def close(self) -> None:
        for handle in (self._timer, self._tick):
            if handle is not None:
                handle.cancel()
        self._timer = self._tick = None

    def register(self, packet_type: int, handler: PeerPacketHandler) -> None:
        """Where a KCP-lane packet of `packet_type` goes: the handler that takes it as a peer packet."""
        self._handlers[int(packet_type)] = handler

    # ---- send side ---------------------------------------------------------------------------

    def send_udp(self, peer: int, packet: bytes) -> bool:
        """Whether FEC took the packet (sent as frames); False: the caller sends it as plain Data."""
        return self._protect(self._udp, peer, packet)

    def send_peer_packet(self, peer: int, packet_type: int, payload: bytes) -> bool:
        """Whether the KCP lane took this KcpSrc/KcpDst packet; False: the caller sends it as it is."""
        if not self.enabled_kcp:
            return False
        if self._protect(self._kcp, peer, bytes((packet_type,)) + payload):
            self.kcp_sent += 1
            return True
        return False

    def _protect(self, lane: _Lane, peer: int, packet: bytes) -> bool:
        if not self._usable(peer):
            return False
        if len(packet) > MAX_PROTECTED_PACKET:
            self.too_big += 1
            return False
        sender = lane.sender(peer)
        now = time.monotonic()
        payloads = sender.wrap(packet, now)
        if payloads is None:
            return False
        send = self._send
        ok = True
        for p in payloads:
            ok = send(peer, p) and ok
        deadline = sender.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._arm(deadline)
        return ok

    def _arm(self, when: float) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        # time.monotonic and the loop's clock are both CLOCK_MONOTONIC on Linux
        self._timer = loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = time.monotonic()
        soonest = math.inf
        for lane in self._lanes:
            for peer, sender in lane.senders.items():
                for p in sender.poll(now):
                    self._send(peer, p)
                d = sender.next_deadline()
                if d is not None:
                    soonest = min(soonest, d)
        if soonest < math.inf:
            self._arm(soonest)

    # ---- receive side ------------------------------------------------------------------------

    def on_packet(self, from_peer: int, payload: bytes) -> None:
        """Handler for PacketType.PytierFec payloads (already opened)."""
        if not payload:
            return
        lane_no, kind = divmod(payload[0], _LANE_KINDS)
        if lane_no >= len(self._lanes):
            self._udp.receiver(from_peer).malformed += 1
            return
        lane = self._lanes[lane_no]
        if kind == KIND_REPORT:
            sender = lane.senders.get(from_peer)
            sample = decode_report(payload)
            if sender is None or sample is None:
                return
            for p in sender.on_report(sample):
                self._send(from_peer, p)
            return
        packets = lane.receiver(from_peer).receive(payload, time.monotonic())
        if lane is self._udp:
            deliver = self._deliver
            for packet in packets:
                deliver(from_peer, packet)
            return
        handlers = self._handlers
        for packet in packets:
            handler = handlers.get(packet[0]) if packet else None
            if handler is None:
                self.kcp_malformed += 1
                continue
            self.kcp_received += 1
            handler(from_peer, packet[KCP_TAG_LEN:])

    def _on_tick(self) -> None:
        loop = self._loop
        assert loop is not None
        self._tick = loop.call_later(REPORT_INTERVAL_S, self._on_tick)
        now = time.monotonic()
        for lane in self._lanes:
            for peer, receiver in lane.receivers.items():
                report = receiver.report(now)
                if report is not None:
                    self._send(peer, report)

    def forget(self, peers: set[int]) -> None:
        """Drop the state of peers that are gone (a peer that comes back is a new session)."""
        for lane in self._lanes:
            gone_senders = [s for p in peers if (s := lane.senders.pop(p, None)) is not None]
            gone_receivers = [r for p in peers if (r := lane.receivers.pop(p, None)) is not None]
            gone = _totals(gone_senders, gone_receivers)
            if lane is self._kcp:
                gone["fec_kcp_tx_parity_frames"] = gone["fec_tx_parity_frames"]
                gone["fec_kcp_rx_recovered"] = gone["fec_rx_recovered"]
            for name, value in gone.items():
                self._retired[name] = self._retired.get(name, 0) + value

    # ---- visibility --------------------------------------------------------------------------

    def kcp_shape(self, peer: int) -> str | None:
        """The KCP lane's shape toward `peer` for a proxy row; None when KCP goes to it plain."""
        if not self.enabled_kcp or not self._usable(peer):
            return None
        sender = self._kcp.senders.get(peer)
        return str(sender.params) if sender is not None and sender.params is not None else "off"

    def describe(self, peer: int, capable: bool) -> dict[str, Any]:
        """The fec_* fields of a `pytier-cli peer` row; "fec" is None toward a peer without FEC.

        "fec" is the shape toward the peer of the lane in use ("udp S, kcp S" when both are); the
        counts add up both lanes; "fec_kcp" is the KCP lane's shape alone.
        """
        if not capable:
            return {"fec": None}
        shapes = []
        senders = []
        receivers = []
        for lane, name in ((self._udp, "udp"), (self._kcp, "kcp")):
            sender = lane.senders.get(peer)
            if sender is not None:
                senders.append(sender)
                shapes.append((name, str(sender.params) if sender.params is not None else "off"))
            receiver = lane.receivers.get(peer)
            if receiver is not None:
                receivers.append(receiver)
        if not shapes:
            fec = "off"
        elif len(shapes) == 1:
            fec = shapes[0][1]
        else:
            fec = ", ".join(f"{name} {shape}" for name, shape in shapes)
        row: dict[str, Any] = {"fec": fec}
        if senders:
            row["fec_tx_data"] = sum(s.encoder.counters.data_frames for s in senders)
            row["fec_tx_parity"] = sum(s.encoder.counters.parity_frames for s in senders)
        if receivers:
            row["fec_recovered"] = sum(r.decoder.counters.recovered for r in receivers)
            row["fec_unrecovered"] = sum(r.decoder.counters.unrecovered_packets for r in receivers)
        kcp = self._kcp.senders.get(peer)
        if kcp is not None:
            row["fec_kcp"] = str(kcp.params) if kcp.params is not None else "off"
        return row

    def totals(self) -> dict[str, int]:
        """Sums over all peers and lanes, past ones included, for `pytier-cli stats` and the metrics."""
        out: dict[str, int] = {}
        for lane in self._lanes:
            for name, value in _totals(list(lane.senders.values()), list(lane.receivers.values())).items():
                out[name] = out.get(name, 0) + value
        kcp = _totals(list(self._kcp.senders.values()), list(self._kcp.receivers.values()))
        out["fec_kcp_tx_parity_frames"] = kcp["fec_tx_parity_frames"]
        out["fec_kcp_rx_recovered"] = kcp["fec_rx_recovered"]
        out["fec_tx_too_big"] = self.too_big
        out["fec_kcp_tx_packets"] = self.kcp_sent
        out["fec_kcp_rx_packets"] = self.kcp_received
        out["fec_kcp_rx_malformed"] = self.kcp_malformed
        for name, value in self._retired.items():
            out[name] = out.get(name, 0) + value
        return {k: v for k, v in out.items() if v}


def _totals(senders: list[FecSender], receivers: list[FecReceiver]) -> dict[str, int]:
    return {
        "fec_tx_data_frames": sum(s.encoder.counters.data_frames for s in senders),
        "fec_tx_data_bytes": sum(s.encoder.counters.data_bytes for s in senders),
        "fec_tx_parity_frames": sum(s.encoder.counters.parity_frames for s in senders),
        "fec_tx_parity_bytes": sum(s.encoder.counters.parity_bytes for s in senders),
        "fec_tx_plain_packets": sum(s.plain for s in senders),
        "fec_rx_data_frames": sum(r.decoder.counters.data_frames for r in receivers),
        "fec_rx_parity_frames": sum(r.decoder.counters.parity_frames for r in receivers),
        "fec_rx_recovered": sum(r.decoder.counters.recovered for r in receivers),
        "fec_rx_unrecovered": sum(r.decoder.counters.unrecovered_packets for r in receivers),
        "fec_rx_malformed": sum(r.malformed for r in receivers),
    }
