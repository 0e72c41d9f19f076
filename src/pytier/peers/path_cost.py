"""Loss-aware choice of the first hop toward each node (--latency-first), sans-IO.

A direct link's cost is `link_cost(latency, loss)`; links beyond our neighbours are unmeasured here
(EasyTier's route sync carries no link metrics), so each is counted as a clean link as slow as the
first hop. A node's own traffic leaves through the cheapest feasible neighbour; `FirstHopChooser`
adds hysteresis so a route does not flap while loss hovers near the break-even point. docs/routing.md
states the formula and why each constant is what it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# What one more relay costs beyond its link latency (a Python relay's queueing and CPU), in ms. It also
# keeps paths over near-zero-latency links (veths, one LAN) ranked by hop count.
HOP_MS = 5.0
# A link losing a fraction `loss` of packets costs (1 + LOSS_WEIGHT * loss) times a clean one: 10 %
# loss makes a direct link as dear as two clean hops; TCP goodput falls far faster than that.
LOSS_WEIGHT = 10.0
# With latency_first every link is pinged this often instead of once a second: telling 30 % loss from
# 10 % at one ping a second takes so long, or leaves the estimate so noisy, that routes either react in
# tens of seconds or flap (docs/routing.md has the figures). A ping is 20 bytes plus tunnel framing.
PROBE_INTERVAL_S = 0.1
# The smoothed loss weighs each ping outcome by alpha, so it remembers about this many seconds.
LOSS_MEMORY_S = 4.0
LOSS_ALPHA = PROBE_INTERVAL_S / LOSS_MEMORY_S
# A challenger must be this much cheaper than the current first hop...
SWITCH_MARGIN = 0.35
# ...for this long without interruption before traffic moves.
DWELL_S = 3.0


def link_cost(latency_ms: float | None, loss: float) -> float:
    """Cost of one link: (round trip in ms + HOP_MS) * (1 + LOSS_WEIGHT * loss); unknown latency is 0."""
    latency = max(0.0, latency_ms or 0.0)
    return (latency + HOP_MS) * (1.0 + LOSS_WEIGHT * min(1.0, max(0.0, loss)))


class LossEstimate:
    """Exponentially weighted share of lost pings on one link (0 until a ping is lost)."""

    __slots__ = ("_alpha", "value")

    def __init__(self, alpha: float = LOSS_ALPHA) -> None:
        self._alpha = alpha
        self.value = 0.0

    def record(self, lost: bool) -> None:
        self.value += self._alpha * ((1.0 if lost else 0.0) - self.value)


@dataclass(frozen=True, slots=True)
class LinkState:
    """What we measured on our link to one neighbour."""

    latency_ms: float | None
    loss: float


@dataclass(frozen=True, slots=True)
class Candidate:
    """Reaching a node through neighbour `hop`: the path's cost and its hop count."""

    hop: int
    cost: float
    hops: int


def _rank(c: Candidate) -> tuple[float, int, int]:
    # Hop count breaks cost ties, then the lower peer id, so every run agrees.
    return (c.cost, c.hops, c.hop)


def candidates(
    destinations: Mapping[int, int],
    links: Mapping[int, LinkState],
    hops_from: Mapping[int, Mapping[int, int]],
) -> dict[int, list[Candidate]]:
    """Feasible first hops per destination.

    `destinations` maps each reachable node to our least-hop distance; `hops_from[n]` is neighbour n's
    least-hop distance to each node. Only neighbours at most as far from the destination as we are
    qualify: relays forward by least hops, so such a neighbour never sends the packet back through us,
    and no loop can form.
    """
    out: dict[int, list[Candidate]] = {}
    for dest, our_hops in destinations.items():
        found = []
        for hop, link in links.items():
            theirs = hops_from.get(hop, {}).get(dest)
            if theirs is None or theirs > our_hops:
                continue
            clean = link_cost(link.latency_ms, 0.0)
            found.append(Candidate(hop, link_cost(link.latency_ms, link.loss) + theirs * clean, theirs + 1))
        if found:
            out[dest] = found
    return out


@dataclass(frozen=True, slots=True)
class Switch:
    """Traffic to `dest` moved from first hop `old` to `new`."""

    dest: int
    old: Candidate
    new: Candidate


@dataclass(slots=True)
class _Choice:
    current: Candidate
    challenger: int | None = None
    challenger_since: float = 0.0


class FirstHopChooser:
    """The first hop per destination, moved only when a challenger stays clearly cheaper.

    A challenger must cost less than (1 - margin) times the current choice for `dwell_s` without
    interruption. A first hop that stops being a candidate (link gone, no longer feasible) is
    replaced at once by the best one.
    """

    def __init__(self, *, margin: float = SWITCH_MARGIN, dwell_s: float = DWELL_S) -> None:
        self.margin = margin
        self.dwell_s = dwell_s
        self._chosen: dict[int, _Choice] = {}

    def update(self, now: float, options: Mapping[int, Sequence[Candidate]]) -> list[Switch]:
        switches: list[Switch] = []
        for dest in [d for d in self._chosen if not options.get(d)]:
            del self._chosen[dest]
        for dest, cands in options.items():
            if not cands:
                continue
            best = min(cands, key=_rank)
            choice = self._chosen.get(dest)
            if choice is None:
                self._chosen[dest] = _Choice(best)
                continue
            current = next((c for c in cands if c.hop == choice.current.hop), None)
            if current is None:
                switches.append(Switch(dest, choice.current, best))
                self._chosen[dest] = _Choice(best)
                continue
            choice.current = current
            if best.hop == current.hop or best.cost >= current.cost * (1.0 - self.margin):
                choice.challenger = None
                continue
            if choice.challenger != best.hop:
                choice.challenger = best.hop
                choice.challenger_since = now
            if now - choice.challenger_since >= self.dwell_s:
                switches.append(Switch(dest, current, best))
                self._chosen[dest] = _Choice(best)
        return switches

    def choice(self, dest: int) -> Candidate | None:
        choice = self._chosen.get(dest)
        return None if choice is None else choice.current

    def first_hops(self) -> dict[int, int]:
        return {dest: c.current.hop for dest, c in self._chosen.items()}
