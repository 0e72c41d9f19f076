"""pytier-linkem's link model without AF_PACKET sockets: Shaper decisions, the two FIFOs, the options."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from pytier.testbed.linkem import (
    DROP,
    OFF,
    DirCounters,
    DirParams,
    LinkCounters,
    LinkParams,
    Phase,
    Shaper,
    _Port,
)

FRAMES = 200_000
ETHER_IPV4 = b"\x08\x00"
ETHER_ARP = b"\x08\x06"


def burst_params(avg_loss: float = 0.05, mean_burst: float = 8.0) -> DirParams:
    """Burst loss of `avg_loss` on average in runs of `mean_burst` frames (the bad state loses all)."""
    exit_ = 1 / mean_burst
    enter = avg_loss * exit_ / (1 - avg_loss)
    return DirParams(burst_enter_pct=enter * 100, burst_exit_pct=exit_ * 100, burst_loss_pct=100)


def test_burst_loss_matches_the_average_and_the_mean_burst() -> None:
    shaper = Shaper(burst_params(), random.Random(1))
    for i in range(FRAMES):
        shaper.admit(100, True, now=i * 1e-5)
    c = shaper.counters
    assert c.lost == 0
    assert c.burst_lost / FRAMES == pytest.approx(0.05, rel=0.1)
    assert c.mean_loss_run() == pytest.approx(8.0, rel=0.05)
    assert c.passed == 0  # only the port counts what it sends


def test_loss_runs_join_random_and_burst_losses() -> None:
    shaper = Shaper(DirParams(loss_pct=100, burst_enter_pct=50, burst_loss_pct=100), random.Random(0))
    for _ in range(100):
        assert shaper.admit(100, True, now=0.0) == DROP
    c = shaper.counters
    assert (c.lost, c.burst_lost, c.loss_runs) == (100, 0, 1)  # random loss comes first
    assert c.mean_loss_run() == 100.0

    alternate = Shaper(DirParams(loss_pct=50), random.Random(7))
    outcomes = [alternate.admit(100, True, now=0.0) == DROP for _ in range(10_000)]
    runs = sum(1 for k, lost in enumerate(outcomes) if lost and (k == 0 or not outcomes[k - 1]))
    assert alternate.counters.loss_runs == runs
    assert alternate.counters.mean_loss_run() == pytest.approx(2.0, rel=0.05)  # geometric, p = 1/2


def test_policer_passes_its_rate_plus_the_bucket() -> None:
    shaper = Shaper(DirParams(police_mbit=8, police_bucket_bytes=65536), random.Random(0))  # 1 MB/s
    span, size = 3.0, 1000
    passed = sum(
        size for i in range(int(span * 2000)) if shaper.admit(size, True, now=i / 2000) != DROP
    )  # 2 MB/s offered
    assert 1e6 * span + 65536 - 2 * size <= passed <= 1e6 * span + 65536
    assert shaper.counters.policed == int(span * 2000) - passed // size


def test_policer_sees_only_what_loss_left_and_arp_is_never_policed() -> None:
    # Offered at twice the policed rate but three quarters lost first: nearly all the rest conforms.
    shaper = Shaper(DirParams(loss_pct=75, police_mbit=8, police_bucket_bytes=2000), random.Random(3))
    for i in range(4000):
        shaper.admit(1000, True, now=i / 2000)
    assert shaper.counters.policed < 0.02 * 4000
    arp = Shaper(DirParams(police_mbit=0.001, police_bucket_bytes=100), random.Random(0))
    assert all(arp.admit(60, False, now=0.0) != DROP for _ in range(100))


def test_order_is_loss_then_policer_then_queue() -> None:
    shaper = Shaper(
        DirParams(rate_mbit=8, queue_ms=1.5, police_mbit=8, police_bucket_bytes=2500), random.Random(0)
    )
    outcomes = [shaper.admit(1000, True, now=0.0) for _ in range(4)]
    # Two frames fit the bucket and the queue; the third is policed before it could meet the queue.
    assert outcomes[:2] == pytest.approx([0.001, 0.002]) and outcomes[2:] == [DROP, DROP]
    assert (shaper.counters.policed, shaper.counters.queue_dropped) == (2, 0)


def test_reorder_holds_back_the_share_and_spares_arp() -> None:
    shaper = Shaper(DirParams(delay_ms=20, reorder_pct=2, reorder_ms=10), random.Random(5))
    held = 0
    for i in range(FRAMES):
        at = shaper.admit(100, True, now=i * 1e-4)
        assert at == pytest.approx(i * 1e-4 + (0.03 if shaper.held_back else 0.02))
        held += shaper.held_back
    assert held == shaper.counters.reordered
    assert held / FRAMES == pytest.approx(0.02, rel=0.05)
    all_held = Shaper(DirParams(reorder_pct=100, reorder_ms=10), random.Random(0))
    all_held.admit(60, False, now=0.0)
    assert not all_held.held_back and all_held.counters.reordered == 0


def test_set_params_keeps_backlog_and_counters() -> None:
    shaper = Shaper(DirParams(rate_mbit=8, queue_ms=100), random.Random(0))
    for _ in range(3):
        shaper.admit(1000, True, now=0.0)  # busy until 3 ms
    shaper.set_params(DirParams(rate_mbit=8, queue_ms=100, delay_ms=10, loss_pct=100))
    assert shaper.admit(1000, True, now=0.0) == DROP
    shaper.set_params(DirParams(rate_mbit=8, queue_ms=100, delay_ms=10))
    assert shaper.admit(1000, True, now=0.0) == pytest.approx(0.004 + 0.010)
    assert (shaper.counters.received, shaper.counters.lost) == (5, 1)


# --- the two FIFOs of a port, over Unix datagram sockets instead of AF_PACKET ------------------


def frame(seq: int, ethertype: bytes = ETHER_IPV4) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype + struct.pack("!I", seq) + bytes(46)


@pytest.fixture
def socket_pairs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    feed, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx, out = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (rx, out):
        s.setblocking(False)
    yield feed, rx, tx, out
    for s in (feed, rx, tx, out):
        s.close()


def test_port_sends_held_back_frames_after_the_ones_that_overtake_them(
    socket_pairs: tuple[socket.socket, socket.socket, socket.socket, socket.socket],
) -> None:
    feed, rx, tx, out = socket_pairs
    shaper = Shaper(DirParams(delay_ms=5, reorder_pct=20, reorder_ms=30), random.Random(2))
    port = _Port(rx, tx, shaper)
    buf = bytearray(2048)
    count = 100
    for seq in range(count):
        feed.send(frame(seq))
    port.pump(buf, memoryview(buf))
    assert shaper.counters.received == count
    order: list[int] = []
    deadline = time.monotonic() + 10
    while len(order) < count and time.monotonic() < deadline:
        due = port.release(time.monotonic())
        while True:
            try:
                order.append(struct.unpack_from("!I", out.recv(2048), 14)[0])
            except BlockingIOError:
                break
        if due != float("inf"):
            time.sleep(max(0.0, min(due - time.monotonic(), 0.05)))
    assert sorted(order) == list(range(count))
    held = shaper.counters.reordered
    assert 0 < held < count
    # All frames were admitted at once: those on time first, in order, then the held-back ones, in order.
    on_time, late = order[: count - held], order[count - held :]
    assert on_time == sorted(on_time) and late == sorted(late) and late[0] < on_time[-1]


def test_port_keeps_arp_in_order_under_total_loss(
    socket_pairs: tuple[socket.socket, socket.socket, socket.socket, socket.socket],
) -> None:
    feed, rx, tx, out = socket_pairs
    shaper = Shaper(
        DirParams(loss_pct=100, burst_enter_pct=100, burst_loss_pct=100, reorder_pct=100, reorder_ms=1),
        random.Random(0),
    )
    port = _Port(rx, tx, shaper)
    buf = bytearray(2048)
    for seq in range(10):
        feed.send(frame(seq, ETHER_ARP if seq % 2 else ETHER_IPV4))
    port.pump(buf, memoryview(buf))
    port.release(time.monotonic())
    got = []
    while True:
        try:
            got.append(struct.unpack_from("!I", out.recv(2048), 14)[0])
        except BlockingIOError:
            break
    assert got == [1, 3, 5, 7, 9]
    assert shaper.counters.lost == 5 and shaper.counters.reordered == 0


# --- options, phases, validation -----------------------------------------------------------------


def everything() -> LinkParams:
    return LinkParams.both_ways(
        delay_ms=20,
        loss_pct=1,
        rate_mbit=100,
        queue_ms=50,
        burst=(0.6578947368421053, 12.5, 100.0),
        burst_ba=(1.0, 20.0, 50.0),
        police_mbit=30,
        police_ab=40,
        police_bucket_bytes=32768,
        reorder_pct=2,
        reorder_ms=10,
        reorder_ba=(5.0, 3.5),
        loss_ab=0.5,
        delay_ba=30,
        phases=(
            Phase(loss_pct=10),
            Phase(),
            Phase(delay_ms=100, rate_mbit=OFF, burst=(1, 10, 100), police_mbit=OFF, reorder=(0, 0)),
            Phase(rate_mbit=50.5, police_mbit=12.25, reorder=(1, 2)),
        ),
    )


@pytest.mark.parametrize(
    "params",
    [
        LinkParams.both_ways(),
        LinkParams.both_ways(delay_ms=20, loss_pct=10, rate_mbit=100, queue_ms=30, loss_ba=0),
        LinkParams.both_ways(police_ba=30),
        LinkParams.both_ways(burst=(0.0, 50.0, 0.0)),  # off, but not the default numbers
        LinkParams.both_ways(rate_mbit=10, queue_bytes=20000),
        everything(),
    ],
)
def test_params_round_trip_through_the_command_line(params: LinkParams) -> None:
    assert LinkParams.from_argv(params.to_argv()) == params


def test_argv_names_every_option() -> None:
    argv = everything().to_argv()
    for flag in ("--burst-ab", "--burst-ba", "--police-ab", "--police-ba", "--police-bucket"):
        assert flag in argv
    assert argv.count("--reorder-ab") == argv.count("--reorder-ba") == 1
    assert argv.count("--phase") == 4
    argv = ["--burst", "1,12.5,100", "--police-mbit", "30", "--reorder-pct", "2", "--reorder-ms", "10"]
    argv += ["--reorder-ba", "0,0", "--phase", "loss=10,burst=2/10/50", "--phase", ""]
    both = LinkParams.from_argv(argv)
    assert both.ab.burst == both.ba.burst == (1.0, 12.5, 100.0)
    assert both.ab.police_mbit == both.ba.police_mbit == 30
    assert both.ab.reorder == (2.0, 10.0) and both.ba.reorder == (0.0, 0.0)
    assert both.phases == (Phase(loss_pct=10.0, burst=(2.0, 10.0, 50.0)), Phase())


def test_phases_apply_on_top_of_each_direction() -> None:
    params = everything()
    assert params.phase_params(0) == (params.ab, params.ba)
    ab, ba = params.phase_params(1)
    assert ab.loss_pct == ba.loss_pct == 10
    assert (ab.delay_ms, ba.delay_ms, ab.police_mbit, ba.police_mbit) == (20, 30, 40, 30)
    assert params.phase_params(2) == (params.ab, params.ba)
    ab, ba = params.phase_params(3)
    assert ab.rate_mbit is None and ab.police_mbit is None and ba.police_mbit is None
    assert ab.burst == ba.burst == (1, 10, 100) and ab.reorder == (0, 0)
    assert ab.loss_pct == 0.5 and ab.queue_ms == 50
    assert "burst=" in ab.describe() and "police=" not in ab.describe()
    assert "police=40Mbit/32768B" in params.ab.describe() and "reorder=2%/10ms" in params.ab.describe()
    assert "burst=" not in DirParams().describe()


def test_phase_spec_round_trips_and_refuses_nonsense() -> None:
    phase = Phase.parse("delay=5,loss=12.5,rate=off,burst=1/2/3,police=7,reorder=4/5")
    assert phase == Phase(5, 12.5, OFF, (1, 2, 3), 7, (4, 5))
    assert Phase.parse(phase.spec()) == phase
    assert Phase.parse("") == Phase()
    for bad, message in (
        ("jitter=5", "not one of"),
        ("loss", "not one of"),
        ("loss=1,loss=2", "twice"),
        ("burst=1/2", "3 numbers"),
        ("reorder=1,5", "2 numbers"),
        ("delay=soon", "delay=soon"),
    ):
        with pytest.raises(ValueError, match=message):
            Phase.parse(bad)
    with pytest.raises(ValueError, match=r"phase 1 \(loss=150\): loss 150 %"):
        LinkParams.both_ways(phases=[Phase(loss_pct=150)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"burst_enter_pct": -1}, "burst enter -1 %"),
        ({"burst_exit_pct": 101}, "burst exit 101 %"),
        ({"burst_loss_pct": 200}, "burst loss 200 %"),
        ({"police_mbit": 0}, "police rate 0 Mbit/s"),
        ({"police_mbit": float("inf")}, "police rate inf"),
        ({"police_bucket_bytes": 0}, "police bucket 0 bytes"),
        ({"reorder_pct": 101, "reorder_ms": 1}, "reorder share 101 %"),
        ({"reorder_ms": -1}, "reorder delay -1 ms"),
        ({"reorder_pct": 5}, "needs a reorder delay"),
        ({"loss_pct": 101}, "loss 101 %"),
    ],
)
def test_dir_params_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DirParams(**kwargs)


def test_from_argv_raises_on_bad_options() -> None:
    with pytest.raises(ValueError, match="burst ENTER,EXIT,LOSS"):
        LinkParams.from_argv(["--burst", "1,2"])
    with pytest.raises(ValueError, match="unrecognized"):
        LinkParams.from_argv(["--jitter", "3"])
    with pytest.raises(ValueError, match="police bucket"):
        LinkParams.from_argv(["--police-bucket", "0"])


def test_counters_carry_the_new_fields_and_still_parse_old_lines() -> None:
    c = DirCounters(received=10, lost=2, burst_lost=4, policed=1, reordered=3, loss_runs=2)
    text = c.format("a->b") + "\n" + DirCounters(received=1).format("b->a") + "\n"
    parsed = LinkCounters.parse(text)
    assert parsed.ab == c and parsed.ab.mean_loss_run() == 3.0
    old = LinkCounters.parse("linkem a->b received=5 passed=4 lost=1\nlinkem b->a received=6 passed=6\n")
    assert old.ab.lost == 1 and old.ab.loss_runs == 0 and old.ab.mean_loss_run() == 0.0
