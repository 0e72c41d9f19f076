"""The `--proxy-transport auto` rule on path metrics recorded from PeerConn's real estimators: a
seeded ping/pong sequence (loss, round trip) goes through PeerConn, and each second a new connection
asks the chooser with what PeerConn then reports."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from pytier.peers.peer_conn import PING_INTERVAL_S, PeerConn
from pytier.proxy.choice import (
    CLEAN_ENTER_LOSS,
    MIN_SAMPLES,
    REENTER_HOLD_S,
    AutoChooser,
    PathMetrics,
    choose,
    link_metrics,
)
from pytier.proxy.entries import TransportType

Tcp, Kcp, Quic = TransportType.Tcp, TransportType.Kcp, TransportType.Quic


class _NoTunnel:
    """PeerConn only keeps its tunnel; pings are made and answered here without one."""


def recorded(phases: Sequence[tuple[float, float, float]], *, interval: float = PING_INTERVAL_S,
             seed: int = 7) -> list[PathMetrics]:
    """(seconds, round-trip loss share, rtt ms) per phase -> the metrics a connection starting each
    second would have seen."""
    rng = random.Random(seed)
    conn = PeerConn(_NoTunnel(), 1, 2, "net")  # type: ignore[arg-type]
    conn.connected_at = 0.0
    out: list[PathMetrics] = []
    t = 0.0
    in_flight: list[tuple[float, bytes]] = []
    next_report = 1.0
    for seconds, loss, rtt_ms in phases:
        end = t + seconds
        while t < end:
            ping = conn.make_ping(t)
            if rng.random() >= loss:
                in_flight.append((t + rtt_ms / 1000, ping[-4:]))
            t += interval
            for due, seq in [f for f in in_flight if f[0] <= t]:
                conn.on_pong(seq, due)
                in_flight.remove((due, seq))
            if t >= next_report:
                next_report += 1.0
                out.append(link_metrics(window_loss=conn.loss_rate, smoothed_loss=conn.smoothed_loss,
                                        rtt_s=conn.rtt_s, up_s=t, ping_interval_s=interval,
                                        accepts_kcp=True, accepts_quic=True))
    return out


def run(series: Sequence[PathMetrics]) -> list[TransportType]:
    chooser = AutoChooser()
    # One connection a second.
    return [chooser.choose(9, m, float(t)).transport for t, m in enumerate(series)]


def switches(choices: Sequence[TransportType]) -> int:
    return sum(1 for a, b in itertools.pairwise(choices) if a != b)


def test_clean_short_path_goes_plain_once_a_full_window_says_so() -> None:
    choices = run(recorded([(90, 0.0, 1.0)]))
    first_tcp = choices.index(Tcp)
    # Until 32 pings have answered, the path is unproven and goes through KCP.
    assert set(choices[:first_tcp]) == {Kcp}
    assert MIN_SAMPLES <= first_tcp <= MIN_SAMPLES + 3
    assert set(choices[first_tcp:]) == {Tcp}


def test_ten_percent_random_loss_never_goes_plain() -> None:
    series = recorded([(120, 0.19, 1.0)])  # 10 % each way
    assert set(run(series)) == {Kcp}
    assert series[-1].loss > 0.1


def test_long_clean_path_is_proxied() -> None:
    series = recorded([(90, 0.0, 200.0)])
    assert set(run(series)) == {Kcp}
    assert "long path" in choose(series[-1]).reason


def test_loss_arriving_moves_new_connections_to_kcp_and_back_after_it_clears() -> None:
    series = recorded([(60, 0.0, 1.0), (40, 0.19, 1.0), (260, 0.0, 1.0)])
    choices = run(series)
    assert choices[50:60] == [Tcp] * 10
    # The first lost ping is counted 2 s after it left; 10 % each way loses one in five.
    assert Kcp in choices[60:75]
    # Back only after both estimates have forgotten the loss (the smoothed one, made for 10 pings a
    # second, needs about 2 min at one a second) and the path then stayed clean for the hold.
    assert set(choices[75:100 + MIN_SAMPLES + int(REENTER_HOLD_S) - 5]) == {Kcp}
    assert choices[-1] == Tcp
    assert switches(choices) == 3  # Kcp (unmeasured) -> Tcp -> Kcp -> Tcp


def test_faster_pings_prove_a_clean_path_sooner() -> None:
    # --latency-first pings every 0.1 s: a full window of clean pings after about 5 s.
    choices = run(recorded([(20, 0.0, 1.0)], interval=0.1))
    assert choices.index(Tcp) <= 6
    assert set(choices[6:]) == {Tcp}


@pytest.mark.parametrize("seed", range(5))
def test_loss_hovering_at_the_threshold_does_not_flap(seed: int) -> None:
    rng = random.Random(seed)
    series = [PathMetrics(loss=CLEAN_ENTER_LOSS * rng.uniform(0.2, 2.5), rtt_ms=rng.uniform(14, 26),
                          samples=MIN_SAMPLES, accepts_kcp=True, accepts_quic=True) for _ in range(300)]
    choices = run(series)
    assert switches(choices) <= 1
    # The smoothed estimate of a slightly lossy link (0.2-2 % round trip at 10 pings/s) also holds.
    assert switches(run(recorded([(200, 0.006, 18.0)], interval=0.1, seed=seed))) <= 2


def test_what_the_destination_takes_bounds_the_choice() -> None:
    lossy = PathMetrics(loss=0.1, rtt_ms=40.0, samples=MIN_SAMPLES, accepts_kcp=False, accepts_quic=True)
    assert choose(lossy).transport is Quic
    assert choose(lossy).reason == "auto: 10.0% loss, 40 ms: quic (lossy path; destination takes no KCP)"
    neither = PathMetrics(loss=0.1, rtt_ms=40.0, samples=MIN_SAMPLES, accepts_kcp=False, accepts_quic=False)
    assert choose(neither) == choose(neither, Kcp)
    assert choose(neither).transport is Tcp
    clean = PathMetrics(loss=0.0, rtt_ms=0.6, samples=MIN_SAMPLES, accepts_kcp=True, accepts_quic=True)
    assert choose(clean).reason == "auto: 0.0% loss, 0.6 ms: tcp (clean short path)"
    fresh = PathMetrics(loss=0.0, rtt_ms=None, samples=0, accepts_kcp=True, accepts_quic=True)
    assert choose(fresh).reason == "auto: 0.0% loss, ? ms: kcp (not measured yet, 0 of 32 pings)"
