"""Pacing for one KCP conversation: new segments leave at an estimate of the path's delivery rate.

ikcp with EasyTier's parameters has no congestion control: every flush moves as many new segments
as the window allows into flight, so a sender bursts a whole window (1024 segments, 1.2 MB) into the
bottleneck queue, overruns it, and then spends its time repairing self-inflicted losses. This module
is a small BBR-style controller in front of ikcp's send window:

* the delivery rate is measured once per round trip as the growth of "segments acknowledged"
  (ikcp's snd_nxt - nsnd_buf, so out-of-order acknowledgements count) over the round's duration;
* the bottleneck rate is the maximum of the recent rounds' rates, ignoring rounds in which the
  sender was limited by the application or a window rather than by the pacer (unless they are
  higher), so random loss does not talk the estimate down the way it does with loss-based control;
* new segments get tokens at gain x bottleneck rate: 2.89 during start-up (until three rounds
  without 25% growth), then one draining round, then the 8-round cycle 1.25, 0.75, 1, 1, 1, 1, 1, 1;
* retransmissions are not paced (they repair what the path lost; charging them would pace the
  whole flow below the capacity by the loss rate);
* the segments in flight stay below a multiple of the bandwidth-delay product, which bounds the
  queue several conversations can build together.

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
INITIAL_WINDOW = 32  # segments
MIN_BURST = 4.0  # segments
QUEUE_RTT_FACTOR = 1.25  # a round whose smallest RTT exceeds min_rtt x this (+ slack) ...
QUEUE_RTT_SLACK_MS = 2.0
QUEUE_DRAIN_GAIN = 0.75  # ... is followed by a round at this gain


class PacerMode(Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"


class DeliveryRatePacer:
    """Decides, at each flush, how many new segments may enter flight."""

    __slots__ = (
        "_burst_ms",
        "_bw_samples",
        "_cycle",
        "_full_bw",
        "_full_bw_rounds",
        "_last_ms",
        "_max_gap_ms",
        "_min_rtt_ms",
        "_min_rtt_stamp",
        "_queue_standing",
        "_round",
        "_round_app_limited",
        "_round_delivered",
        "_round_limited",
        "_round_min_rtt",
        "_round_start_ms",
        "_tokens",
        "btlbw",
        "mode",
    )

    def __init__(self, now_ms: int, *, burst_ms: float, max_gap_ms: float) -> None:
        self.mode = PacerMode.STARTUP
        self.btlbw = 0.0  # segments per ms
        self._bw_samples: deque[tuple[int, float]] = deque()
        self._burst_ms = burst_ms
        self._max_gap_ms = max_gap_ms
        self._cycle = 0
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._last_ms = now_ms
        self._min_rtt_ms = 0.0
        self._min_rtt_stamp = now_ms
        self._round = 0
        self._round_delivered = 0
        self._round_limited = False
        self._round_app_limited = False
        self._round_min_rtt = 0.0
        self._queue_standing = False
        self._round_start_ms = now_ms
        self._tokens = float(INITIAL_WINDOW)

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
        """Pacing rate in segments per ms."""
        rtt = self._min_rtt_ms or DEFAULT_RTT_MS
        return self.gain * max(self.btlbw, INITIAL_WINDOW / rtt)

    def allowance(self, now_ms: int, delivered: int, in_flight: int, srtt_ms: int) -> int:
        """New segments that may enter flight now. `delivered` is the running count of acknowledged
        segments, `in_flight` the segments sent and not acknowledged, `srtt_ms` ikcp's smoothed RTT
        (0 before the first sample)."""
        if srtt_ms > 0 and (
            self._min_rtt_ms == 0.0
            or srtt_ms <= self._min_rtt_ms
            or now_ms - self._min_rtt_stamp > MIN_RTT_WINDOW_MS
        ):
            self._min_rtt_ms = float(srtt_ms)
            self._min_rtt_stamp = now_ms
        if srtt_ms > 0 and (self._round_min_rtt == 0.0 or srtt_ms < self._round_min_rtt):
            self._round_min_rtt = float(srtt_ms)
        round_ms = max(float(srtt_ms) if srtt_ms > 0 else DEFAULT_RTT_MS, 1.0)
        if now_ms - self._round_start_ms >= round_ms:
            self._end_round(now_ms, delivered)
        elapsed = now_ms - self._last_ms
        self._last_ms = now_ms
        rate = self.rate()
        if elapsed > 0:
            # Credit covers the gap since the last flush (timer-driven flushes come once per
            # interval), never a longer idle or blocked period.
            burst = rate * max(float(min(elapsed, self._max_gap_ms)), self._burst_ms)
            self._tokens = min(self._tokens + rate * elapsed, max(burst, MIN_BURST))
        if self.btlbw > 0.0 and self._min_rtt_ms > 0.0:
            gain = STARTUP_GAIN if self.mode is PacerMode.STARTUP else INFLIGHT_GAIN
            room = int(gain * self.btlbw * self._min_rtt_ms) - in_flight
            return max(0, min(int(self._tokens), room))
        return max(0, int(self._tokens))

    def on_flushed(self, new_segments: int, *, app_limited: bool, window_limited: bool) -> None:
        """After a flush: `new_segments` entered flight; `app_limited` when the send queue ran dry,
        `window_limited` when a window (not the pacer) held segments back."""
        self._tokens -= new_segments
        if app_limited:
            self._round_app_limited = True
            self._round_limited = True
        elif window_limited:
            self._round_limited = True

    def _end_round(self, now_ms: int, delivered: int) -> None:
        duration = now_ms - self._round_start_ms
        sample = ((delivered - self._round_delivered) & 0xFFFFFFFF) / duration
        limited = self._round_limited
        app_limited = self._round_app_limited
        # A queue that never drained during a whole round is standing, not a probe's transient.
        self._queue_standing = self._min_rtt_ms > 0.0 and (
            self._round_min_rtt > self._min_rtt_ms * QUEUE_RTT_FACTOR + QUEUE_RTT_SLACK_MS
        )
        self._round_min_rtt = 0.0
        self._round += 1
        self._round_start_ms = now_ms
        self._round_delivered = delivered
        self._round_limited = False
        self._round_app_limited = False
        samples = self._bw_samples
        if not limited or sample > self.btlbw:
            samples.append((self._round, sample))
        while samples and samples[0][0] <= self._round - BW_FILTER_ROUNDS:
            samples.popleft()
        self.btlbw = max((s for _, s in samples), default=self.btlbw)
        if self.mode is PacerMode.STARTUP:
            if self._queue_standing:
                self.mode = PacerMode.DRAIN
                return
            if app_limited:
                return
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
