"""BBR v1 on synthetic paths: a bottleneck of known rate and RTT, driven in virtual time."""

from __future__ import annotations

import heapq
import itertools
import random

import pytest

from pytier.testbed.path_model import Policer
from pytier.transport.bbr import (
    DRAIN_GAIN,
    HIGH_GAIN,
    MIN_PIPE_PACKETS,
    PACING_GAIN_CYCLE,
    Bbr,
    BbrState,
    SentState,
    _MaxFilter,
)

MSS = 1200


class Path:
    """A sender paced and windowed by `bbr`, a FIFO bottleneck of `rate` bytes/s, a fixed RTT.

    `app_rate`, when set, caps what the application offers (bytes/s): the sender is app-limited.
    `loss` drops packets at random after the bottleneck; they are reported lost one RTT later.
    `policer`, when set, drops at the path's ingress what exceeds its token bucket."""

    def __init__(self, bbr: Bbr, rate: float, rtt: float, *, loss: float = 0.0, seed: int = 1,
                 queue_s: float | None = None, policer: Policer | None = None) -> None:
        self.bbr = bbr
        self.policer = policer
        self.queue_s = queue_s
        self.rate = rate
        self.rtt = rtt
        self.loss = loss
        self.rng = random.Random(seed)
        self.now = 0.0
        self.busy_until = 0.0
        self.next_send = 0.0
        self.acks: list[tuple[float, int, SentState | None, bool]] = []
        self.seq = 0
        self.app_rate: float | None = None
        self.app_credit = 0.0
        self.trace: list[tuple[float, BbrState, float]] = []

    def run(self, until: float) -> None:
        bbr = self.bbr
        while self.now < until:
            can_send = bbr.bytes_in_flight + MSS <= bbr.cwnd
            send_at = max(self.next_send, self.now) if can_send else float("inf")
            ack_at = self.acks[0][0] if self.acks else float("inf")
            t = min(send_at, ack_at, until)
            if self.app_rate is not None:
                self.app_credit = min(self.app_credit + (t - self.now) * self.app_rate, 4 * MSS)
            self.now = t
            if t == until:
                break
            if ack_at <= send_at:
                _, _, state, lost = heapq.heappop(self.acks)
                assert state is not None
                if lost:
                    bbr.on_loss(t, [state])
                else:
                    bbr.on_ack(t, state, t - state.sent_time)
                self.trace.append((t, bbr.state, bbr.pacing_gain))
                continue
            if self.app_rate is not None:
                if self.app_credit < MSS - 1e-3:
                    bbr.on_app_limited()
                    self.next_send = t + (MSS - self.app_credit) / self.app_rate
                    continue
                self.app_credit -= MSS
            state = bbr.on_send(t, MSS)
            self.next_send = t + MSS / bbr.pacing_rate
            lost = self.rng.random() < self.loss
            policed = self.policer is not None and not self.policer.admit(MSS, t)
            if policed or (self.queue_s is not None and self.busy_until - t > self.queue_s):
                # drop-tail: the packet never enters the queue
                self.seq += 1
                heapq.heappush(self.acks, (t + self.rtt, self.seq, state, True))
                continue
            depart = max(t, self.busy_until) + MSS / self.rate
            self.busy_until = depart
            self.seq += 1
            heapq.heappush(self.acks, (depart + self.rtt, self.seq, state, lost))


def steady(rate: float = 10e6, rtt: float = 0.040, **kw: float) -> Path:
    path = Path(Bbr(mss=MSS, now=0.0, rng=random.Random(7)), rate, rtt, **kw)  # type: ignore[arg-type]
    path.run(3.0)
    return path


def test_startup_drain_probe_bw_and_the_model() -> None:
    path = steady()
    bbr = path.bbr
    states = [s for _, s, _ in path.trace]
    first = {s: states.index(s) for s in (BbrState.STARTUP, BbrState.DRAIN, BbrState.PROBE_BW)}
    assert first[BbrState.STARTUP] < first[BbrState.DRAIN] < first[BbrState.PROBE_BW]
    assert bbr.state is BbrState.PROBE_BW and bbr.filled_pipe
    assert 0.9 * 10e6 <= bbr.btlbw <= 1.1 * 10e6
    assert 0.040 <= bbr.rtprop <= 0.042
    bdp = bbr.btlbw * bbr.rtprop
    assert bbr.cwnd <= 2 * bdp + 3 * bbr.send_quantum() + 1
    assert bbr.pacing_rate == pytest.approx(bbr.pacing_gain * bbr.btlbw)
    # The gains of each state.
    gains = {s: {g for _, st, g in path.trace if st is s} for s in (BbrState.STARTUP, BbrState.DRAIN)}
    assert gains[BbrState.STARTUP] == {HIGH_GAIN} and gains[BbrState.DRAIN] == {DRAIN_GAIN}


