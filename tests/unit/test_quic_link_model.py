"""QUIC with BBR over the virtual-time lossy link model: a goodput floor that catches stalls.

This is not a speed benchmark (the model runs in virtual time, so Python's speed does not enter):
it checks that the protocol keeps a lossy 20 ms / 100 Mbit/s link busy instead of collapsing the way
loss-based congestion control does. Run as a script to print the goodput table:

    .venv/bin/python tests/unit/test_quic_link_model.py [--seconds 10] [--seeds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from dataclasses import dataclass

import pytest

from pytier.testbed.link_model import DuplexLink, LinkParams, SansIoNode, run_link
from pytier.testbed.scenarios import SCENARIOS
from pytier.transport.quic_endpoint import (
    IncomingStream,
    QuicEndpoint,
    QuicSettings,
    StreamData,
    StreamFinished,
)
from pytier.wire.peer_header import PacketType

CLIENT, SERVER = 1, 2
WRITE_AHEAD = 512 << 10  # as the proxy: bytes written and not yet sent
CHUNK = 64 * 1024


@dataclass
class ModelRun:
    goodput_mbit: float
    received: int
    cpu_s: float
    lost: int
    state: str
    digest_ok: bool | None


def run_model(loss: float, *, seconds: float = 10.0, seed: int = 1, delay_s: float = 0.020,
              rate_bps: float = 100e6, total: int | None = None) -> ModelRun:
    """One bulk stream client -> server for `seconds` of virtual time (or until `total` bytes)."""
    link: DuplexLink[tuple[int, bytes]] = DuplexLink(
        LinkParams(delay_s=delay_s, rate_bps=rate_bps, queue_s=0.050, loss=loss), seed=seed)
    settings = QuicSettings(bbr_seed=seed)  # the link's seed fixes BBR's random phase too
    client, server = QuicEndpoint(CLIENT, settings), QuicEndpoint(SERVER, settings)
    handle = client.open(SERVER, b"connect-header", 0.0)
    sent = 0
    received = 0
    h_sent, h_recv = hashlib.sha256(), hashlib.sha256()
    pattern = bytes(range(256)) * (CHUNK // 256)
    state = {"done": False}

    def client_app(now: float) -> None:
        nonlocal sent
        while client.next_event() is not None:
            pass
        while client.unsent(handle) < WRITE_AHEAD and (total is None or sent < total):
            n = CHUNK if total is None else min(CHUNK, total - sent)
            chunk = pattern[:n]
            client.send(handle, chunk)
            h_sent.update(chunk)
            sent += n
            if total is not None and sent >= total:
                client.shutdown_write(handle)

    def server_app(now: float) -> None:
        nonlocal received
        while (ev := server.next_event()) is not None:
            if isinstance(ev, IncomingStream):
                assert ev.conn_data == b"connect-header"
                server.accept(ev.handle)
            elif isinstance(ev, StreamData):
                received += len(ev.data)
                h_recv.update(ev.data)
                server.consume(ev.handle, len(ev.data))
            elif isinstance(ev, StreamFinished):
                state["done"] = True

    def node(ep: QuicEndpoint, app: object) -> SansIoNode[tuple[int, bytes]]:
        peer = SERVER if ep is client else CLIENT
        return SansIoNode(
            receive=lambda item, now: ep.receive(peer, item[0], item[1], now),
            transmit=lambda now: [((kind, data), len(data)) for _p, kind, data in ep.datagrams_to_send(now)],
            get_timer=ep.get_timer,
            handle_timer=ep.handle_timer,
            app=app,  # type: ignore[arg-type]
        )

    cpu = time.process_time()
    end = run_link(link, node(client, client_app), node(server, server_app), start=0.0, until=seconds,
                   stop=lambda: state["done"])
    cpu = time.process_time() - cpu
    conn = next(iter(client._clients.values()))
    bbr = conn.quic.congestion.bbr
    digest_ok = h_sent.digest() == h_recv.digest() if total is not None else None
    return ModelRun(received * 8 / end / 1e6, received, cpu, bbr.lost_packets, bbr.state.value, digest_ok)


def test_kind_of_packets_on_the_link() -> None:
    assert int(PacketType.QuicSrc) == 16 and int(PacketType.QuicDst) == 17


def test_transfer_is_intact_through_loss() -> None:
    run = run_model(0.10, seconds=30.0, total=3 << 20, seed=5)
    assert run.digest_ok and run.received == 3 << 20


@pytest.mark.parametrize(("loss", "floor_mbit"), [(0.0, 60.0), (0.10, 40.0), (0.20, 30.0)])
def test_goodput_floor_on_lossy_link(loss: float, floor_mbit: float) -> None:
    # Loss-based control gets ~1 Mbit/s here at 10% loss; a stall of a few seconds would fail too.
    run = run_model(loss, seconds=3.0, seed=2)
    assert run.goodput_mbit > floor_mbit, run


def request_response(params: LinkParams, seed: int, count: int = 100, until: float = 15.0) -> int:
    """Sequential 64-byte requests answered by an echo, as an interactive session; returns how many
    were answered within `until` seconds of virtual time."""
    link: DuplexLink[tuple[int, bytes]] = DuplexLink(params, seed=seed)
    settings = QuicSettings(bbr_seed=seed)  # the link's seed fixes BBR's random phase too
    client, server = QuicEndpoint(CLIENT, settings), QuicEndpoint(SERVER, settings)
    handle = client.open(SERVER, b"rr", 0.0)
    st = {"sent": 0, "answered": 0, "waiting": False}

    def client_app(now: float) -> None:
        while (ev := client.next_event()) is not None:
            if isinstance(ev, StreamData):
                client.consume(handle, len(ev.data))
                st["answered"] += 1
                st["waiting"] = False
        if not st["waiting"] and st["sent"] < count:
            client.send(handle, b"q" * 64)
            st["sent"] += 1
            st["waiting"] = True

    def server_app(now: float) -> None:
        while (ev := server.next_event()) is not None:
            if isinstance(ev, IncomingStream):
                server.accept(ev.handle)
            elif isinstance(ev, StreamData):
                server.consume(ev.handle, len(ev.data))
                server.send(ev.handle, ev.data)

    def node(ep: QuicEndpoint, app: object, peer: int) -> SansIoNode[tuple[int, bytes]]:
        return SansIoNode(
            receive=lambda item, now: ep.receive(peer, item[0], item[1], now),
            transmit=lambda now: [((kind, data), len(data)) for _p, kind, data in ep.datagrams_to_send(now)],
            get_timer=ep.get_timer, handle_timer=ep.handle_timer, app=app)  # type: ignore[arg-type]

    run_link(link, node(client, client_app, SERVER), node(server, server_app, CLIENT), start=0.0, until=until,
             stop=lambda: st["answered"] >= count)
    return st["answered"]


@pytest.mark.parametrize("seed", range(1, 9))
def test_interactive_session_survives_20_percent_loss(seed: int) -> None:
    # Seed 3 once lost the Handshake ACK: the server completed on a 1-RTT packet, left its path
    # unvalidated, and aioquic closed the connection 0.7 s later.
    assert request_response(LinkParams(delay_s=0.020, rate_bps=100e6, queue_s=0.050, loss=0.20), seed) == 100


@pytest.mark.parametrize("seed", range(1, 9))
def test_interactive_session_gets_through_loss_bursts(seed: int) -> None:
    # The bursty path loses runs of 8 packets on average, counted in packets whatever their spacing:
    # with one probe per (doubling) probe timeout, seeds 2 and 6 answered 2 and 75 requests in 15 s.
    # 100 round trips of 42 ms take 4.2 s without loss; 9 s leaves room for the bursts (seed 2: 7.7 s).
    assert request_response(SCENARIOS["bursty"].model, seed, until=9.0) == 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--loss", type=float, nargs="*", default=[0.0, 0.10, 0.20])
    args = parser.parse_args()
    for loss in args.loss:
        runs = [run_model(loss, seconds=args.seconds, seed=s) for s in range(1, args.seeds + 1)]
        mb = sum(r.received for r in runs) / 1e6
        median = statistics.median(r.goodput_mbit for r in runs)
        each = ", ".join(f"{r.goodput_mbit:.1f}" for r in runs)
        cpu = sum(r.cpu_s for r in runs) / mb * 1000
        print(f"loss {loss:4.0%}: goodput median {median:5.1f} Mbit/s ({each});"
              f" CPU {cpu:.0f} ms/MB both ends; lost {[r.lost for r in runs]};"
              f" final state {[r.state for r in runs]}")


if __name__ == "__main__":
    main()
