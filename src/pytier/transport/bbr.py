"""BBR v1 congestion control (draft-cardwell-iccrg-bbr-congestion-control-00), sans-IO.

The controller sees three things: a packet leaving (`on_send`, which returns the delivery-rate
snapshot the caller keeps with the packet), a packet acknowledged (`on_ack`, with that snapshot) and
packets declared lost (`on_loss`). From those it keeps the two numbers of its path model, the
bottleneck bandwidth (windowed maximum of delivery-rate samples over 10 rounds) and the round-trip
propagation time (windowed minimum over 10 s), and derives the pacing rate and the congestion window
from them with the gains of its state machine: STARTUP (2.885 until the bandwidth stops growing by
25% for 3 rounds), DRAIN (the inverse gain, until the queue it built is gone), PROBE_BW (the 8-phase
cycle 1.25, 0.75, 1 x 6) and PROBE_RTT (cwnd of 4 packets for 200 ms when the minimum RTT is 10 s old).

Delivery rate follows draft-cheng-iccrg-delivery-rate-estimation: each packet remembers how much had
been delivered, and when, at its send time; its acknowledgement gives delivered-bytes over the longer
of the send and ack intervals. Samples taken while the sender had nothing to send (`on_app_limited`)
only raise the estimate, never lower it.

Loss does not lower the model: on a path that drops packets at random that is what lets BBR keep its
rate. The draft's packet conservation during loss recovery is available (`loss_conservation=True`) for
paths whose losses mean congestion; pytier's QUIC proxy runs without it, as quinn's BBR does.

One departure from the draft, on by default (`loss_tolerant`): delivery-rate samples are divided by
(1 - p), p being the loss rate of the packets sent in PROBE_BW's draining phase (gain 0.75). Plain
BBR v1 measures only what arrived, so with random loss p its bandwidth estimate, and with it the
pacing rate, settles near (1 - p) x the bottleneck and then drifts with the max filter's noise; on
the 20 ms / 100 Mbit/s model link at 20% loss that is ~52 Mbit/s of goodput against ~70 with the
correction. The draining phase sends below the estimated bandwidth, so what it loses is lost at
random, not to our own queue; if the estimate were too high, that phase would overflow the queue
too, but the correction then only brings the estimate back to what the draining phase could send,
which is below what it was: a shallow queue cannot talk the estimate up. A corrected sample never
exceeds the rate at which its interval's packets were sent, so a noisy loss estimate cannot either.

A second departure, with the first (`loss_tolerant`): loss that the sender causes itself. A policer
drops whatever exceeds its rate, with no queue and so no RTT signal, and its bucket makes delivery
samples overshoot its rate; a deep queue on a long path overflows when the estimate is a little
high. Neither looks like random loss: the losses come and go with the rate. So a gain cycle that
lost clearly more than the random loss caps the estimate at what that cycle delivered, for two
cycles (and a start-up round that lost 30% ends start-up).

A third, for policers (after BBR v1's long-term bandwidth sampling in Linux, with a different test):
capping the estimate for two cycles was not enough, because a policer's bucket passes a probe at
1.25 x its rate and the next cycles send at that rate into its drops (7% of the QUIC proxy's frames
behind the benchmark's 30 Mbit/s policer). An overshoot with no queue behind it (its RTT samples
near RTprop) that lost far more than the packets sent below the estimate ever do starts the policer's
mode: pacing at 0.99 x what the policer delivered, gain 1, no probing, for 48 rounds after the last
overshoot, then probing again with each round judged, so that probing past the policer costs one
round. A window of the mode that still loses measures the policer's rate with its bucket empty; two
in a row mean the loss was the path's own (a random loss estimate that was too low), and the mode
ends. On the model link behind that policer the sender's losses fall from 7.3% to under 4% of an
8 s run, start-up's overshoot included, at the same goodput.

Units: bytes, seconds, bytes per second. Time is whatever clock the caller passes in.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from enum import Enum

HIGH_GAIN = 2.885  # 2 / ln 2: doubles the delivery rate every round in STARTUP
DRAIN_GAIN = 1.0 / HIGH_GAIN
CWND_GAIN = 2.0
PACING_GAIN_CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
BTLBW_FILTER_ROUNDS = 10
RTPROP_FILTER_S = 10.0
PROBE_RTT_DURATION_S = 0.200
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
MIN_PIPE_PACKETS = 4
SEND_QUANTUM_S = 0.002  # seconds of pacing rate released as one burst
MAX_SEND_QUANTUM = 64 * 1024  # bytes
INITIAL_CWND_PACKETS = 32
INITIAL_RTT_S = 0.100  # before the first RTT sample
# loss_tolerant: the random loss rate is averaged over batches of this many draining-phase packets ...
RANDOM_LOSS_BATCH = 64
RANDOM_LOSS_EWMA = 0.25  # ... with this weight for the newest batch
MAX_RANDOM_LOSS = 0.5
# A gain cycle of PROBE_BW whose losses exceed the random loss by this much (or by three standard
# errors of its loss rate, if more), over at least this many packets, sent faster than the path takes.
OVERSHOOT_EXCESS = 0.02
OVERSHOOT_MIN_PACKETS = 64
BW_CEILING_ROUNDS = 2 * len(PACING_GAIN_CYCLE)  # how long an overshoot caps the estimate
STARTUP_OVERSHOOT_LOSS = 0.3  # a start-up round losing more than this share ends start-up
# An overshoot whose window's RTT samples averaged at most this multiple of RTprop had no queue to
# overflow: a policer. The sender then paces at the rate the window delivered, without probing,
# for this many rounds after the last such overshoot.
POLICER_RTT_RATIO = 1.25
POLICED_ROUNDS = 48
# ... a little below that rate, so that the policer's bucket fills again rather than running dry
POLICED_PACING_MARGIN = 0.99
# The mode's first window is short: it only has to measure the policer's rate with its bucket empty.
POLICED_FIRST_WINDOW = 2
# ... and the mode begins only if the overshoot lost this many times more than the packets sent
# below the estimate did, over the last LOSS_HISTORY_PACKETS or so: a policer drops nothing of those,
# a bursty path as much as of the rest, but in runs that a short sample of it may miss.
POLICER_LOSS_FACTOR = 3.0
LOSS_HISTORY_PACKETS = 4096
_INF = float("inf")
_START_PHASES = tuple(i for i, g in enumerate(PACING_GAIN_CYCLE) if g >= 1.0)


class BbrState(Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"
    PROBE_RTT = "probe_rtt"


@dataclass(slots=True)
class SentState:
    """What a packet remembers from its send time, for the delivery-rate sample of its ack."""

    size: int
    sent_time: float
    delivered: int
    delivered_time: float
    first_sent_time: float
    is_app_limited: bool
    draining: bool = False  # sent in PROBE_BW's gain < 1 phase (it samples the random loss rate)
    sent_total: int = 0  # bytes sent so far, this packet included
    first_sent_total: int = 0  # bytes sent so far when the sample's send interval began


class _MaxFilter:
    """Windowed maximum over the last `window` rounds (monotonic deque of (round, value))."""

    __slots__ = ("_samples", "_window")

    def __init__(self, window: int) -> None:
        self._window = window
        self._samples: deque[tuple[int, float]] = deque()

    def update(self, value: float, round_count: int) -> None:
        samples = self._samples
        while samples and samples[-1][1] <= value:
            samples.pop()
        samples.append((round_count, value))
        while samples[0][0] <= round_count - self._window:
            samples.popleft()

    def expire(self, round_count: int) -> None:
        samples = self._samples
        while len(samples) > 1 and samples[0][0] <= round_count - self._window:
            samples.popleft()

    def reset(self, value: float, round_count: int) -> None:
        self._samples.clear()
        self._samples.append((round_count, value))

    @property
    def best(self) -> float:
        return self._samples[0][1] if self._samples else 0.0


class Bbr:
    """One connection's BBR state."""

    def __init__(self, *, mss: int = 1200, now: float = 0.0, loss_conservation: bool = False,
                 loss_tolerant: bool = True, initial_cwnd_packets: int = INITIAL_CWND_PACKETS,
                 rng: random.Random | None = None) -> None:
        self.mss = mss
        self.loss_conservation = loss_conservation
        self.loss_tolerant = loss_tolerant
        self._rng = rng if rng is not None else random.Random()
        self.state = BbrState.STARTUP
        self.pacing_gain = HIGH_GAIN
        self.cwnd_gain = HIGH_GAIN
        self.initial_cwnd = initial_cwnd_packets * mss
        self.cwnd = self.initial_cwnd
        self.bytes_in_flight = 0
        self.pacing_rate = HIGH_GAIN * self.initial_cwnd / INITIAL_RTT_S
        self._btlbw = _MaxFilter(BTLBW_FILTER_ROUNDS)
        self.btlbw = 0.0  # bottleneck bandwidth estimate, bytes per second (the filter's best)
        self.rtprop = float("inf")
        self._rtprop_stamp = now
        self._rtprop_expired = False
        # delivery-rate estimation
        self.delivered = 0
        self._delivered_time = now
        self._first_sent_time = now
        self.sent_total = 0
        self._first_sent_total = 0
        self._app_limited_until = 0  # 0: not app-limited; else the `delivered` mark that ends it
        # rounds
        self.round_count = 0
        self._next_round_delivered = 0
        self._round_start = False
        # startup exit
        self.filled_pipe = False
        self._full_bw = 0.0
        self._full_bw_count = 0
        # probe_bw
        self._cycle_index = 0
        self._cycle_stamp = now
        self._losses_in_round = False
        # probe_rtt
        self._probe_rtt_done_stamp: float | None = None
        self._probe_rtt_round_done = False
        self._prior_cwnd = 0
        # loss recovery (only with loss_conservation)
        self._in_recovery = False
        self._recovery_end_delivered = 0
        # statistics
        self.packets_sent = 0
        self.lost_packets = 0
        self.lost_bytes = 0
        # loss_tolerant
        self.random_loss = 0.0
        self.overshoots = 0  # rounds that lost far more than the random loss (see _check_overshoot)
        self._bw_ceiling = 0.0
        self._bw_ceiling_until = 0  # round count
        self._window_acked = 0  # packets acked and lost since the overshoot check's window began
        self._window_lost = 0
        self._window_rounds = 0
        self._window_start_time = now
        self._window_start_delivered = 0
        self._batch_acked = 0
        self._batch_lost = 0
        self._random_loss_known = False
        # Packets sent below the estimated rate (the draining phase, and the policer's mode when it
        # proves wrong) and how many of them were lost, over the last few thousand.
        self._history_lost = 0
        self._history_total = 0
        self._window_rtt_sum = 0.0  # RTT samples since the overshoot check's window began
        self._window_rtt_count = 0
        # policer mode (see _check_overshoot)
        self.policed = False
        self.policer_detections = 0
        self._policed_bw = 0.0
        self._policed_lossy = False  # the mode's last window lost more than the random loss
        self._policed_checked = False  # a window of the mode was judged
        self._policed_until = 0  # round count
        self._policer_watch_until = 0  # round count

    # ---- model ----------------------------------------------------------------------------------

    def bdp(self, gain: float = 1.0) -> float:
        if self.rtprop == float("inf") or self.btlbw == 0.0:
            return float(self.initial_cwnd)
        return gain * self.btlbw * self.rtprop

    def _target_cwnd(self, gain: float) -> int:
        # Three send quanta on top, so that delayed and stretched ACKs do not starve the pipe.
        return int(self.bdp(gain)) + 3 * self.send_quantum()

    def send_quantum(self) -> int:
        """What the pacer releases at once: about 2 ms at the pacing rate (it wakes per ~1 ms of
        credit, bursts capped at 2 ms), between 2 packets and 64 KB. On a fast path with a tiny RTT
        (two nodes on one LAN) one packet would cap the window far below the rate: an event loop
        delivers ACKs in batches, late by more than the whole RTT."""
        return int(min(max(self.pacing_rate * SEND_QUANTUM_S, 2 * self.mss), MAX_SEND_QUANTUM))

    # ---- events ---------------------------------------------------------------------------------

    def on_send(self, now: float, size: int) -> SentState:
        if self.bytes_in_flight == 0:
            self._first_sent_time = now
            self._delivered_time = now
            self._first_sent_total = self.sent_total
        self.bytes_in_flight += size
        self.sent_total += size
        self.packets_sent += 1
        return SentState(size, now, self.delivered, self._delivered_time, self._first_sent_time,
                         self._app_limited_until != 0,
                         self.state is BbrState.PROBE_BW and self.pacing_gain < 1.0,
                         self.sent_total, self._first_sent_total)

    def on_app_limited(self) -> None:
        """The sender had nothing more to send although the window and the pacer allowed it."""
        self._app_limited_until = (self.delivered + self.bytes_in_flight) or 1

    def on_ack(self, now: float, packet: SentState, rtt: float | None = None) -> None:
        """One packet acknowledged; `rtt` is an RTT sample taken with this acknowledgement, if any.

        This runs for every packet acknowledged, so the checks that only matter at a round start or in
        one state are skipped outside it."""
        size = packet.size
        inflight = self.bytes_in_flight - size
        self.bytes_in_flight = inflight if inflight > 0 else 0
        delivered = self.delivered + size
        self.delivered = delivered
        self._delivered_time = now
        if self._app_limited_until and delivered > self._app_limited_until:
            self._app_limited_until = 0
        # the rate sample carried by this packet
        send_elapsed = packet.sent_time - packet.first_sent_time
        ack_elapsed = now - packet.delivered_time
        self._first_sent_time = packet.sent_time
        self._first_sent_total = packet.sent_total
        interval = send_elapsed if send_elapsed > ack_elapsed else ack_elapsed
        rate = 0.0
        if interval > 0.0 and (interval >= self.rtprop or self.rtprop == _INF):
            rate = (delivered - packet.delivered) / interval
            if self.loss_tolerant and self.random_loss > 0.0 and send_elapsed > 0.0:
                # What passed the bottleneck, lost after it included, but never more than was sent.
                sent_rate = (packet.sent_total - packet.first_sent_total) / send_elapsed
                compensated = rate / (1.0 - self.random_loss)
                rate = max(rate, min(compensated, sent_rate))
        if packet.draining:
            self._count_random_loss(lost=False)
        # round counting
        round_start = packet.delivered >= self._next_round_delivered
        self._round_start = round_start
        self._window_acked += 1
        if round_start:
            self._next_round_delivered = delivered
            self.round_count += 1
            if self._check_overshoot(now):
                rate = 0.0  # this packet's sample is part of the round just judged
            elif self.policed and self.round_count >= self._policed_until:
                self._end_policed(now)
        if rate > 0.0 and (rate >= self.btlbw or not packet.is_app_limited):
            self._btlbw.update(rate, self.round_count)
            self._set_btlbw()
        elif round_start:
            self._btlbw.expire(self.round_count)
            self._set_btlbw()
        if self._in_recovery and delivered >= self._recovery_end_delivered:
            self._in_recovery = False
            self.cwnd = max(self.cwnd, self._prior_cwnd)
        # RTprop
        self._rtprop_expired = now > self._rtprop_stamp + RTPROP_FILTER_S
        if rtt is not None and rtt > 0.0:
            self._window_rtt_sum += rtt
            self._window_rtt_count += 1
            if rtt <= self.rtprop or self._rtprop_expired:
                self.rtprop = rtt
                self._rtprop_stamp = now
        state = self.state
        if state is BbrState.PROBE_BW:
            self._check_cycle_phase(now, size)
        elif state is not BbrState.PROBE_RTT:
            if round_start:
                self._check_full_pipe(packet.is_app_limited)
            self._check_drain(now)
        if self._rtprop_expired or self.state is BbrState.PROBE_RTT:
            self._check_probe_rtt(now)
        self._set_pacing_rate()
        self._set_cwnd(size)
        if round_start:
            self._losses_in_round = False

    def _check_overshoot(self, now: float) -> bool:
        """At a round's end in start-up, or at the end of a gain cycle's worth of rounds after it:
        did it lose far more than the random loss? Then it was sent faster than the path takes (a
        policer, an overflowing queue), and what it delivered is what the path takes. A whole cycle
        is judged at once so that burst loss, which comes in runs, averages out as it does on the
        path, and so that a policer's bucket does not make its rate look higher than it is."""
        self._window_rounds += 1
        startup = self.state is BbrState.STARTUP
        # Right after a policer's mode each round is judged: probing past its rate loses at once.
        watching = self._policer_watch_until > self.round_count and not self.policed
        if startup or watching:
            length = 1
        elif self.policed and not self._policed_checked:
            length = POLICED_FIRST_WINDOW
        else:
            length = len(PACING_GAIN_CYCLE)
        if self._window_rounds < length:
            return False
        acked, lost = self._window_acked, self._window_lost
        elapsed = now - self._window_start_time
        delivered = self.delivered - self._window_start_delivered
        rtt_sum, rtt_count = self._window_rtt_sum, self._window_rtt_count
        self._reset_window(now)
        total = acked + lost
        if not self.loss_tolerant or total < OVERSHOOT_MIN_PACKETS or elapsed <= 0.0:
            return False
        if startup:
            # No random loss measured yet: only a loss no random path of interest has ends start-up
            # (a policer far below the rate start-up reached).
            if lost / total <= STARTUP_OVERSHOOT_LOSS:
                return False
            self.filled_pipe = True
        elif self.state is not BbrState.PROBE_BW or not (self._random_loss_known or self.policed):
            return False
        p = self.random_loss
        margin = max(OVERSHOOT_EXCESS, 3.0 * (p * (1.0 - p) / total) ** 0.5)
        loss = lost / total
        rate = delivered / elapsed / (1.0 - p)
        if self.policed:
            return self._check_policed(now, lost, total, rate, margin)
        if loss <= p + margin:
            return False
        self.overshoots += 1
        self._btlbw.reset(rate, self.round_count)
        self._bw_ceiling = rate
        self._bw_ceiling_until = self.round_count + BW_CEILING_ROUNDS
        if (not startup and rtt_count and rtt_sum / rtt_count <= POLICER_RTT_RATIO * self.rtprop
                and loss > POLICER_LOSS_FACTOR * self._history_lost / max(1, self._history_total) + margin):
            self._enter_policed(rate)
        self._set_btlbw()
        return True

    def _reset_window(self, now: float) -> None:
        self._window_acked = self._window_lost = self._window_rounds = 0
        self._window_start_time = now
        self._window_start_delivered = self.delivered
        self._window_rtt_sum = 0.0
        self._window_rtt_count = 0

    def _enter_policed(self, bw: float) -> None:
        """Loss far above the random loss with no queue behind it: perhaps a policer, which passes its
        rate and drops the rest at once. Probing above that rate only loses, and the policer's bucket
        makes a probe look like a success (it passes a burst at the higher rate), so the sender paces
        at what the window delivered, gain 1, until POLICED_ROUNDS pass without another overshoot.
        Each window of that mode is checked (_check_policed): it tells a policer from loss that only
        looked excessive because the random loss estimate was low."""
        if not self.policed:
            self.policer_detections += 1
        self.policed = True
        self._policed_bw = bw
        self._policed_lossy = False
        self._policed_checked = False
        self._policed_until = self.round_count + POLICED_ROUNDS
        self.pacing_gain = 1.0

    def _check_policed(self, now: float, lost: int, total: int, rate: float, margin: float) -> bool:
        """A window of the policer's mode. Behind a policer, pacing at what a lossy window delivered
        leaves only the random loss: that window's losses all came when the bucket was empty, so its
        delivery rate is the policer's (the overshoot's window, which began with a full bucket, may
        have counted the bucket as rate, and the first window of the mode still sees losses of what
        was sent before it). So a lossy window sets the rate to what it delivered, and only a second
        lossy window in a row, paced at what the first one delivered, shows that the loss is the
        path's own: it becomes the random loss estimate, and the mode ends."""
        first = not self._policed_checked
        self._policed_checked = True
        loss = lost / total
        if loss <= self.random_loss + margin:
            self._policed_lossy = False
            return False
        if first or not self._policed_lossy:
            self._policed_lossy = True
            self.overshoots += 1
            self._policed_bw = rate
            self._policed_until = self.round_count + POLICED_ROUNDS
            self._set_btlbw()
            return True
        self.random_loss = min(loss, MAX_RANDOM_LOSS)
        self._random_loss_known = True
        self._note_loss_history(lost, total)
        self._end_policed(now, watch=False)
        return False

    def _end_policed(self, now: float, *, watch: bool = True) -> None:
        # The filter starts from the policed rate: samples from before the mode would otherwise send
        # at the rate that lost.
        self.policed = False
        if watch:
            self._policer_watch_until = self.round_count + POLICED_ROUNDS
        self._btlbw.reset(self._policed_bw, self.round_count)
        self._enter_probe_bw(now)
        self._set_btlbw()

    def _set_btlbw(self) -> None:
        # Behind a policer with a bucket, delivery-rate samples overshoot its rate whenever the
        # bucket had filled; the max filter would keep them and send into drops again within a
        # few rounds. So what an overshoot measured caps the estimate until a while without one.
        if self.policed:
            self.btlbw = self._policed_bw
            return
        best = self._btlbw.best
        if self._bw_ceiling_until > self.round_count and best > self._bw_ceiling:
            best = self._bw_ceiling
        self.btlbw = best

    def on_loss(self, now: float, packets: list[SentState]) -> None:
        lost = 0
        for p in packets:
            lost += p.size
        self.bytes_in_flight = max(0, self.bytes_in_flight - lost)
        self.lost_packets += len(packets)
        self.lost_bytes += lost
        self._window_lost += len(packets)
        for p in packets:
            if p.draining:
                self._count_random_loss(lost=True)
        self._losses_in_round = True
        if self.loss_conservation and lost:
            if not self._in_recovery:
                self._in_recovery = True
                self._prior_cwnd = self._save_cwnd()
                self._recovery_end_delivered = self.delivered + self.bytes_in_flight
                self.cwnd = self.bytes_in_flight + self.mss
            else:
                self.cwnd = max(self.cwnd - lost, self.mss)

    def _count_random_loss(self, *, lost: bool) -> None:
        if lost:
            self._batch_lost += 1
        else:
            self._batch_acked += 1
        total = self._batch_acked + self._batch_lost
        if total < RANDOM_LOSS_BATCH:
            return
        sample = min(self._batch_lost / total, MAX_RANDOM_LOSS)
        self._note_loss_history(self._batch_lost, total)
        if self._random_loss_known:
            self.random_loss += RANDOM_LOSS_EWMA * (sample - self.random_loss)
        else:
            self.random_loss = sample
            self._random_loss_known = True
        self._batch_acked = self._batch_lost = 0

    def _note_loss_history(self, lost: int, total: int) -> None:
        self._history_lost += lost
        self._history_total += total
        if self._history_total > LOSS_HISTORY_PACKETS:
            self._history_lost //= 2
            self._history_total //= 2

    def on_forget(self, packets: list[SentState]) -> None:
        """Packets that left the books without being acknowledged or lost (a discarded packet space)."""
        for p in packets:
            self.bytes_in_flight = max(0, self.bytes_in_flight - p.size)

    def on_persistent_congestion(self) -> None:
        """Every packet over a long stretch was lost: start again from a small window, keep the model."""
        self._prior_cwnd = self._save_cwnd()
        self.cwnd = MIN_PIPE_PACKETS * self.mss

    # ---- the state machine (section names of the draft) -------------------------------------------

    def seed(self, value: int) -> None:
        """Fix the random start phase of PROBE_BW (reproducible models); each controller otherwise
        draws its own, so that flows started together do not probe in step."""
        self._rng = random.Random(value)

    def _enter_probe_bw(self, now: float) -> None:
        self.state = BbrState.PROBE_BW
        self.cwnd_gain = CWND_GAIN
        # any phase but the draining one, so that a new flow does not start by slowing down
        self._cycle_index = self._rng.choice(_START_PHASES)
        self.pacing_gain = 1.0 if self.policed else PACING_GAIN_CYCLE[self._cycle_index]
        self._cycle_stamp = now

    def _check_cycle_phase(self, now: float, acked: int) -> None:
        if self.state is not BbrState.PROBE_BW or self.policed:
            return
        full_length = now - self._cycle_stamp > self.rtprop
        prior_inflight = self.bytes_in_flight + acked
        gain = self.pacing_gain
        if gain == 1.0:
            advance = full_length
        elif gain > 1.0:
            advance = full_length and (self._losses_in_round or prior_inflight >= self.bdp(gain))
        else:
            advance = full_length or prior_inflight <= self.bdp()
        if advance:
            self._cycle_index = (self._cycle_index + 1) % len(PACING_GAIN_CYCLE)
            self._cycle_stamp = now
            self.pacing_gain = PACING_GAIN_CYCLE[self._cycle_index]

    def _check_full_pipe(self, app_limited: bool) -> None:
        if self.filled_pipe or not self._round_start or app_limited:
            return
        if self.btlbw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw = self.btlbw
            self._full_bw_count = 0
            return
        self._full_bw_count += 1
        if self._full_bw_count >= FULL_BW_ROUNDS:
            self.filled_pipe = True

    def _check_drain(self, now: float) -> None:
        if self.state is BbrState.STARTUP and self.filled_pipe:
            self.state = BbrState.DRAIN
            self.pacing_gain = DRAIN_GAIN
            self.cwnd_gain = HIGH_GAIN
        if self.state is BbrState.DRAIN and self.bytes_in_flight <= self.bdp():
            self._enter_probe_bw(now)
            # What start-up sent too fast is resolved by now: the overshoot check starts afresh.
            self._reset_window(now)

    def _check_probe_rtt(self, now: float) -> None:
        if self.state is not BbrState.PROBE_RTT and self._rtprop_expired:
            self.state = BbrState.PROBE_RTT
            self.pacing_gain = 1.0
            self.cwnd_gain = 1.0
            self._prior_cwnd = self._save_cwnd()
            self._probe_rtt_done_stamp = None
        if self.state is BbrState.PROBE_RTT:
            self._handle_probe_rtt(now)

    def _handle_probe_rtt(self, now: float) -> None:
        if self._probe_rtt_done_stamp is None and self.bytes_in_flight <= MIN_PIPE_PACKETS * self.mss:
            self._probe_rtt_done_stamp = now + PROBE_RTT_DURATION_S
            self._probe_rtt_round_done = False
            self._next_round_delivered = self.delivered
        elif self._probe_rtt_done_stamp is not None:
            if self._round_start:
                self._probe_rtt_round_done = True
            if self._probe_rtt_round_done and now > self._probe_rtt_done_stamp:
                self._rtprop_stamp = now
                self._rtprop_expired = False
                self.cwnd = max(self.cwnd, self._prior_cwnd)
                if self.filled_pipe:
                    self._enter_probe_bw(now)
                else:
                    self.state = BbrState.STARTUP
                    self.pacing_gain = HIGH_GAIN
                    self.cwnd_gain = HIGH_GAIN

    def _save_cwnd(self) -> int:
        if not self._in_recovery and self.state is not BbrState.PROBE_RTT:
            return self.cwnd
        return max(self._prior_cwnd, self.cwnd)

    def _set_pacing_rate(self) -> None:
        if self.btlbw == 0.0:
            return
        rate = self.pacing_gain * self.btlbw
        if self.policed:
            rate *= POLICED_PACING_MARGIN
        if self.filled_pipe or rate > self.pacing_rate:
            self.pacing_rate = rate

    def _set_cwnd(self, acked: int) -> None:
        target = self._target_cwnd(self.cwnd_gain)
        if self._in_recovery:
            self.cwnd = max(self.cwnd, self.bytes_in_flight + acked)
        elif self.filled_pipe:
            self.cwnd = min(self.cwnd + acked, target)
        elif self.cwnd < target or self.delivered < self.initial_cwnd:
            self.cwnd += acked
        self.cwnd = max(self.cwnd, MIN_PIPE_PACKETS * self.mss)
        if self.state is BbrState.PROBE_RTT:
            self.cwnd = min(self.cwnd, MIN_PIPE_PACKETS * self.mss)