def test_startup_leaves_after_three_rounds_without_growth() -> None:
    path = steady()
    drain_at = next(t for t, s, _ in path.trace if s is BbrState.DRAIN)
    # From 32 packets, doubling each round, 10 MB/s is reached in ~4 rounds, plus the 3 without growth;
    # the queue STARTUP builds stretches those rounds to up to ~3 x 40 ms.
    assert drain_at < 1.0
    assert path.bbr.round_count > 7


def test_probe_bw_cycles_its_gains_once_per_rtt() -> None:
    path = steady()
    path.trace.clear()
    path.run(5.0)
    gains = [g for _, _, g in path.trace]
    changes = [b for a, b in itertools.pairwise(gains) if a != b]
    assert 1.25 in changes and 0.75 in changes
    # 0.75 always follows 1.25 (the drain right after the probe).
    for i, g in enumerate(changes[:-1]):
        if g == 1.25:
            assert changes[i + 1] == 0.75
    # One 8-phase cycle per ~8 RTTs: 2 s at 40 ms is ~6 cycles (the six 1.0 phases show as one change).
    assert 4 <= changes.count(1.25) <= 8
    assert set(gains) <= set(PACING_GAIN_CYCLE)


def test_probe_rtt_after_ten_seconds_without_a_lower_rtt() -> None:
    path = steady()
    path.rtt = 0.045  # no sample reaches the minimum again
    stamp = path.bbr._rtprop_stamp
    path.run(stamp + 10.5)
    entered = [t for t, s, _ in path.trace if s is BbrState.PROBE_RTT]
    assert entered, "no PROBE_RTT within 10.5 s of the last minimum"
    start, end = entered[0], entered[-1]
    assert stamp + 10.0 <= start <= stamp + 10.5
    path.run(stamp + 12.0)
    entered = [t for t, s, _ in path.trace if s is BbrState.PROBE_RTT]
    assert entered[-1] - entered[0] >= 0.2 - 0.041  # held >= 200 ms once the pipe drained
    assert path.bbr.state is BbrState.PROBE_BW
    assert end >= start


def test_probe_rtt_cwnd_is_four_packets() -> None:
    path = steady()
    samples: list[int] = []
    orig = path.bbr.on_ack

    def watch(now: float, packet: SentState, rtt: float | None = None) -> None:
        orig(now, packet, rtt)
        if path.bbr.state is BbrState.PROBE_RTT:
            samples.append(path.bbr.cwnd)

    path.bbr.on_ack = watch  # type: ignore[method-assign]
    path.rtt = 0.045
    path.run(path.bbr._rtprop_stamp + 10.8)
    assert samples and max(samples) == MIN_PIPE_PACKETS * MSS


def test_app_limited_samples_do_not_lower_the_estimate() -> None:
    path = steady()
    before = path.bbr.btlbw
    path.app_rate = 1e6  # a tenth of the path
    path.run(4.0)  # 25 rounds: longer than the 10-round filter
    assert path.bbr.btlbw >= 0.9 * before


def test_bandwidth_estimate_follows_a_slower_path() -> None:
    path = steady()
    path.rate = 5e6
    path.run(5.0)
    assert path.bbr.btlbw == pytest.approx(5e6, rel=0.15)


@pytest.mark.parametrize("loss", [0.10, 0.20])
def test_random_loss_leaves_the_model_and_rate_alone(loss: float) -> None:
    path = steady(loss=loss)
    path.run(6.0)
    bbr = path.bbr
    assert bbr.lost_packets > 0
    assert bbr.state is BbrState.PROBE_BW
    # Lost bytes count in samples that met no queue: the estimate is the bottleneck, not (1 - loss) x it.
    assert 0.9 * 10e6 <= bbr.btlbw <= 1.15 * 10e6


def test_without_loss_tolerance_random_loss_lowers_the_estimate() -> None:
    path = Path(Bbr(mss=MSS, now=0.0, rng=random.Random(7), loss_tolerant=False), 10e6, 0.040, loss=0.20)
    path.run(6.0)
    assert path.bbr.btlbw < 0.9 * 10e6  # plain BBR v1: only what arrived counts


def test_queue_overflow_does_not_inflate_the_estimate() -> None:
    # A shallow drop-tail queue (5 ms) and no random loss: STARTUP overflows it, and every drop comes
    # with a grown RTT, so the loss-tolerant correction must not count them.
    path = Path(Bbr(mss=MSS, now=0.0, rng=random.Random(7)), 10e6, 0.040, queue_s=0.005)
    path.run(6.0)
    assert path.bbr.lost_packets > 0
    assert path.bbr.btlbw <= 1.1 * 10e6


POLICED_RATE = 3e6  # bytes/s: 24 Mbit/s on the 80 Mbit/s path


