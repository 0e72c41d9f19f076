"""The path models (burst loss, policer, reordering) alone and inside the virtual-time link model."""

from __future__ import annotations

import random

import pytest

from pytier.testbed import linkem
from pytier.testbed.link_model import DuplexLink, LinkDirection, LinkParams
from pytier.testbed.path_model import GilbertElliott, Policer, Reorderer
from pytier.testbed.scenarios import SCENARIOS

PACKETS = 200_000


def loss_runs(decisions: list[bool]) -> list[int]:
    """Lengths of the runs of consecutive True values."""
    runs: list[int] = []
    current = 0
    for lost in decisions:
        if lost:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize(("enter", "exit_"), [(0.05 * 0.125 / 0.95, 0.125), (0.01, 0.5), (0.02, 0.2)])
def test_gilbert_elliott_matches_the_stationary_loss_and_mean_burst(enter: float, exit_: float) -> None:
    ge = GilbertElliott(enter, exit_, 1.0, random.Random(11))
    decisions = [ge.drop() for _ in range(PACKETS)]
    expected_loss = enter / (enter + exit_)
    assert sum(decisions) / PACKETS == pytest.approx(expected_loss, rel=0.05)
    runs = loss_runs(decisions)
    assert sum(runs) / len(runs) == pytest.approx(1 / exit_, rel=0.05)


def test_gilbert_elliott_partial_loss_in_both_states() -> None:
    enter, exit_, loss_bad, loss_good = 0.02, 0.1, 0.5, 0.01
    ge = GilbertElliott(enter, exit_, loss_bad, random.Random(3), loss_good=loss_good)
    lost = sum(ge.drop() for _ in range(PACKETS))
    bad = enter / (enter + exit_)
    assert lost / PACKETS == pytest.approx(bad * loss_bad + (1 - bad) * loss_good, rel=0.05)


def test_gilbert_elliott_is_seeded_and_starts_good() -> None:
    def run(seed: int) -> list[bool]:
        ge = GilbertElliott(0.1, 0.3, 1.0, random.Random(seed))
        assert not ge.bad
        return [ge.drop() for _ in range(1000)]

    assert run(1) == run(1) and run(1) != run(2)
    never = GilbertElliott(0.0, 1.0, 1.0, random.Random(0))
    assert not any(never.drop() for _ in range(1000))


@pytest.mark.parametrize("bad", [{"enter": -0.1}, {"exit": 1.5}, {"loss_bad": 2.0}, {"loss_good": -1.0}])
def test_gilbert_elliott_refuses_non_probabilities(bad: dict[str, float]) -> None:
    kwargs = {"enter": 0.1, "exit": 0.5, "loss_bad": 1.0, "loss_good": 0.0} | bad
    with pytest.raises(ValueError, match="probability"):
        GilbertElliott(rng=random.Random(0), **kwargs)


def test_policer_passes_rate_times_time_plus_bucket_and_no_more() -> None:
    rate_bps, bucket, size = 8e6, 65536, 1000  # 1 MB/s
    police = Policer(rate_bps, bucket)
    passed = 0
    span = 3.0
    for i in range(int(span * 2000)):  # 2 MB/s offered, twice the rate
        if police.admit(size, i / 2000):
            passed += size
    allowed = rate_bps / 8 * span + bucket
    assert allowed - 2 * size <= passed <= allowed


def test_policer_drops_at_once_and_charges_nothing_for_drops() -> None:
    police = Policer(8e3, 3000)  # 1000 bytes per second, 3000 bytes of burst
    assert [police.admit(1000, 0.0) for _ in range(4)] == [True, True, True, False]
    assert not police.admit(1000, 0.5)  # 500 bytes of tokens: still not enough
    assert police.admit(500, 0.5)  # the refused 1000 took nothing, so these 500 fit
    assert not police.admit(1, 0.5)
    assert police.admit(1000, 1.5)
    assert not police.admit(4000, 100.0)  # larger than the bucket: never
    assert police.admit(3000, 100.0)  # the bucket refilled to full and no further


def test_policer_ignores_a_clock_that_steps_back() -> None:
    police = Policer(8e3, 1000)
    assert police.admit(1000, 10.0)
    assert not police.admit(1, 9.0)
    assert police.admit(500, 10.5)


