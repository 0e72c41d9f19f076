"""Goodput floors for KCP and QUIC on each named real-path scenario, in the virtual-time link model.

The paths are those of bench/path_scenarios.py (pytier.testbed.scenarios), as the model sees them;
the floors sit below what the model gives with the code of today, so they catch regressions and
stalls, not speed: virtual time does not depend on how fast Python runs. Print the figures with

    .venv/bin/python tests/unit/test_path_scenarios_model.py
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from test_kcp_link_model import Flow, Transfer  # tests/unit is on sys.path (pytest's prepend import mode)

from pytier.testbed.link_model import DuplexLink, LinkParams, SansIoNode, run_link
from pytier.testbed.scenarios import SCENARIOS, Scenario
from pytier.transport.quic_endpoint import IncomingStream, QuicEndpoint, QuicSettings, StreamData

CLIENT, SERVER = 1, 2
WRITE_AHEAD = 512 << 10  # as the proxy: bytes written ahead and not yet sent
CHUNK = 64 * 1024

Phases = Sequence[tuple[float, LinkParams]]


@dataclass
class Run:
    """Payload bytes the receiver had at each of `times` (virtual s, the first 0), and how many
    packets went across and how many of them were needless: for KCP the receiver's data segments in
    and its duplicates, for QUIC the sender's packets sent and its spurious loss declarations.
    `policed` is the share of the data direction's packets that its policer dropped (QUIC only)."""

    times: list[float]
    received: list[int]
    packets: int = 0
    needless: int = 0
    policed: float | None = None

    def _nearest(self, t: float) -> int:
        return min(range(len(self.times)), key=lambda k: abs(self.times[k] - t))

    def goodput_mbit(self, start: float = 0.0, end: float | None = None) -> float:
        """Mbit/s between the checkpoints nearest `start` and `end` (default: the end of the run)."""
        i, j = self._nearest(start), len(self.times) - 1 if end is None else self._nearest(end)
        return (self.received[j] - self.received[i]) * 8 / (self.times[j] - self.times[i]) / 1e6


def _segments(seconds: float, phases: Phases) -> list[tuple[float, LinkParams | None]]:
    """(end of the stretch, settings to switch to at its end) for each stretch of the run."""
    out: list[tuple[float, LinkParams | None]] = [(t, p) for t, p in phases if t < seconds]
    out.append((seconds, None))
    return out


def run_kcp(params: LinkParams, seconds: float, phases: Phases = (), *, seed: int = 1) -> Run:
    """One bulk KCP conversation A -> B that never runs dry, with `phases` applied on the way."""
    t = Transfer(params, seed=seed)
    flow = Flow(up=bytes(2_000_000_000), down=b"")
    t.open(flow, 40000)
    run = Run([0.0], [0])
    for end, switch_to in _segments(seconds, phases):
        t.run(end - t.now)
        run.times.append(t.now)
        run.received.append(len(flow.got_up))
        if switch_to is not None:
            t.link.set_params(switch_to)
    b = t.b.stats(flow.handle_b)
    run.packets, run.needless = int(b["segments_in"]), int(b["duplicates_in"])
    return run


