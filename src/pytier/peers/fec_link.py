"""FEC for plain UDP packets through the tunnel, per peer (docs/fec.md, "What is wired").

Everything here travels in pytier's own peer packet type (PacketType.PytierFec), sealed like Data,
and only to a peer that advertised PeerFeatureFlag.pytier_fec over a direct UDP link: an EasyTier
node or relay never sees it. The payload starts with a kind byte:

    FRAME  0 | seq u32 | FEC frame (pytier.fec.framing)
    PLAIN  1 | seq u32 | IP packet      (FEC off, the path's loss still being measured)
    REPORT 2 | packets u32 | lost u32 | bursts u32 | millis u32   (receiver -> sender)

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
from dataclasses import dataclass
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
            # late (reordered): it was counted lost when the packets after it came
            if self.lost:
                self.lost -= 1
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

    __slots__ = ("_measured", "_next_probe", "_probe_until", "_seq", "controller", "encoder", "plain",
                 "reports")

    def __init__(self, flush_s: float = UDP_FLUSH_S) -> None:
        self.encoder = FecEncoder(None, flush_s=flush_s, first_group=secrets.randbits(32))
        self.controller = FecController(ControllerConfig(flush_s=flush_s, min_packets=MIN_PACKETS))
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
            return [self._tag(KIND_PLAIN, packet)]
        return [self._tag(KIND_FRAME, f) for f in self.encoder.push(packet, now)]

    def poll(self, now: float) -> list[bytes]:
        return [self._tag(KIND_FRAME, f) for f in self.encoder.poll(now)]

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
            measured = f" (loss {est[0]:.1%}, mean burst {est[1]:.1f})" if est is not None else ""
            log.info("FEC shape %s -> %s%s", before or "off", params or "off", measured)
        return [self._tag(KIND_FRAME, f) for f in self.encoder.set_params(params)]


class FecReceiver:
    """One source peer: measures the path's loss, rebuilds packets, reports back."""

    __slots__ = ("decoder", "malformed", "meter")

    def __init__(self) -> None:
        self.decoder = FecDecoder()
        self.meter = LossMeter()
        self.malformed = 0

    def receive(self, payload: bytes, now: float) -> list[bytes]:
        """The IP packets a FRAME or PLAIN delivers (none for a malformed one, counted)."""
        if len(payload) < SEQ_LEN:
            self.malformed += 1
            return []
        kind, seq = _SEQ.unpack_from(payload)
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
        return encode_report(*taken) if taken is not None else None


SendPayload = Callable[[int, bytes], bool]
Deliver = Callable[[int, bytes], None]


class FecService:
    """The node's FEC for UDP: a sender per destination (with --enable-fec-udp), a receiver per source.

    `send(peer, payload)` must deliver over a direct UDP link only (False otherwise); `usable(peer)`
    says whether the peer advertised FEC and is reached that way now.
    """

    def __init__(self, *, enabled: bool, send: SendPayload, deliver: Deliver,
                 usable: Callable[[int], bool]) -> None:
        self.enabled = enabled
        self._send = send
        self._deliver = deliver
        self._usable = usable
        self.senders: dict[int, FecSender] = {}
        self.receivers: dict[int, FecReceiver] = {}
        self.too_big = 0  # UDP packets above MAX_PROTECTED_PACKET, sent plain
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

    # ---- send side ---------------------------------------------------------------------------

    def send_udp(self, peer: int, packet: bytes) -> bool:
        """Whether FEC took the packet (sent as frames); False: the caller sends it as plain Data."""
        if not self._usable(peer):
            return False
        if len(packet) > MAX_PROTECTED_PACKET:
            self.too_big += 1
            return False
        sender = self.senders.get(peer)
        if sender is None:
            sender = self.senders[peer] = FecSender()
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
        for peer, sender in self.senders.items():
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
        if payload[:1] == bytes((KIND_REPORT,)):
            sender = self.senders.get(from_peer)
            sample = decode_report(payload)
            if sender is None or sample is None:
                return
            for p in sender.on_report(sample):
                self._send(from_peer, p)
            return
        receiver = self.receivers.get(from_peer)
        if receiver is None:
            receiver = self.receivers[from_peer] = FecReceiver()
        deliver = self._deliver
        for packet in receiver.receive(payload, time.monotonic()):
            deliver(from_peer, packet)

    def _on_tick(self) -> None:
        loop = self._loop
        assert loop is not None
        self._tick = loop.call_later(REPORT_INTERVAL_S, self._on_tick)
        now = time.monotonic()
        for peer, receiver in self.receivers.items():
            report = receiver.report(now)
            if report is not None:
                self._send(peer, report)

    def forget(self, peers: set[int]) -> None:
        """Drop the state of peers that are gone (a peer that comes back is a new session)."""
        gone_senders = [s for p in peers if (s := self.senders.pop(p, None)) is not None]
        gone_receivers = [r for p in peers if (r := self.receivers.pop(p, None)) is not None]
        for name, value in _totals(gone_senders, gone_receivers).items():
            self._retired[name] = self._retired.get(name, 0) + value

    # ---- visibility --------------------------------------------------------------------------

    def describe(self, peer: int, capable: bool) -> dict[str, Any]:
        """The fec_* fields of a `pytier-cli peer` row; "fec" is None toward a peer without FEC."""
        if not capable:
            return {"fec": None}
        sender = self.senders.get(peer)
        receiver = self.receivers.get(peer)
        row: dict[str, Any] = {
            "fec": str(sender.params) if sender is not None and sender.params is not None else "off",
        }
        if sender is not None:
            c = sender.encoder.counters
            row["fec_tx_data"] = c.data_frames
            row["fec_tx_parity"] = c.parity_frames
        if receiver is not None:
            d = receiver.decoder.counters
            row["fec_recovered"] = d.recovered
            row["fec_unrecovered"] = d.unrecovered_packets
        return row

    def totals(self) -> dict[str, int]:
        """Sums over all peers, past ones included, for `pytier-cli stats` and the metrics."""
        out = _totals(list(self.senders.values()), list(self.receivers.values()))
        out["fec_tx_too_big"] = self.too_big
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