def test_reorderer_holds_back_the_given_share() -> None:
    r = Reorderer(0.02, 0.01, random.Random(5))
    delays = [r.extra_delay() for _ in range(PACKETS)]
    assert set(delays) == {0.0, 0.01}
    assert delays.count(0.01) / PACKETS == pytest.approx(0.02, rel=0.05)
    assert all(Reorderer(0.0, 0.01, random.Random(0)).extra_delay() == 0.0 for _ in range(100))
    with pytest.raises(ValueError):
        Reorderer(1.5, 0.01, random.Random(0))
    with pytest.raises(ValueError):
        Reorderer(0.5, -1.0, random.Random(0))


# --- inside the link model --------------------------------------------------------------------


def test_link_model_delivers_reordered_packets_in_arrival_order() -> None:
    params = LinkParams(delay_s=0.01, rate_bps=None, reorder=0.1, reorder_delay_s=0.005)
    d: LinkDirection[int] = LinkDirection(params, random.Random(2))
    sent = 5000
    for i in range(sent):
        assert d.send(i * 0.001, i, 100)
    got: list[int] = []
    arrivals: list[float] = []
    t = 0.0
    while (nxt := d.next_arrival()) is not None:
        t = nxt
        arrivals.append(t)
        got += d.deliver(t)
    assert sorted(got) == list(range(sent))
    assert arrivals == sorted(arrivals)
    # A held-back packet i arrives at i ms + 15 ms, after packets i+1 .. i+4 (unless all of them were
    # held back too, which this seed never does).
    overtaken, highest = 0, -1
    for g in got:
        overtaken += g < highest
        highest = max(highest, g)
    assert overtaken == d.stats.reordered
    assert d.stats.reordered / sent == pytest.approx(0.1, rel=0.15)


def test_link_model_reordered_packet_arrives_extra_delay_later() -> None:
    params = LinkParams(delay_s=0.02, rate_bps=None, reorder=1.0, reorder_delay_s=0.01)
    d: LinkDirection[str] = LinkDirection(params, random.Random(0))
    d.send(0.0, "late", 10)
    d.set_params(LinkParams(delay_s=0.02, rate_bps=None))
    d.send(0.001, "on time", 10)
    assert d.next_arrival() == pytest.approx(0.021)
    assert d.deliver(0.025) == ["on time"]
    assert d.deliver(0.03) == ["late"]


def test_link_model_burst_loss_and_policer_counts() -> None:
    params = LinkParams(
        delay_s=0.0, rate_bps=None, burst_enter=0.05 * 0.125 / 0.95, burst_exit=0.125, burst_loss=1.0
    )
    d: LinkDirection[int] = LinkDirection(params, random.Random(4))
    for i in range(PACKETS):
        d.send(i * 1e-5, i, 100)
    assert d.stats.dropped_burst / PACKETS == pytest.approx(0.05, rel=0.1)
    assert d.stats.dropped_loss == d.stats.dropped_police == 0

    policed: LinkDirection[int] = LinkDirection(
        LinkParams(delay_s=0.0, rate_bps=100e6, police_bps=8e6, police_bucket_bytes=10_000),
        random.Random(0),
    )
    admitted = sum(policed.send(i * 0.0005, i, 1000) for i in range(2000))  # 2 MB/s for 1 s
    assert admitted * 1000 <= 1e6 * 1.0 + 10_000
    assert admitted * 1000 >= 1e6 * 1.0 + 10_000 - 2000
    assert policed.stats.dropped_police == 2000 - admitted


def test_link_model_set_params_keeps_the_queue_and_what_is_in_flight() -> None:
    link: DuplexLink[int] = DuplexLink(LinkParams(delay_s=0.01, rate_bps=8e6, queue_s=1.0, overhead_bytes=0))
    d = link.a_to_b
    for i in range(5):
        d.send(0.0, i, 1000)  # 1 ms each: the link is busy until 5 ms
    link.set_params(LinkParams(delay_s=0.05, rate_bps=8e6, queue_s=1.0, overhead_bytes=0, loss=1.0))
    assert not d.send(0.0, 99, 1000)
    assert d.stats.dropped_loss == 1
    assert d.backlog_s(0.0) == pytest.approx(0.006)  # the lost packet still took its turn on the link
    assert d.deliver(0.02) == [0, 1, 2, 3, 4]  # in flight before the switch: old delay
    assert link.b_to_a.params.loss == 1.0
    link.set_params(LinkParams(delay_s=0.05, rate_bps=8e6, queue_s=1.0, overhead_bytes=0))
    assert d.send(0.0, 5, 1000)
    assert d.next_arrival() == pytest.approx(0.007 + 0.05)


