"""The `--proxy-transport auto` rule on path metrics recorded from PeerConn's real estimators: a
seeded ping/pong sequence (loss, round trip) goes through PeerConn, and each second a new connection
asks the chooser with what PeerConn then reports; and the rule against the path-scenario table it
was drawn from."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import replace

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


BULK, SSH = 5201, 22


def run(series: Sequence[PathMetrics], port: int | None = BULK) -> list[TransportType]:
    chooser = AutoChooser()
    # One connection a second.
    return [chooser.choose(9, m, float(t), port).transport for t, m in enumerate(series)]


def switches(choices: Sequence[TransportType]) -> int:
    return sum(1 for a, b in itertools.pairwise(choices) if a != b)


def test_clean_short_path_goes_plain_once_a_full_window_says_so() -> None:
    choices = run(recorded([(90, 0.0, 1.0)]))
    first_tcp = choices.index(Tcp)
    # Until 32 pings have answered, the path is unproven and goes through a proxy: QUIC for bulk.
    assert set(choices[:first_tcp]) == {Quic}
    assert MIN_SAMPLES <= first_tcp <= MIN_SAMPLES + 3
    assert set(choices[first_tcp:]) == {Tcp}


def test_ten_percent_random_loss_never_goes_plain() -> None:
    series = recorded([(120, 0.19, 1.0)])  # 10 % each way
    assert set(run(series)) == {Quic}
    assert set(run(series, SSH)) == {Kcp}
    assert series[-1].loss > 0.1


def test_long_clean_path_is_proxied() -> None:
    series = recorded([(90, 0.0, 200.0)])
    assert set(run(series)) == {Quic}
    assert set(run(series, SSH)) == {Kcp}
    assert "long path" in choose(series[-1]).reason


def test_loss_arriving_moves_new_connections_to_kcp_and_back_after_it_clears() -> None:
    series = recorded([(60, 0.0, 1.0), (40, 0.19, 1.0), (260, 0.0, 1.0)])
    for port, proxied in ((BULK, Quic), (SSH, Kcp)):
        choices = run(series, port)
        assert choices[50:60] == [Tcp] * 10
        # The first lost ping is counted 2 s after it left; 10 % each way loses one in five.
        assert proxied in choices[60:75]
        # Back only after both estimates have forgotten the loss (the smoothed one, made for 10
        # pings a second, needs about 2 min at one a second) and the path then stayed clean for the
        # hold.
        assert set(choices[75:100 + MIN_SAMPLES + int(REENTER_HOLD_S) - 5]) == {proxied}
        assert choices[-1] == Tcp
        assert switches(choices) == 3  # proxied (unmeasured) -> Tcp -> proxied -> Tcp


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
    assert switches(run(series, SSH)) <= 1
    # The smoothed estimate of a slightly lossy link (0.2-2 % round trip at 10 pings/s) also holds.
    assert switches(run(recorded([(200, 0.006, 18.0)], interval=0.1, seed=seed))) <= 2


def test_what_the_destination_takes_bounds_the_choice() -> None:
    lossy = PathMetrics(loss=0.1, rtt_ms=40.0, samples=MIN_SAMPLES, accepts_kcp=False, accepts_quic=True)
    assert choose(lossy, port=SSH).transport is Quic
    lossy_40 = "auto: 10.0% loss, 40 ms"
    assert choose(lossy, port=SSH).reason == f"{lossy_40}: quic (lossy path; destination takes no KCP)"
    kcp_only = replace(lossy, accepts_kcp=True, accepts_quic=False)
    assert choose(kcp_only, port=BULK).reason == f"{lossy_40}: kcp (lossy path; destination takes no QUIC)"
    both = replace(lossy, accepts_kcp=True)
    assert choose(both, port=BULK).reason == f"{lossy_40}: quic (lossy path; bulk)"
    assert choose(both).transport is Quic  # an unknown port counts as bulk
    assert choose(both, port=SSH).reason == f"{lossy_40}: kcp (lossy path; interactive port 22)"
    neither = PathMetrics(loss=0.1, rtt_ms=40.0, samples=MIN_SAMPLES, accepts_kcp=False, accepts_quic=False)
    assert choose(neither) == choose(neither, Kcp)
    assert choose(neither).transport is Tcp
    clean = PathMetrics(loss=0.0, rtt_ms=0.6, samples=MIN_SAMPLES, accepts_kcp=True, accepts_quic=True)
    assert choose(clean).reason == "auto: 0.0% loss, 0.6 ms: tcp (clean short path)"
    fresh = PathMetrics(loss=0.0, rtt_ms=None, samples=0, accepts_kcp=True, accepts_quic=True)
    assert choose(fresh).reason == "auto: 0.0% loss, ? ms: quic (not measured yet, 0 of 32 pings; bulk)"


# Goodput Mbit/s of one iperf3 flow per fixed transport in bench/path_scenarios.py (README, "Real
# paths", pytier d8cd139), with each scenario's round-trip ping loss (1 - (1 - p)^2 for p each way;
# pings a second apart see burst loss as independent) and round trip. The policer drops only what
# exceeds 30 Mbit/s, which idle pings never do.
SCENARIO_TABLE = {
    # scenario: (ping loss, rtt ms, {transport: Mbit/s})
    "policed": (0.0, 40.0, {Kcp: 25.8, Quic: 27.2}),
    "bursty": (0.0975, 40.0, {Kcp: 82.5, Quic: 87.2}),
    "long": (0.0975, 200.0, {Kcp: 63.5, Quic: 71.9}),
    "reorder": (0.0199, 40.0, {Kcp: 85.2, Quic: 88.3}),
    "loss-change": (0.19, 40.0, {Kcp: 87.8, Quic: 86.7}),
    "random-0": (0.0, 40.0, {Kcp: 86.3, Quic: 90.0}),
    "random-10": (0.19, 40.0, {Kcp: 84.3, Quic: 87.6}),
    "random-20": (0.36, 40.0, {Kcp: 82.0, Quic: 84.3}),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIO_TABLE))
def test_bulk_choice_is_within_5pct_of_the_best_fixed_transport(scenario: str) -> None:
    loss, rtt_ms, mbit = SCENARIO_TABLE[scenario]
    best = max(mbit.values())
    # From the first connection (path not measured yet) to a full ping window.
    series = recorded([(60, loss, rtt_ms)], seed=len(scenario))
    for port in (BULK, 443, 8080, None):
        chosen = set(run(series, port))
        assert all(mbit[t] >= 0.95 * best for t in chosen), (scenario, port, chosen)
    # Latency before bandwidth for an interactive port, whatever the path.
    assert set(run(series, SSH)) == {Kcp}