def run_quic(params: LinkParams, seconds: float, phases: Phases = (), *, seed: int = 1) -> Run:
    """One bulk QUIC stream client -> server (modelled on test_quic_link_model.run_model), keeping
    WRITE_AHEAD bytes written and unsent, with `phases` applied on the way."""
    link: DuplexLink[tuple[int, bytes]] = DuplexLink(params, seed=seed)
    settings = QuicSettings(bbr_seed=seed)  # the link's seed fixes BBR's random phase too
    client, server = QuicEndpoint(CLIENT, settings), QuicEndpoint(SERVER, settings)
    handle = client.open(SERVER, b"connect-header", 0.0)
    chunk = bytes(range(256)) * (CHUNK // 256)
    received = 0

    def client_app(now: float) -> None:
        while client.next_event() is not None:
            pass
        while client.unsent(handle) < WRITE_AHEAD:
            client.send(handle, chunk)

    def server_app(now: float) -> None:
        nonlocal received
        while (ev := server.next_event()) is not None:
            if isinstance(ev, IncomingStream):
                server.accept(ev.handle)
            elif isinstance(ev, StreamData):
                received += len(ev.data)
                server.consume(ev.handle, len(ev.data))

    def node(ep: QuicEndpoint, peer: int, app: Callable[[float], None]) -> SansIoNode[tuple[int, bytes]]:
        return SansIoNode(
            receive=lambda item, now: ep.receive(peer, item[0], item[1], now),
            transmit=lambda now: [((kind, data), len(data)) for _p, kind, data in ep.datagrams_to_send(now)],
            get_timer=ep.get_timer,
            handle_timer=ep.handle_timer,
            app=app,
        )

    a, b = node(client, SERVER, client_app), node(server, CLIENT, server_app)
    run = Run([0.0], [0])
    now = 0.0
    for end, switch_to in _segments(seconds, phases):
        now = run_link(link, a, b, start=now, until=end)
        run.times.append(now)
        run.received.append(received)
        if switch_to is not None:
            link.set_params(switch_to)
    conn = next(iter(client._clients.values()))
    run.packets = conn.quic.congestion.bbr.packets_sent
    run.needless = conn.quic.recovery.spurious_losses
    data_way = link.a_to_b.stats
    run.policed = data_way.dropped_police / max(1, data_way.packets_in)
    return run


RUNNERS = {"kcp": run_kcp, "quic": run_quic}


@dataclass(frozen=True)
class Cell:
    """One (transport, scenario) cell: run length, floor for the whole run (or, with phases, floors
    for the lossy middle phase and the last clean one), an optional ceiling, a cap on the share
    of needless packets, and one on the share the policer dropped (the sender's own loss)."""

    transport: str
    scenario: str
    seconds: float
    floor: float
    ceiling: float | None = None
    needless_share: float | None = None
    last_floor: float | None = None
    own_loss: float | None = None


CELLS = [
    Cell("kcp", "policed", 8.0, 22.0, ceiling=31.0),
    Cell("kcp", "bursty", 8.0, 60.0),
    Cell("kcp", "long", 8.0, 50.0),
    Cell("kcp", "reorder", 8.0, 70.0, needless_share=0.01),
    Cell("kcp", "random-10", 8.0, 60.0),
    Cell("kcp", "random-20", 8.0, 45.0),
    Cell("kcp", "loss-change", 20.0, 55.0, last_floor=70.0),
    # Start-up's overshoot into the policer costs ~2 % of an 8 s run's packets, each probe after
    # the policer's mode another ~35 packets. (The model's policer counts datagrams, the emulator's
    # whole frames, so the emulator's goodput ceiling is a few % lower.)
    Cell("quic", "policed", 8.0, 27.0, ceiling=31.0, own_loss=0.05),
    Cell("quic", "bursty", 5.0, 55.0),
    Cell("quic", "long", 8.0, 45.0),
    Cell("quic", "reorder", 5.0, 70.0, needless_share=0.01),
    Cell("quic", "random-10", 5.0, 55.0),
    Cell("quic", "random-20", 5.0, 45.0),
    Cell("quic", "loss-change", 20.0, 50.0, last_floor=70.0),
]


def measure(cell: Cell) -> tuple[Run, list[float]]:
    """The run, and the goodput figures that the cell's floors apply to."""
    scenario: Scenario = SCENARIOS[cell.scenario]
    run = RUNNERS[cell.transport](scenario.model, cell.seconds, scenario.model_phases)
    if not scenario.model_phases:
        return run, [run.goodput_mbit()]
    (lossy_from, _), (clean_from, _) = scenario.model_phases
    return run, [run.goodput_mbit(lossy_from, clean_from), run.goodput_mbit(clean_from)]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.transport}-{c.scenario}")
def test_goodput_floor_on_scenario(cell: Cell) -> None:
    run, figures = measure(cell)
    print(
        f"{cell.transport} {cell.scenario}: {', '.join(f'{g:.1f}' for g in figures)} Mbit/s; "
        f"needless {run.needless} of {run.packets}"
        + ("" if run.policed is None else f"; policed {run.policed:.1%}")
    )
    assert figures[0] >= cell.floor, figures
    if cell.last_floor is not None:
        assert figures[1] >= cell.last_floor, figures
    if cell.ceiling is not None:
        assert figures[0] <= cell.ceiling, figures
    if cell.needless_share is not None:
        assert run.needless < cell.needless_share * run.packets, (run.needless, run.packets)
    if cell.own_loss is not None:
        assert run.policed is not None and run.policed < cell.own_loss, run.policed


if __name__ == "__main__":
    for c in CELLS:
        r, g = measure(c)
        print(
            f"{c.transport:4} {c.scenario:11}: {', '.join(f'{x:.1f}' for x in g)} Mbit/s;"
            f" needless {r.needless} of {r.packets}"
        )
