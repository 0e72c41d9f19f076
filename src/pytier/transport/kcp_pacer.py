"""Pacing for KCP conversations: segments leave at an estimate of the path's delivery rate.

ikcp with EasyTier's parameters has no congestion control: every flush moves as many new segments
as the window allows into flight, so a sender bursts a whole window (1024 segments, 1.2 MB) into the
bottleneck queue, overruns it, and then spends its time repairing self-inflicted losses. This module
is a small BBR-style controller in front of ikcp's send window, kept per peer (`PathRate`) because
all conversations with one peer share the path to it:

* the delivery rate is measured once per round trip as the growth of "segments acknowledged"
  (each conversation's snd_nxt - nsnd_buf, so out-of-order acknowledgements count, summed over the
  peer's conversations) over the round's duration;
* the bottleneck rate is the maximum of the recent rounds' rates, ignoring rounds in which no
  conversation could use more (all waiting for data or for a window) unless they are higher, and
  rounds that delivered nothing, so random loss does not talk the estimate down the way it does
  with loss-based control;
* the pacing rate is gain x bottleneck rate: 2.89 during start-up (until three rounds without 25%
  growth, or a round losing 30%), then one draining round (no new data while more than one
  bandwidth-delay product is in flight), then the 8-round cycle 1.25, 0.75, 1, 1, 1, 1, 1, 1; a round
  that never saw the RTT come back near its minimum (a standing queue) is followed by one at 0.75;
* the rate is shared equally between the conversations that have data and window to send
  (`FlowPacer`), each with its own small token bucket, so parallel connections get fair shares and
  a new one starts at its share instead of a fresh start-up;
* retransmissions are paced like new data and share its budget: unpaced, they came on top of the
  pacing rate, so a policer's drops turned into resends that were dropped in turn (46% of the frames
  lost at a 30 Mbit/s policer). So that random loss does not pace the flow below the capacity by
  the loss rate, the rate is divided by (1 - the path's base loss), the mean share of resends in the
  less lossy half of the last ten rounds: random loss shows in every round, a policer's only in
  rounds that send above its rate;
* two rounds in a row whose resends exceed the base loss by a margin sent faster than the path
  carries (a policer, or its token bucket that let a probe through and then ran dry): the second
  one's delivery rate replaces the filter's higher samples at once instead of ten rounds later
  (bursty loss puts single rounds over the margin);
* a path that has delivered nothing for a while with segments in flight is silent (an outage):
  nothing new enters flight, resends go out in short trains with an exponential backoff
  until something is delivered again, and the silent rounds leave the rate estimate alone;
* the segments in flight to the peer stay below a multiple of the bandwidth-delay product.

The pacer decides how many segments may leave at a flush (kcp_session holds back the resends
beyond that); ikcp still sends the standard segment format, so the other end may be any KCP
implementation.
"""

from __future__ import annotations

import math
from collections import deque
from enum import Enum

