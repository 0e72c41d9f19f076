"""The named paths of the "real paths" benchmark, for the emulator and the virtual-time model alike.

Each `Scenario` carries the same path twice: `emulator`, the pytier-linkem settings that the namespace
benchmark runs (bench/path_scenarios.py), and `model`, the link_model settings that virtual-time unit
tests run. Both are derived from one set of numbers here, so the two cannot drift apart. All paths
are symmetric (the same each way) on a 100 Mbit/s bottleneck. The policer, like the rest of the
emulator, acts on every frame but ARP: it stands for an ISP's UDP policer on paths that carry only
pytier's UDP underlay, and would police a plain TCP flow as well.

The two are alike, not identical: the model adds `overhead_bytes` to each packet for the headers
around a payload where the emulator sees whole frames, and the model's random loss sits after the
rate queue where the emulator's sits before it (the same unless the queue is full).

A path that changes under a live connection has phases: the emulator moves to its next phase on each
SIGUSR2, which the benchmark sends at `phase_times_s` seconds after the flow is up; the model switches
at the same times of virtual time (`model_phases`, or `model_at(t)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pytier.testbed import link_model, linkem

__all__ = ["SCENARIOS", "Scenario", "model_params"]

RATE_MBIT = 100.0
DELAY_MS = 20.0  # one way
QUEUE_MS = 50.0


def model_params(d: linkem.DirParams) -> link_model.LinkParams:
    """The virtual-time model of one direction of the emulator's settings."""
    base = link_model.LinkParams()
    return link_model.LinkParams(
        delay_s=d.delay_ms / 1000,
        rate_bps=None if d.rate_mbit is None else d.rate_mbit * 1e6,
        queue_s=base.queue_s if d.rate_mbit is None else d.queue_limit_s(),
        loss=d.loss_pct / 100,
        burst_enter=d.burst_enter_pct / 100,
        burst_exit=d.burst_exit_pct / 100,
        burst_loss=d.burst_loss_pct / 100,
        police_bps=None if d.police_mbit is None else d.police_mbit * 1e6,
        police_bucket_bytes=d.police_bucket_bytes,
        reorder=d.reorder_pct / 100,
        reorder_delay_s=d.reorder_ms / 1000,
    )


@dataclass(frozen=True)
class Scenario:
    """One named path.

    `model_phases` holds (virtual time in s, settings from then on) for each phase after the first;
    `phase_times_s` the matching switch times for the emulator's `phases`, counted from the start of
    the flow.
    """

    name: str
    title: str
    emulator: linkem.LinkParams
    model: link_model.LinkParams
    model_phases: tuple[tuple[float, link_model.LinkParams], ...] = ()
    phase_times_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        times = tuple(t for t, _ in self.model_phases)
        if not len(self.emulator.phases) == len(self.phase_times_s) == len(times):
            raise ValueError(f"scenario {self.name}: emulator phases, phase times and model phases differ")
        if list(times) != sorted(times) or any(t < 0 for t in times):
            raise ValueError(f"scenario {self.name}: model phase times must be >= 0 and increasing")
        if list(self.phase_times_s) != sorted(self.phase_times_s):
            raise ValueError(f"scenario {self.name}: phase times must be increasing")

    def model_at(self, t: float) -> link_model.LinkParams:
        """The model's settings in force at virtual time `t`."""
        current = self.model
        for start, params in self.model_phases:
            if t < start:
                break
            current = params
        return current


def _scenario(
    name: str,
    title: str,
    *,
    phases: tuple[linkem.Phase, ...] = (),
    phase_times_s: tuple[float, ...] = (),
    delay_ms: float = DELAY_MS,
    queue_ms: float = QUEUE_MS,
    loss_pct: float = 0.0,
    burst: tuple[float, float, float] | None = None,
    police_mbit: float | None = None,
    reorder_pct: float = 0.0,
    reorder_ms: float = 0.0,
) -> Scenario:
    emulator = linkem.LinkParams.both_ways(
        delay_ms=delay_ms,
        loss_pct=loss_pct,
        rate_mbit=RATE_MBIT,
        queue_ms=queue_ms,
        burst=burst,
        police_mbit=police_mbit,
        reorder_pct=reorder_pct,
        reorder_ms=reorder_ms,
        phases=phases,
    )
    model_phases = tuple(
        (t, model_params(emulator.phase_params(n)[0])) for n, t in enumerate(phase_times_s, start=1)
    )
    return Scenario(name, title, emulator, model_params(emulator.ab), model_phases, phase_times_s)


def _bursty_enter_pct(avg_loss: float, exit_pct: float) -> float:
    """The enter rate that makes the bad state's stationary share `avg_loss` (a fraction)."""
    return avg_loss * exit_pct / (1 - avg_loss)


_ALL = (
    _scenario(
        "policed",
        "policed at 30 Mbit/s (64 KB bucket) on a 100 Mbit/s link, 20 ms, no random loss",
        police_mbit=30.0,
    ),
    _scenario(
        "bursty",
        "Gilbert-Elliott burst loss, 5 % on average in bursts of 8 frames, 20 ms, each way",
        burst=(_bursty_enter_pct(0.05, 12.5), 12.5, 100.0),
    ),
    _scenario(
        "long",
        "long path: 100 ms one way (200 ms RTT), 5 % random loss each way, 100 ms queue",
        delay_ms=100.0,
        queue_ms=100.0,
        loss_pct=5.0,
    ),
    _scenario(
        "reorder",
        "2 % of frames reordered by 10 ms, 1 % random loss, 20 ms",
        loss_pct=1.0,
        reorder_pct=2.0,
        reorder_ms=10.0,
    ),
    *(_scenario(f"random-{p}", f"{p} % random loss each way, 20 ms", loss_pct=float(p)) for p in (0, 10, 20)),
    _scenario(
        "loss-change",
        "20 ms, clean, then 10 % random loss each way from 5 s, clean again from 15 s",
        phases=(linkem.Phase(loss_pct=10.0), linkem.Phase(loss_pct=0.0)),
        phase_times_s=(5.0, 15.0),
    ),
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in _ALL}