def policed_path(loss: float = 0.0) -> Path:
    return Path(Bbr(mss=MSS, now=0.0, rng=random.Random(7)), 10e6, 0.040, loss=loss,
                policer=Policer(POLICED_RATE * 8, 65536))


def sent_and_lost(path: Path, seconds: float) -> tuple[int, int, int]:
    """Packets sent and lost, and bytes delivered, over the next `seconds` of the path."""
    bbr = path.bbr
    before = bbr.packets_sent, bbr.lost_packets, bbr.delivered
    path.run(path.now + seconds)
    return bbr.packets_sent - before[0], bbr.lost_packets - before[1], bbr.delivered - before[2]


def test_behind_a_policer_the_sender_paces_at_its_rate() -> None:
    # The policer drops with no queue, and its 64 KB bucket passes a probe at 1.25 x its rate: plain
    # probing kept 7% of what the QUIC proxy sent dropped there. Start-up's losses are not counted.
    path = policed_path()
    path.run(2.0)
    sent, lost, delivered = sent_and_lost(path, 10.0)
    assert path.bbr.policer_detections >= 1
    assert lost < 0.03 * sent, (lost, sent)
    assert delivered / 10.0 >= 0.95 * POLICED_RATE
    assert path.bbr.btlbw == pytest.approx(POLICED_RATE, rel=0.05)


def test_a_policer_with_random_loss_behind_it() -> None:
    path = policed_path(loss=0.05)
    path.run(2.0)
    sent, lost, delivered = sent_and_lost(path, 10.0)
    assert path.bbr.policer_detections >= 1
    assert lost < 0.05 * sent + 0.03 * sent, (lost, sent)  # the random 5 % and little of our own
    assert delivered / 10.0 >= 0.9 * (1 - 0.05) * POLICED_RATE


def test_the_rate_comes_back_when_the_policer_goes() -> None:
    path = policed_path()
    path.run(6.0)
    assert path.bbr.policer_detections >= 1
    path.policer = None
    path.run(14.0)  # the mode lasts 48 rounds (~2 s), then probing finds the path's rate again
    assert not path.bbr.policed
    assert path.bbr.btlbw >= 0.85 * 10e6


@pytest.mark.parametrize("loss", [0.10, 0.20])
def test_random_loss_is_not_taken_for_a_policer(loss: float) -> None:
    # The packets sent below the estimate lose as much as the rest: no policer (and if a low random
    # loss estimate ever started its mode, pacing at what arrived would not lower the loss, and end it).
    path = steady(loss=loss)
    _sent, _lost, delivered = sent_and_lost(path, 10.0)
    assert path.bbr.policer_detections == 0
    assert delivered / 10.0 >= 0.85 * (1 - loss) * 10e6


def test_a_mistaken_policer_mode_ends() -> None:
    # Forced onto a path with 20 % random loss, with the random loss estimate as low as a mistaken
    # start of the mode implies: pacing at what arrived leaves the loss where it was, so two lossy
    # windows later the mode is over and that loss is the random loss estimate.
    path = steady(loss=0.20)
    path.bbr.random_loss = 0.05
    path.bbr._enter_policed(path.bbr.btlbw)
    path.run(path.now + 1.0)  # ~25 rounds: the first window of 2 rounds, then one of 8
    assert not path.bbr.policed
    assert path.bbr.random_loss == pytest.approx(0.20, abs=0.05)
    _sent, _lost, delivered = sent_and_lost(path, 5.0)
    assert delivered / 5.0 >= 0.85 * (1 - 0.20) * 10e6


def test_loss_conservation_when_asked_for() -> None:
    bbr = Bbr(mss=MSS, now=0.0, loss_conservation=True)
    sent = [bbr.on_send(0.0, MSS) for _ in range(20)]
    bbr.on_loss(0.05, sent[:2])
    assert bbr.cwnd == bbr.bytes_in_flight + MSS  # packet conservation on entering recovery
    for i, s in enumerate(sent[2:]):
        bbr.on_ack(0.06 + i * 0.001, s, 0.06)
    assert bbr.cwnd >= 32 * MSS  # recovery ended: the window before it is back


def test_persistent_congestion_shrinks_then_regrows() -> None:
    path = steady()
    path.bbr.on_persistent_congestion()
    assert path.bbr.cwnd == MIN_PIPE_PACKETS * MSS
    path.run(3.5)
    assert path.bbr.cwnd > 10 * MSS


def test_max_filter_window() -> None:
    f = _MaxFilter(10)
    f.update(5.0, 1)
    f.update(3.0, 2)
    assert f.best == 5.0
    f.update(2.0, 11)  # round 1 is now out of the window
    assert f.best == 3.0
    f.expire(12)
    assert f.best == 2.0
