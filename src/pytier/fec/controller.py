"""The ratio controller: from measured loss and burst length, the FEC shape to send with.

A pure state machine: the caller feeds one `LossSample` per interval (frames the path carried,
how many it lost, in how many runs) and gets back the `FecParams` to use, or None for no FEC. The
window's loss rate p and mean burst b define a Gilbert-Elliott channel (bad state = lost, mean
stay b); `residual_loss` computes exactly what share of data packets a shape (k, m, depth) still
loses on that channel, and `choose` picks the cheapest shape that meets the target.

Hysteresis, so a path near a threshold does not flap:
- on when p >= on_loss, off only after `hold` intervals in a row at p <= off_loss;
- a new shape is chosen for p and b raised by `headroom`, but the current shape is only replaced
  at once when it misses the target at the measured p and b; a cheaper shape must stay cheaper
  (by at least `min_gain` overhead) for `hold` intervals in a row before the controller takes it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from pytier.fec.encoder import DEFAULT_FLUSH_S
from pytier.fec.framing import MAX_GROUP_SIZE
from pytier.fec.params import FecParams

__all__ = [
    "ControllerConfig",
    "Estimate",
    "FecController",
    "LossSample",
    "bounds",
    "choose",
    "residual_loss",
]

GROUP_SIZES = (4, 8, 16, 32)
DEPTHS = (1, 2, 4, 8, 16)


@dataclass(frozen=True, slots=True)
class LossSample:
    """One interval of the path: frames it carried, frames it lost, runs of consecutive losses.

    `seconds` is the interval's length (0: unknown); with it the controller keeps a block
    (k x depth frames) small enough to fill within the encoder's flush deadline.
    """

    packets: int
    lost: int
    bursts: int
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    # Share of data packets still lost after FEC, on average. Burst loss clusters the residual in
    # rare long runs: at a mean of 0.5 % about half of all 10 s spans lose more than 0.5 %, at 0.1 %
    # about one in fifteen (simulated, 5 % loss in runs of 8).
    target_residual: float = 0.001
    max_overhead: float = 0.35  # parity per data frame the controller prefers to stay within
    hard_max_overhead: float = 1.0  # never more, even when the target is out of reach
    on_loss: float = 0.0075
    off_loss: float = 0.0025
    confidence: float = 2.0  # standard errors of the estimate a new shape is sized beyond it
    min_gain: float = 0.05  # overhead a cheaper shape must save to be worth a switch
    hold: int = 4  # intervals a weaker shape (or no FEC) must keep qualifying
    window: int = 32  # intervals the estimate spans at most
    window_runs: int = 100  # loss runs enough for an estimate: a shorter span of newest intervals will do
    min_packets: int = 200  # fewer in the window: keep what we have
    calm_runs: float = 9.0  # loss runs the old loss would have shown in a calm span before FEC goes off
    flush_s: float = DEFAULT_FLUSH_S


@dataclass(frozen=True, slots=True)
class Estimate:
    """The path over the window: loss rate, mean loss run, frames per second (0: unknown), and the
    loss runs behind the figures (their precision)."""

    loss: float
    burst: float
    rate: float
    runs: int


def bounds(loss: float, burst: float, runs: int, z: float) -> tuple[float, float, float, float]:
    """(loss, mean run) lowered, then raised, by z standard errors of an estimate from `runs` runs.

    Runs arrive as a Poisson process with geometric lengths (mean b): the lost count, a sum of
    runs, has relative spread sqrt((2 - 1/b) / n) over n runs, the mean run sqrt(1 - 1/b) / sqrt(n).
    On a bursty path the run count, not the packet count, sets the precision: 5 % loss in runs of 8
    is ~14 runs in 4 s at 500 packets/s, a relative spread of 37 %.
    """
    b = max(burst, 1.0)
    n = max(runs, 1)
    sp = z * math.sqrt((2.0 - 1.0 / b) / n)
    sb = z * math.sqrt((1.0 - 1.0 / b) / n)
    return loss * max(0.0, 1.0 - sp), max(1.0, b * (1.0 - sb)), min(0.999, loss * (1.0 + sp)), b * (1.0 + sb)


def _chain(p: float, burst: float, spacing: int) -> tuple[float, float, float]:
    """(stationary loss, good->bad, bad->good) of the channel seen every `spacing` frames."""
    p = min(max(p, 0.0), 0.999)
    burst = max(burst, 1.0 / (1.0 - p), 1.0)
    exit_ = 1.0 / burst
    enter = p * exit_ / (1.0 - p)
    lam = (1.0 - enter - exit_) ** spacing
    return p, p * (1.0 - lam), (1.0 - p) * (1.0 - lam)


@lru_cache(maxsize=4096)
def _residuals(p: float, burst: float, k: int, depth: int, m_max: int) -> tuple[float, ...]:
    """Residual data loss for m = 1..m_max parity frames: E[data lost | more than m lost] / k.

    A group's frames sit `depth` apart on the wire (data first, then parity), so they see the
    chain sampled every `depth` frames. Dynamic programme over frames: for each state and count t
    of lost frames so far, the probability and the expected number of lost data frames.
    """
    pi, enter, exit_ = _chain(p, burst, depth)
    n_max = k + m_max
    # prob[s][t], dlost[s][t]: s 0 good (delivered), 1 bad (lost)
    prob = [[0.0] * (n_max + 1) for _ in range(2)]
    dlost = [[0.0] * (n_max + 1) for _ in range(2)]
    prob[0][0] = 1.0 - pi
    prob[1][1] = pi
    dlost[1][1] = pi  # frame 0 is data (k >= 1)
    out = []
    for pos in range(1, n_max):
        is_data = pos < k
        np0 = [0.0] * (n_max + 1)
        np1 = [0.0] * (n_max + 1)
        nd0 = [0.0] * (n_max + 1)
        nd1 = [0.0] * (n_max + 1)
        g, b = prob
        gd, bd = dlost
        for t in range(pos + 1):
            pg, pb = g[t], b[t]
            if pg == 0.0 and pb == 0.0:
                continue
            dg, db = gd[t], bd[t]
            to_good = pg * (1.0 - enter) + pb * exit_
            to_bad = pg * enter + pb * (1.0 - exit_)
            np0[t] += to_good
            nd0[t] += dg * (1.0 - enter) + db * exit_
            np1[t + 1] += to_bad
            nd1[t + 1] += dg * enter + db * (1.0 - exit_) + (to_bad if is_data else 0.0)
        prob, dlost = [np0, np1], [nd0, nd1]
        m = pos + 1 - k
        if m >= 1:
            out.append(sum(dlost[0][m + 1 :]) / k + sum(dlost[1][m + 1 :]) / k)
    return tuple(out)


def _key(p: float, burst: float) -> tuple[float, float]:
    # two significant digits of loss and a tenth of a packet of burst keep the cache effective
    return float(f"{p:.2g}"), round(burst, 1)


def residual_loss(params: FecParams, p: float, burst: float) -> float:
    """Share of data packets a shape still loses on the channel (loss p, mean burst length)."""
    if p <= 0.0:
        return 0.0
    p, burst = _key(p, burst)
    return _residuals(p, burst, params.k, params.depth, params.m)[params.m - 1]


def _magnitude(residual: float) -> int:
    """Residuals within a factor of two count as equal, so the smaller block (sooner repair) wins."""
    return math.floor(math.log2(residual)) if residual > 0 else -1075


def _least_m(residuals: tuple[float, ...], target: float) -> int:
    """The fewest parity frames (1-based) whose residual meets the target; 0 if none does."""
    return next((m for m, r in enumerate(residuals, start=1) if r <= target), 0)


def choose(
    p: float,
    burst: float,
    config: ControllerConfig = ControllerConfig(),
    max_block: float = math.inf,
    *,
    runs: int | None = None,
) -> FecParams:
    """The shape for a channel measured at loss p and mean run `burst` from `runs` loss runs
    (None: figures taken as exact), by tiers, smaller blocks first on ties:

    0. the cheapest within max_overhead that meets the target at p and burst raised by
       config.confidence standard errors (`bounds`);
    1. if the margin does not fit but the target is met within max_overhead at the lowered figures:
       all of max_overhead, in the shape that loses least at the raised figures, then at the
       measured ones (`_magnitude`). The margin for an uncertain estimate takes what the budget
       allows, and only a loss that needs more than the budget even on its optimistic reading
       takes the overhead past it:
    2. the cheapest up to hard_max_overhead meeting the target at the measured figures;
    3. the shape losing least at the measured figures.

    Blocks (k x depth) stay within max_block frames where any shape does (k=4, depth 1 always)."""
    if runs is None:
        p_lo, b_lo, p_hi, b_hi = p, burst, p, burst
    else:
        p_lo, b_lo, p_hi, b_hi = bounds(p, burst, runs, config.confidence)
    p_lo, b_lo = _key(p_lo, b_lo)
    p_hi, b_hi = _key(p_hi, b_hi)
    p, burst = _key(p, burst)
    target = config.target_residual
    best: tuple[tuple[float, ...], FecParams] | None = None
    for k in GROUP_SIZES:
        m_max = min(int(k * config.hard_max_overhead), MAX_GROUP_SIZE - k)
        if m_max < 1:
            continue
        for depth in DEPTHS:
            if k * depth > max_block and (k, depth) != (GROUP_SIZES[0], 1):
                continue
            res = _residuals(p, burst, k, depth, m_max)
            res_hi = _residuals(p_hi, b_hi, k, depth, m_max)
            m_budget = min(m_max, int(k * config.max_overhead))
            m_hi = _least_m(res_hi, target)
            rank: tuple[float, ...]
            if m_hi and m_hi <= m_budget:
                m, rank = m_hi, (0, m_hi / k, k * depth, depth)
            elif m_budget and 0 < _least_m(_residuals(p_lo, b_lo, k, depth, m_budget), target) <= m_budget:
                m = m_budget
                rank = (1, _magnitude(res_hi[m - 1]), _magnitude(res[m - 1]), k * depth, depth)
            elif m_lo := _least_m(res, target):
                m, rank = m_lo, (2, m_lo / k, k * depth, depth)
            else:
                m, rank = m_max, (3, res[-1], m_max / k, k * depth)
            if best is None or rank < best[0]:
                best = (rank, FecParams(k, m, depth))
    assert best is not None
    return best[1]


class FecController:
    """Feeds on LossSamples, answers with the shape to send with (None: no FEC); see module doc."""

    __slots__ = ("_cheaper", "_config", "_params", "_window")

    def __init__(self, config: ControllerConfig = ControllerConfig()) -> None:
        self._config = config
        self._window: deque[LossSample] = deque(maxlen=config.window)
        self._params: FecParams | None = None
        self._cheaper = 0

    @property
    def params(self) -> FecParams | None:
        return self._params

    def estimate(self) -> Estimate | None:
        """The path over the newest intervals that hold window_runs loss runs (all of the window
        if they do not), or None while the window has fewer than min_packets frames."""
        packets = lost = bursts = 0
        seconds = 0.0
        for s in reversed(self._window):
            packets += s.packets
            lost += s.lost
            bursts += s.bursts
            seconds += s.seconds
            if bursts >= self._config.window_runs and packets >= self._config.min_packets:
                break
        if packets < self._config.min_packets:
            return None
        return Estimate(lost / packets, lost / bursts if bursts else 1.0,
                        packets / seconds if seconds else 0.0, bursts)

    def _calm(self) -> bool:
        """Whether the newest intervals are calm long enough to turn FEC off: at least `hold` of
        them at loss <= off_loss, holding so many frames that the loss before them would have shown
        calm_runs loss runs in them (or nothing lossy is left in the window)."""
        cfg = self._config
        calm = calm_packets = calm_lost = 0
        samples = list(self._window)
        while calm < len(samples):
            s = samples[-1 - calm]
            if calm_lost + s.lost > cfg.off_loss * (calm_packets + s.packets):
                break
            calm += 1
            calm_packets += s.packets
            calm_lost += s.lost
        if calm < cfg.hold:
            return False
        before = samples[: len(samples) - calm]
        packets = sum(s.packets for s in before)
        runs = sum(s.bursts for s in before)
        return packets == 0 or calm_packets * runs / packets >= cfg.calm_runs

    def update(self, sample: LossSample) -> FecParams | None:
        if sample.packets < 0 or not 0 <= sample.lost <= sample.packets or sample.bursts < 0:
            raise ValueError(f"loss sample {sample} has counts out of range")
        self._window.append(sample)
        est = self.estimate()
        if est is None:
            return self._params
        cfg = self._config
        p, burst = est.loss, est.burst
        max_block = max(float(GROUP_SIZES[0]), est.rate * cfg.flush_s) if est.rate else math.inf
        current = self._params
        if current is None:
            if p >= cfg.on_loss:
                self._params = choose(p, burst, cfg, max_block, runs=est.runs)
                self._cheaper = 0
            return self._params
        if self._calm():
            # what made FEC necessary is history now: keeping it would turn FEC straight back on
            self._params = None
            self._window.clear()
            return None
        wanted = choose(p, burst, cfg, max_block, runs=est.runs)
        now_res = residual_loss(current, p, burst)
        if now_res > cfg.target_residual:
            self._cheaper = 0
            if wanted != current and residual_loss(wanted, p, burst) < now_res:
                self._params = wanted
        elif wanted.overhead <= current.overhead - cfg.min_gain:
            self._cheaper += 1
            if self._cheaper >= cfg.hold:
                self._params = wanted
                self._cheaper = 0
        else:
            self._cheaper = 0
        return self._params
