"""Pacing for KCP conversations: new segments leave at an estimate of the path's delivery rate.

ikcp with EasyTier's parameters has no congestion control: every flush moves as many new segments
as the window allows into flight, so a sender bursts a whole window (1024 segments, 1.2 MB) into the
bottleneck queue, overruns it, and then spends its time repairing self-inflicted losses. This module
is a small BBR-style controller in front of ikcp's send window, kept per peer (`PathRate`) because
all conversations with one peer share the path to it:

* the delivery rate is measured once per round trip as the growth of "segments acknowledged"
  (each conversation's snd_nxt - nsnd_buf, so out-of-order acknowledgements count, summed over the
  peer's conversations) over the round's duration;
* the bottleneck rate is the maximum of the recent rounds' rates, ignoring rounds in which no
  conversation could use more (all waiting for data or for a window) unless they are higher, so
  random loss does not talk the estimate down the way it does with loss-based control;
* the pacing rate is gain x bottleneck rate: 2.89 during start-up (until three rounds without 25%
  growth), then one draining round, then the 8-round cycle 1.25, 0.75, 1, 1, 1, 1, 1, 1; a round
  that never saw the RTT come back near its minimum (a standing queue) is followed by one at 0.75;
* the rate is shared equally between the conversations that have data and window to send
  (`FlowPacer`), each with its own small token bucket, so parallel connections get fair shares and
  a new one starts at its share instead of a fresh start-up;
* retransmissions are not paced (they repair what the path lost; charging them would pace the
  whole flow below the capacity by the loss rate);
* the segments in flight to the peer stay below a multiple of the bandwidth-delay product.

The pacer only decides how many new segments may enter flight at a flush; ikcp still sends the
standard segment format, so the other end may be any KCP implementation.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

STARTUP_GAIN = 2.885
PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
BW_FILTER_ROUNDS = 10
MIN_RTT_WINDOW_MS = 10_000
DEFAULT_RTT_MS = 100.0  # before the first measurement
INFLIGHT_GAIN = 2.0  # segments in flight <= INFLIGHT_GAIN x bandwidth-delay product
INITIAL_WINDOW = 32  # segments, for the first conversation on a path
JOINING_TOKENS = 2.0  # segments a later conversation may send before its share accrues
ROUNDING_SLACK = 1.0  # segments a token bucket may hold beyond its burst, so fractions are not lost
QUEUE_RTT_FACTOR = 1.25  # a round whose smallest RTT exceeds min_rtt x this (+ slack) ...
QUEUE_RTT_SLACK_MS = 2.0
QUEUE_DRAIN_GAIN = 0.75  # ... is followed by a round at this gain


class PacerMode(Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"


class PathRate:
    """Delivery-rate estimate and fair-share clock for all conversations with one peer."""

    __slots__ = (
        "_bw_samples",
        "_cycle",
        "_eligible",
        "_full_bw",
        "_full_bw_rounds",
        "_in_flight",
        "_in_flight_total",
        "_last_ms",
        "_min_rtt_ms",
        "_min_rtt_stamp",
        "_queue_standing",
        "_round",
        "_round_delivered",
        "_round_idle",
        "_round_min_rtt",
        "_round_start_ms",
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
        self._bw_samples: deque[tuple[int, float]] = deque()
        self._cycle = 0
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
        self._round_start_ms = now_ms

    @property
    def gain(self) -> float:
        if self.mode is PacerMode.STARTUP:
            return STARTUP_GAIN
        if self.mode is PacerMode.DRAIN:
            return 1.0 / STARTUP_GAIN
        if self._queue_standing:
            return QUEUE_DRAIN_GAIN
        return PROBE_GAINS[self._cycle]

    @property
    def min_rtt_ms(self) -> float:
        return self._min_rtt_ms

    def rate(self) -> float:
        """Pacing rate for the whole path, segments per ms."""
        rtt = self._min_rtt_ms or DEFAULT_RTT_MS
        return self.gain * max(self.btlbw, INITIAL_WINDOW / rtt)

    def room(self) -> int | None:
        """Segments that may still enter flight to the peer; None before there is an estimate."""
        if self.btlbw <= 0.0 or self._min_rtt_ms <= 0.0:
            return None
        gain = STARTUP_GAIN if self.mode is PacerMode.STARTUP else INFLIGHT_GAIN
        return int(gain * self.btlbw * self._min_rtt_ms) - self._in_flight_total

    def report(
        self, flow: int, now_ms: int, delivered: int, in_flight: int, srtt_ms: int, eligible: bool
    ) -> None:
        """One conversation's figures at the start of its flush: `delivered` new acknowledgements
        since its last report, `in_flight` unacknowledged segments, `eligible` when it has queued
        data and window to send it."""
        self.delivered += delivered
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
        idle = self._round_idle
        self._queue_standing = self._min_rtt_ms > 0.0 and (
            self._round_min_rtt > self._min_rtt_ms * QUEUE_RTT_FACTOR + QUEUE_RTT_SLACK_MS
        )
        self._round += 1
        self._round_start_ms = now_ms
        self._round_delivered = self.delivered
        self._round_idle = False
        self._round_min_rtt = 0.0
        samples = self._bw_samples
        if not idle or sample > self.btlbw:
            samples.append((self._round, sample))
        while samples and samples[0][0] <= self._round - BW_FILTER_ROUNDS:
            samples.popleft()
        self.btlbw = max((s for _, s in samples), default=self.btlbw)
        if self.mode is PacerMode.STARTUP:
            if self._queue_standing:
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
            self._cycle = 0
        else:
            self._cycle = (self._cycle + 1) % len(PROBE_GAINS)


class FlowPacer:
    """One conversation's view of its PathRate: how many new segments it may send at a flush."""

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
        """New segments this conversation may put in flight now. `delivered` is its running count
        of acknowledged segments, `in_flight` its unacknowledged ones, `srtt_ms` ikcp's smoothed RTT
        (0 before the first sample), `eligible` whether it has queued data and window to send it."""
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
        cap = path.share() * max(elapsed, self._burst_ms) + ROUNDING_SLACK
        if self._tokens < cap:
            self._tokens = min(self._tokens + earned, cap)
        allowed = int(self._tokens)
        room = path.room()
        if room is not None:
            allowed = min(allowed, room)
        return max(0, allowed)

    def on_flushed(self, new_segments: int) -> None:
        self._tokens -= new_segments

    def close(self) -> None:
        self.path.leave(self._id)
