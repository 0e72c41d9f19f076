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
    "FecController",
    "LossSample",
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
    target_residual: float = 0.005  # share of data packets still lost after FEC
    max_overhead: float = 0.35  # parity per data frame the controller prefers to stay within
    hard_max_overhead: float = 1.0  # never more, even when the target is out of reach
    on_loss: float = 0.0075
    off_loss: float = 0.0025
    headroom: float = 1.25  # a new shape is sized for p and b times this
    min_gain: float = 0.05  # overhead a cheaper shape must save to be worth a switch
    hold: int = 4  # intervals a weaker shape (or no FEC) must keep qualifying
    window: int = 8  # intervals the estimate spans
    min_packets: int = 200  # fewer in the window: keep what we have
    flush_s: float = DEFAULT_FLUSH_S


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


def choose(
    p: float, burst: float, config: ControllerConfig = ControllerConfig(), max_block: float = math.inf
) -> FecParams:
    """The cheapest shape meeting the target (overhead <= max_overhead if any does, else up to
    hard_max_overhead), smaller blocks first on ties; if none meets it, the one losing least.
    Blocks (k x depth) stay within max_block frames where any shape does (k=4, depth 1 always)."""
    p, burst = _key(p, burst)
    best: tuple[tuple[float, ...], FecParams] | None = None
    for k in GROUP_SIZES:
        m_max = min(int(k * config.hard_max_overhead), MAX_GROUP_SIZE - k)
        if m_max < 1:
            continue
        for depth in DEPTHS:
            if k * depth > max_block and (k, depth) != (GROUP_SIZES[0], 1):
                continue
            res = _residuals(p, burst, k, depth, m_max)
            for m, r in enumerate(res, start=1):
                if r <= config.target_residual:
                    tier = 0.0 if m / k <= config.max_overhead else 1.0
                    rank: tuple[float, ...] = (tier, m / k, k * depth, depth)
                    break
            else:
                m = m_max
                rank = (2.0, res[-1], m / k, k * depth)
            if best is None or rank < best[0]:
                best = (rank, FecParams(k, m, depth))
    assert best is not None
    return best[1]


class FecController:
    """Feeds on LossSamples, answers with the shape to send with (None: no FEC); see module doc."""

    __slots__ = ("_calm", "_cheaper", "_config", "_params", "_window")

    def __init__(self, config: ControllerConfig = ControllerConfig()) -> None:
        self._config = config
        self._window: deque[LossSample] = deque(maxlen=config.window)
        self._params: FecParams | None = None
        self._calm = 0
        self._cheaper = 0

    @property
    def params(self) -> FecParams | None:
        return self._params

    def estimate(self) -> tuple[float, float, float] | None:
        """(loss rate, mean burst, frames per second or 0) over the window, or None if too few."""
        packets = sum(s.packets for s in self._window)
        if packets < self._config.min_packets:
            return None
        lost = sum(s.lost for s in self._window)
        bursts = sum(s.bursts for s in self._window)
        seconds = sum(s.seconds for s in self._window)
        return lost / packets, (lost / bursts if bursts else 1.0), (packets / seconds if seconds else 0.0)

    def update(self, sample: LossSample) -> FecParams | None:
        if sample.packets < 0 or not 0 <= sample.lost <= sample.packets or sample.bursts < 0:
            raise ValueError(f"loss sample {sample} has counts out of range")
        self._window.append(sample)
        est = self.estimate()
        if est is None:
            return self._params
        cfg = self._config
        p, burst, rate = est
        max_block = max(float(GROUP_SIZES[0]), rate * cfg.flush_s) if rate else math.inf
        current = self._params
        if current is None:
            if p >= cfg.on_loss:
                self._params = choose(p * cfg.headroom, burst * cfg.headroom, cfg, max_block)
                self._cheaper = 0
            return self._params
        if p <= cfg.off_loss:
            self._calm += 1
            if self._calm >= cfg.hold:
                self._params = None
                self._calm = 0
            return self._params
        self._calm = 0
        wanted = choose(p * cfg.headroom, burst * cfg.headroom, cfg, max_block)
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