STARTUP_GAIN = 2.885
PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
# Draining start-up's queue stops new data until the segments in flight are down to one
# bandwidth-delay product, but repairs start-up's losses at the full rate meanwhile: at gain 1/2.9
# they waited a round trip and more, the window stalled behind them.
DRAIN_GAIN = 1.0
DRAIN_INFLIGHT_GAIN = 1.0
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
BW_FILTER_ROUNDS = 10
MIN_RTT_WINDOW_MS = 10_000
DEFAULT_RTT_MS = 100.0  # before the first measurement
INFLIGHT_GAIN = 2.0  # segments in flight <= INFLIGHT_GAIN x bandwidth-delay product
# ... but never below this: a bandwidth-delay product under one segment (a slow estimate on a
# loopback RTT of 1 ms) would stop the flow for good.
MIN_INFLIGHT = 4
INITIAL_WINDOW = 32  # segments, for the first conversation on a path
JOINING_TOKENS = 2.0  # segments a later conversation may send before its share accrues
RESEND_OVERDRAFT = 8  # segments by which resends may take a conversation's tokens below zero
ROUNDING_SLACK = 1.0  # segments a token bucket may hold beyond its burst, so fractions are not lost
QUEUE_RTT_FACTOR = 1.25  # a round whose smallest RTT exceeds min_rtt x this (+ slack) ...
QUEUE_RTT_SLACK_MS = 2.0
QUEUE_DRAIN_GAIN = 0.75  # ... is followed by a round at this gain
LOSS_ROUNDS = 10  # rounds whose resend share the base loss is taken from
LOSS_MIN_ROUNDS = 4  # rounds with a resend share before one can be over the base loss
LOSS_MIN_SEGMENTS = 64  # a round that sent fewer tells too little about the loss
MAX_BASE_LOSS = 0.35  # beyond this the rate no longer grows with the loss
# A round whose resend share exceeds the base loss by this much (plus the same share of the base
# loss itself, as random loss varies more when it is higher) sent above the path's rate.
LOSS_EXCESS = 0.05
LOSS_EXCESS_FACTOR = 0.5
SETTLE_ROUNDS = 3  # rounds after start-up and its drain before a round can be over the margin
STARTUP_LOSS_EXIT = 0.3  # a start-up round losing this share ends start-up at once
SILENT_MIN_MS = 100  # nothing delivered for max(this, SILENT_RTTS x min RTT): the path is silent
SILENT_RTTS = 2.5
# Segments in each train of resends over a silent path, one per flush so that each draws its own
# ACK packet: a loss model (or a radio) that goes by packets stays in a bad state as long as too
# few packets cross.
SILENT_PROBE_SEGMENTS = 8
SILENT_PROBE_MAX_MS = 1000  # the backoff of resends over a silent path stops growing here