def test_link_model_with_path_models_is_reproducible_from_the_seed() -> None:
    params = LinkParams(
        delay_s=0.01,
        rate_bps=50e6,
        loss=0.01,
        burst_enter=0.01,
        burst_exit=0.2,
        burst_loss=1.0,
        police_bps=30e6,
        reorder=0.05,
        reorder_delay_s=0.003,
    )

    def run(seed: int) -> list[int]:
        link: DuplexLink[int] = DuplexLink(params, seed=seed)
        for i in range(20_000):
            link.a_to_b.send(i * 2e-4, i, 1200)
        return link.a_to_b.deliver(100.0)

    assert run(1) == run(1) and run(1) != run(2)


# --- the named scenarios, for the emulator and for the model ----------------------------------


def same_path(d: linkem.DirParams, m: LinkParams) -> None:
    assert m.delay_s == pytest.approx(d.delay_ms / 1000)
    assert m.loss == pytest.approx(d.loss_pct / 100)
    assert d.rate_mbit is not None and m.rate_bps == pytest.approx(d.rate_mbit * 1e6)
    assert m.queue_s == pytest.approx(d.queue_limit_s())
    assert (m.burst_enter, m.burst_exit, m.burst_loss) == pytest.approx(tuple(v / 100 for v in d.burst))
    assert (m.police_bps is None) == (d.police_mbit is None)
    if d.police_mbit is not None:
        assert m.police_bps == pytest.approx(d.police_mbit * 1e6)
        assert m.police_bucket_bytes == d.police_bucket_bytes
    assert (m.reorder, m.reorder_delay_s) == pytest.approx((d.reorder_pct / 100, d.reorder_ms / 1000))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_emulator_and_model_describe_the_same_path(name: str) -> None:
    s = SCENARIOS[name]
    assert s.name == name and s.title
    assert linkem.LinkParams.from_argv(s.emulator.to_argv()) == s.emulator
    assert len(s.emulator.phases) == len(s.model_phases) == len(s.phase_times_s)
    for n in range(len(s.emulator.phases) + 1):
        ab, ba = s.emulator.phase_params(n)
        assert ab == ba  # every scenario is the same each way
        model = s.model if n == 0 else s.model_phases[n - 1][1]
        same_path(ab, model)
        assert ab.rate_mbit == 100


def test_scenarios_hold_the_benchmark_numbers() -> None:
    assert set(SCENARIOS) == {
        "policed",
        "bursty",
        "long",
        "reorder",
        "random-0",
        "random-10",
        "random-20",
        "loss-change",
    }
    policed = SCENARIOS["policed"].emulator.ab
    assert (policed.police_mbit, policed.police_bucket_bytes, policed.loss_pct) == (30, 65536, 0)
    bursty = SCENARIOS["bursty"].model
    bad = bursty.burst_enter / (bursty.burst_enter + bursty.burst_exit)
    assert bad == pytest.approx(0.05) and 1 / bursty.burst_exit == pytest.approx(8)
    assert bursty.burst_loss == 1.0 and bursty.loss == 0.0
    long = SCENARIOS["long"].model
    assert (long.delay_s, long.loss, long.queue_s) == pytest.approx((0.1, 0.05, 0.1))
    reorder = SCENARIOS["reorder"].model
    assert (reorder.reorder, reorder.reorder_delay_s, reorder.loss) == pytest.approx((0.02, 0.01, 0.01))
    for p in (0, 10, 20):
        m = SCENARIOS[f"random-{p}"].model
        assert (m.delay_s, m.queue_s, m.loss) == pytest.approx((0.02, 0.05, p / 100))
    change = SCENARIOS["loss-change"]
    assert change.phase_times_s == (5.0, 15.0)
    assert [change.model_at(t).loss for t in (0.0, 4.99, 5.0, 14.9, 15.0, 100.0)] == [0, 0, 0.1, 0.1, 0, 0]


def test_loss_change_model_loses_only_in_its_middle_phase() -> None:
    s = SCENARIOS["loss-change"]
    link: DuplexLink[int] = DuplexLink(s.model, seed=1)
    current = s.model
    lost_at: list[float] = []
    for i in range(20_000):
        now = i * 0.001  # 1000 packets per virtual second for 20 s
        if (params := s.model_at(now)) is not current:
            current = params
            link.set_params(params)
        if not link.a_to_b.send(now, i, 1000):
            lost_at.append(now)
    assert min(lost_at) >= 5.0 and max(lost_at) < 15.0
    assert len(lost_at) / 10_000 == pytest.approx(0.1, rel=0.1)
