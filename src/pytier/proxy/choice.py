"""`--proxy-transport auto`: which transport carries a new proxied connection, sans-IO.

The rule is fed what the node already measures on its link toward the destination's first hop (ping
loss and smoothed round trip), what the destination takes (KCP / QUIC input), and the connection's
destination port: nothing else about a flow is known when its SYN arrives, least of all how much it
will carry. docs/routing.md, "Automatic transport choice", gives the measurements behind each rule.

- Plain TCP (the kernel's own, the cheapest in CPU) only on a path proven clean and short: a full
  window of pings, loss below CLEAN_ENTER_LOSS and a round trip below SHORT_ENTER_MS. Anything
  unproven goes through a proxy: a plain flow caught by loss it did not expect falls to a few Mbit/s,
  a proxied flow on a clean path loses a few percent.
- Otherwise QUIC with BBR where bandwidth counts, which is any connection not known to be
  interactive: it led or tied KCP on every measured path scenario (up to 13 % ahead on the long
  lossy path, never more than 2 % behind).
- KCP where latency counts: a connection to an INTERACTIVE_PORTS port (a person waits on each
  small exchange), since KCP resends a lost segment after one RTO of 30 ms or two later
  acknowledgements, and QUIC only after its probe timeout of more than a round trip.
- Whichever of the two the destination takes when it takes one only.

A destination already on plain TCP keeps it until loss passes CLEAN_LEAVE_LOSS or the round trip
passes SHORT_LEAVE_MS, and one that left plain TCP comes back only after its path looked clean for
REENTER_HOLD_S: a path hovering at a threshold, or losing a ping now and then, does not flip from one
connection to the next. Between KCP and QUIC nothing needs holding: the port alone decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytier.peers.peer_conn import LOSS_WINDOW, PONG_TIMEOUT_S
from pytier.proxy.entries import TransportType

# Ping outcomes a loss figure must rest on before the path counts as clean: PeerConn's loss window.
MIN_SAMPLES = LOSS_WINDOW
CLEAN_ENTER_LOSS = 0.005
CLEAN_LEAVE_LOSS = 0.015
SHORT_ENTER_MS = 20.0
SHORT_LEAVE_MS = 30.0
# A lost ping leaves the window after 32 pings; the hold keeps a link that loses one every half
# minute from going back to plain TCP in between.
REENTER_HOLD_S = 60.0
# Destination ports of interactive TCP, where each exchange is small and someone waits on it: ssh,
# telnet, DNS over TCP, MQTT (and over TLS), RDP, VNC. Everything else counts as bulk.
INTERACTIVE_PORTS = frozenset({22, 23, 53, 1883, 3389, 5900, 8883})


@dataclass(frozen=True, slots=True)
class PathMetrics:
    """What the node knows of the path toward one destination node when a connection starts."""

    loss: float  # share of pings lost on the first hop's link
    rtt_ms: float | None  # smoothed round trip of that link; None before the first pong
    samples: int  # ping outcomes behind `loss`, at most the loss window
    accepts_kcp: bool
    accepts_quic: bool


@dataclass(frozen=True, slots=True)
class Choice:
    transport: TransportType
    reason: str  # for `pytier-cli proxy`: "auto: 0.0% loss, 0.6 ms: tcp (clean short path)"


def link_metrics(*, window_loss: float, smoothed_loss: float, rtt_s: float | None, up_s: float,
                 ping_interval_s: float, accepts_kcp: bool, accepts_quic: bool) -> PathMetrics:
    """PathMetrics from one PeerConn's figures. The loss is the worse of its two estimates: the
    window of the last 32 pings forgets a loss abruptly, the smoothed one slowly. A ping's outcome
    is known a round trip after it left, or PONG_TIMEOUT_S after when it was lost."""
    done = max(0.0, up_s - PONG_TIMEOUT_S) / ping_interval_s
    return PathMetrics(loss=max(window_loss, smoothed_loss),
                       rtt_ms=None if rtt_s is None else rtt_s * 1000,
                       samples=min(MIN_SAMPLES, int(done)),
                       accepts_kcp=accepts_kcp, accepts_quic=accepts_quic)


def choose(m: PathMetrics, current: TransportType | None = None, *, settling_s: float = 0.0,
           port: int | None = None) -> Choice:
    """The transport for a new connection to `port` (None: unknown, counted as bulk); `current` is
    what the destination's last one got, `settling_s` how much longer a path that left plain TCP
    must stay clean before it returns."""
    rtt = "? ms" if m.rtt_ms is None else f"{m.rtt_ms:.1f} ms" if m.rtt_ms < 10 else f"{m.rtt_ms:.0f} ms"
    measured = f"auto: {100 * m.loss:.1f}% loss, {rtt}"
    if not m.accepts_kcp and not m.accepts_quic:
        return Choice(TransportType.Tcp, f"{measured}: tcp (destination takes neither KCP nor QUIC)")
    why = _not_clean(m, staying=current is TransportType.Tcp)
    if why is None and settling_s > 0:
        why = f"clean again, plain in {settling_s:.0f} s"
    if why is None:
        return Choice(TransportType.Tcp, f"{measured}: tcp (clean short path)")
    if not m.accepts_quic:
        return Choice(TransportType.Kcp, f"{measured}: kcp ({why}; destination takes no QUIC)")
    if not m.accepts_kcp:
        return Choice(TransportType.Quic, f"{measured}: quic ({why}; destination takes no KCP)")
    if port in INTERACTIVE_PORTS:
        return Choice(TransportType.Kcp, f"{measured}: kcp ({why}; interactive port {port})")
    return Choice(TransportType.Quic, f"{measured}: quic ({why}; bulk)")


def _not_clean(m: PathMetrics, *, staying: bool) -> str | None:
    """Why the path does not qualify for plain TCP, or None when it does."""
    if m.samples < MIN_SAMPLES and not staying:
        return f"not measured yet, {m.samples} of {MIN_SAMPLES} pings"
    if m.rtt_ms is None:
        return "no round trip measured yet"
    if m.loss >= (CLEAN_LEAVE_LOSS if staying else CLEAN_ENTER_LOSS):
        return "lossy path"
    if m.rtt_ms >= (SHORT_LEAVE_MS if staying else SHORT_ENTER_MS):
        return "long path"
    return None


@dataclass(slots=True)
class _Dest:
    transport: TransportType
    left_tcp_at: float | None = None  # when it last left plain TCP
    clean_since: float | None = None  # since when every look at its path, after that, found it clean


class AutoChooser:
    """`choose` per destination node, remembering each one's last choice for the hysteresis."""

    def __init__(self, *, hold_s: float = REENTER_HOLD_S) -> None:
        self.hold_s = hold_s
        self._dests: dict[int, _Dest] = {}

    def choose(self, dest: int, metrics: PathMetrics, now: float, port: int | None = None) -> Choice:
        state = self._dests.get(dest)
        current = None if state is None else state.transport
        settling = 0.0
        if state is not None and state.left_tcp_at is not None and current is not TransportType.Tcp:
            if _not_clean(metrics, staying=False) is None:
                if state.clean_since is None:
                    state.clean_since = now
                settling = max(0.0, self.hold_s - (now - state.clean_since))
            else:
                state.clean_since = None
        choice = choose(metrics, current, settling_s=settling, port=port)
        if state is None:
            self._dests[dest] = _Dest(choice.transport)
            return choice
        if current is TransportType.Tcp and choice.transport is not TransportType.Tcp:
            state.left_tcp_at, state.clean_since = now, None
        state.transport = choice.transport
        return choice

    def forget(self, dest: int) -> None:
        self._dests.pop(dest, None)