class PacerMode(Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"


class PathRate:
    """Delivery-rate estimate and fair-share clock for all conversations with one peer."""

    __slots__ = (
        "_bw_samples",
        "_cycle",
        "_delivery_ms",
        "_eligible",
        "_excess_before",
        "_full_bw",
        "_full_bw_rounds",
        "_in_flight",
        "_in_flight_total",
        "_last_ms",
        "_last_share",
        "_loss_samples",
        "_min_rtt_ms",
        "_min_rtt_stamp",
        "_prev_round_sent",
        "_probe_at_ms",
        "_probe_backoff_ms",
        "_probe_left",
        "_probe_since",
        "_queue_standing",
        "_round",
        "_round_delivered",
        "_round_idle",
        "_round_min_rtt",
        "_round_resent",
        "_round_sent",
        "_round_start_ms",
        "base_loss",
        "btlbw",
        "delivered",
        "flows",
        "mode",
        "share_clock",
    )

    def __init__(self, now_ms: int) -> None:
        self.mode = PacerMode.STARTUP
        self.btlbw = 0.0  # segments per ms
        self.delivered = 0  # segments acknowledged, all conversations
        self.flows = 0  # conversations using this path
        self.share_clock = 0.0  # segments one eligible conversation was entitled to since the start
        self.base_loss = 0.0  # share of transmissions that are resends in the less lossy rounds
        self._bw_samples: deque[tuple[int, float]] = deque()
        self._loss_samples: deque[float] = deque()
        self._cycle = 0
        self._excess_before = False
        self._probe_since = 0
        self._last_share = 0.0
        self._delivery_ms = now_ms  # last delivery, or when segments went into flight after none
        self._eligible: set[int] = set()
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._in_flight: dict[int, int] = {}
        self._in_flight_total = 0
        self._last_ms = now_ms
        self._min_rtt_ms = 0.0
        self._min_rtt_stamp = now_ms
        self._queue_standing = False
        self._round = 0
        self._round_delivered = 0
        self._round_idle = False
        self._round_min_rtt = 0.0
        self._round_sent = 0
        self._prev_round_sent = 0
        self._round_resent = 0
        self._round_start_ms = now_ms
        self._probe_at_ms = -1
        self._probe_backoff_ms = 0
        self._probe_left = 0

    @property
    def gain(self) -> float:
        if self.mode is PacerMode.STARTUP:
            return STARTUP_GAIN
        if self.mode is PacerMode.DRAIN:
            return DRAIN_GAIN
        if self._queue_standing:
            return QUEUE_DRAIN_GAIN
        return PROBE_GAINS[self._cycle]

    @property
    def min_rtt_ms(self) -> float:
        return self._min_rtt_ms

    def rate(self) -> float:
        """Pacing rate for the whole path (new segments and resends), segments per ms."""
        rtt = self._min_rtt_ms or DEFAULT_RTT_MS
        return self.gain * max(self.btlbw, INITIAL_WINDOW / rtt) / (1.0 - self.base_loss)

    def silent(self, now_ms: int) -> bool:
        """Segments are in flight and nothing has been delivered for a while: an outage."""
        if self._in_flight_total <= 0:
            return False
        return now_ms - self._delivery_ms > max(SILENT_MIN_MS, SILENT_RTTS * self._min_rtt_ms)

    def silent_probe(self, now_ms: int) -> bool:
        """Whether one resend may go out over the silent path at this flush: trains of
        SILENT_PROBE_SEGMENTS resends, one per flush, each train starting no sooner than twice as
        long after the one before. Only resends that leave use up a train (on_sent): a flush with
        nothing to resend does not, or a single request lost in a burst would find its train spent
        by the flushes before its RTO and wait up to SILENT_PROBE_MAX_MS (a 64-byte echo over the
        bursty path had a p99 of 4.7 s)."""
        if self._probe_at_ms < 0:
            self._probe_backoff_ms = max(SILENT_MIN_MS, int(SILENT_RTTS * self._min_rtt_ms))
            self._probe_at_ms = now_ms
        if self._probe_left <= 0 and now_ms >= self._probe_at_ms:
            self._probe_at_ms = now_ms + self._probe_backoff_ms
            self._probe_backoff_ms = min(2 * self._probe_backoff_ms, SILENT_PROBE_MAX_MS)
            self._probe_left = SILENT_PROBE_SEGMENTS
        return self._probe_left > 0

    def on_sent(self, segments: int, resends: int) -> None:
        """Data segments that left at a flush, `resends` of them sent before."""
        self._round_sent += segments
        self._round_resent += resends
        if self._probe_left > 0:
            self._probe_left = max(0, self._probe_left - segments)

    def room(self) -> int | None:
        """Segments that may still enter flight to the peer; None before there is an estimate."""
        if self.btlbw <= 0.0 or self._min_rtt_ms <= 0.0:
            return None
        if self.mode is PacerMode.STARTUP:
            gain = STARTUP_GAIN
        elif self.mode is PacerMode.DRAIN:
            gain = DRAIN_INFLIGHT_GAIN
        else:
            gain = INFLIGHT_GAIN
        return max(int(gain * self.btlbw * self._min_rtt_ms), MIN_INFLIGHT) - self._in_flight_total

    def report(
        self, flow: int, now_ms: int, delivered: int, in_flight: int, srtt_ms: int, eligible: bool
    ) -> None:
        """One conversation's figures at the start of its flush: `delivered` new acknowledgements
        since its last report, `in_flight` unacknowledged segments, `eligible` when it has queued
        data and window to send it."""
        self.delivered += delivered
        if delivered or self._in_flight_total <= 0:
            self._delivery_ms = now_ms
            self._probe_at_ms = -1
            self._probe_left = 0
        self._in_flight_total += in_flight - self._in_flight.get(flow, 0)
        self._in_flight[flow] = in_flight
        if eligible:
            self._eligible.add(flow)
        else:
            self._eligible.discard(flow)
        if srtt_ms > 0:
            if (
                self._min_rtt_ms == 0.0
                or srtt_ms <= self._min_rtt_ms
                or now_ms - self._min_rtt_stamp > MIN_RTT_WINDOW_MS
            ):
                self._min_rtt_ms = float(srtt_ms)
                self._min_rtt_stamp = now_ms
            if self._round_min_rtt == 0.0 or srtt_ms < self._round_min_rtt:
                self._round_min_rtt = float(srtt_ms)
        elapsed = now_ms - self._last_ms
        if elapsed > 0:
            self.share_clock += self.rate() * elapsed / max(1, len(self._eligible))
            self._last_ms = now_ms
        if not self._eligible:
            self._round_idle = True
        round_ms = max(float(srtt_ms) if srtt_ms > 0 else DEFAULT_RTT_MS, 1.0)
        if now_ms - self._round_start_ms >= round_ms:
            self._end_round(now_ms)

    def share(self) -> float:
        """One eligible conversation's share of the pacing rate, segments per ms."""
        return self.rate() / max(1, len(self._eligible))

    def leave(self, flow: int) -> None:
        self._eligible.discard(flow)
        self._in_flight_total -= self._in_flight.pop(flow, 0)
        self.flows -= 1

    def _end_round(self, now_ms: int) -> None:
        sample = (self.delivered - self._round_delivered) / (now_ms - self._round_start_ms)
        # A round that delivered nothing (an outage) says nothing about the rate the path carries.
        idle = self._round_idle or sample == 0.0
        over = self._note_loss()
        # Bursty loss puts single rounds over the margin now and then; a path that carries less
        # than the estimate does so every round until the rate comes down. Start-up, at 2.9 times
        # the estimate, loses far more than the margin at once. Its overshoot's losses show for a
        # few rounds after it: they say nothing about the estimate, which start-up's end took
        # from delivery.
        startup = self.mode is PacerMode.STARTUP
        settled = self.mode is PacerMode.PROBE_BW and self._round - self._probe_since > SETTLE_ROUNDS
        cut = (over and self._excess_before and settled) or (
            startup and self._last_share > STARTUP_LOSS_EXIT
        )
        self._excess_before = over
        self._queue_standing = self._min_rtt_ms > 0.0 and (
            self._round_min_rtt > self._min_rtt_ms * QUEUE_RTT_FACTOR + QUEUE_RTT_SLACK_MS
        )
        self._round += 1
        self._round_start_ms = now_ms
        self._round_delivered = self.delivered
        self._round_idle = False
        self._round_min_rtt = 0.0
        samples = self._bw_samples
        if cut and sample > 0.0:
            samples.clear()
            samples.append((self._round, sample))
        elif not idle or sample > self.btlbw:
            samples.append((self._round, sample))
        while samples and samples[0][0] <= self._round - BW_FILTER_ROUNDS:
            samples.popleft()
        self.btlbw = max((s for _, s in samples), default=self.btlbw)
        if self.mode is PacerMode.STARTUP:
            if self._queue_standing or cut:
                self.mode = PacerMode.DRAIN
            elif not idle:
                if self.btlbw >= self._full_bw * FULL_BW_GROWTH:
                    self._full_bw = self.btlbw
                    self._full_bw_rounds = 0
                else:
                    self._full_bw_rounds += 1
                    if self._full_bw_rounds >= FULL_BW_ROUNDS:
                        self.mode = PacerMode.DRAIN
        elif self.mode is PacerMode.DRAIN:
            self.mode = PacerMode.PROBE_BW
            self._probe_since = self._round
            self._cycle = 0
        else:
            self._cycle = (self._cycle + 1) % len(PROBE_GAINS)

    def _note_loss(self) -> bool:
        """Take this round's resend share into the base loss; True when it exceeds the base loss by
        the margin. Resends come a round trip after the losses that caused them, so the share is
        of what the round before sent."""
        sent, resent = self._prev_round_sent, self._round_resent
        self._prev_round_sent = self._round_sent
        self._round_sent = self._round_resent = 0
        self._last_share = 0.0
        if sent < LOSS_MIN_SEGMENTS:
            return False
        share = min(1.0, resent / sent)
        self._last_share = share
        losses = self._loss_samples
        base = self.base_loss
        over = len(losses) >= LOSS_MIN_ROUNDS and share > base + LOSS_EXCESS + LOSS_EXCESS_FACTOR * base
        losses.append(share)
        if len(losses) > LOSS_ROUNDS:
            losses.popleft()
        lowest = sorted(losses)[: max(1, len(losses) // 2)]
        self.base_loss = min(MAX_BASE_LOSS, sum(lowest) / len(lowest))
        return over


class FlowPacer:
    """One conversation's view of its PathRate: how many segments it may send at a flush."""

    __slots__ = (
        "_burst_ms",
        "_delivered",
        "_id",
        "_last_ms",
        "_max_gap_ms",
        "_seen_clock",
        "_tokens",
        "path",
    )

    def __init__(
        self, path: PathRate, flow_id: int, now_ms: int, *, burst_ms: float, max_gap_ms: float
    ) -> None:
        self.path = path
        self._id = flow_id
        self._last_ms = now_ms
        self._burst_ms = burst_ms
        self._max_gap_ms = max_gap_ms
        self._delivered = 0
        self._seen_clock = path.share_clock
        self._tokens = float(INITIAL_WINDOW) if path.flows == 0 and path.btlbw == 0.0 else JOINING_TOKENS
        path.flows += 1

    def allowance(self, now_ms: int, delivered: int, in_flight: int, srtt_ms: int, eligible: bool) -> int:
        """Segments (new ones and resends alike) this conversation may send now, negative while
        earlier resends took more. `delivered` is its running count of acknowledged segments,
        `in_flight` its unacknowledged ones, `srtt_ms` ikcp's smoothed RTT (0 before the first
        sample), `eligible` whether it has queued data and window to send it. New segments are
        limited by `room()` as well."""
        path = self.path
        path.report(
            self._id, now_ms, (delivered - self._delivered) & 0xFFFFFFFF, in_flight, srtt_ms, eligible
        )
        self._delivered = delivered
        earned = path.share_clock - self._seen_clock
        self._seen_clock = path.share_clock
        # Credit covers the time since this conversation's last flush (timer-driven flushes come
        # once per interval), never a longer idle or blocked period.
        elapsed = min(now_ms - self._last_ms, self._max_gap_ms)
        self._last_ms = now_ms
        if path.silent(now_ms):
            self._tokens = 0.0
            return 1 if in_flight > 0 and path.silent_probe(now_ms) else 0
        cap = path.share() * max(elapsed, self._burst_ms) + ROUNDING_SLACK
        if self._tokens < cap:
            self._tokens = min(self._tokens + earned, cap)
        return math.floor(self._tokens)

    def overdraft(self, now_ms: int) -> int:
        """Segments by which resends may take the tokens below zero (none over a silent path): a
        resend held back even briefly is dated by ikcp from when it was made, so the ACKs of what
        leaves before it fast-resend it once more (at a flush every 0.1 ms, 0.7% more duplicates)."""
        if self.path.silent(now_ms):
            return 0
        return RESEND_OVERDRAFT

    def room(self, now_ms: int) -> int | None:
        """New segments that may still enter flight to the peer; None when the pacer sets no bound."""
        if self.path.silent(now_ms):
            return 0
        return self.path.room()

    def on_flushed(self, segments: int, resends: int) -> None:
        """`segments` data segments left, `resends` of them sent before."""
        self._tokens -= segments
        self.path.on_sent(segments, resends)

    def close(self) -> None:
        self.path.leave(self._id)
