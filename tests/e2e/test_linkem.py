"""The link emulator between two namespaces: A -- M (pytier-linkem) -- B."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from pytier.testbed.linkem import DROP, DirParams, LinkCounters, LinkParams, Phase, Shaper
from pytier.testbed.netns import (
    EmulatedLink,
    Netns,
    Testbed,
    iperf3,
    list_namespaces,
    nft_clear_loss,
    nft_input_loss,
)
from pytier.testbed.ping import ping

MAX_FRAME = 1514  # MTU 1500 plus the Ethernet header: anything larger means an offload leaked


SINK = """
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], 7001))
print("listening", flush=True)
srv.settimeout(30)
conn, _ = srv.accept()
conn.settimeout(30)
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(65536):
    digest.update(chunk)
    total += len(chunk)
print(total, digest.hexdigest(), flush=True)
"""

SOURCE = """
import os, socket, sys, hashlib
data = os.urandom(int(sys.argv[2]))
with socket.create_connection((sys.argv[1], 7001), timeout=30) as conn:
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def tcp_transfer(link: EmulatedLink, size: int) -> tuple[str, str]:
    """Send `size` random bytes over TCP from A to B; return what each side counted and hashed."""
    sink = link.b.popen([sys.executable, "-c", SINK, str(link.ip_b)], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "listening"
    sent = link.a.run([sys.executable, "-c", SOURCE, str(link.ip_b), str(size)], timeout=60).stdout
    received, _ = sink.communicate(timeout=30)
    return sent.strip(), received.strip()


# UDP datagrams that start with a 4-byte sequence number, sent at a fixed rate for a bounded time.
UDP_SOURCE = """
import json, socket, sys, time
dst, port, first, count = sys.argv[1], *map(int, sys.argv[2:5])
pps, size = float(sys.argv[5]), int(sys.argv[6])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((dst, port))
pad = bytes(size - 4)
start = time.monotonic()
limit = start + 2 * count / pps + 5
sent = 0
while sent < count and time.monotonic() < limit:
    due = min(count, int((time.monotonic() - start) * pps) + 1)
    while sent < due:
        sock.send((first + sent).to_bytes(4, "big") + pad)
        sent += 1
    time.sleep(0.0005)
print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)
"""

# Records the sequence numbers in arrival order until `idle` seconds pass without a datagram (after
# the first one) or `deadline` seconds in all.
UDP_SINK = """
import json, socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no drops while this loop lags
sock.bind((sys.argv[1], int(sys.argv[2])))
idle, deadline = float(sys.argv[3]), time.monotonic() + float(sys.argv[4])
seqs, nbytes, first, last = [], 0, None, None
sock.settimeout(float(sys.argv[4]))
print("listening", flush=True)
while True:
    try:
        data = sock.recv(65535)
    except TimeoutError:
        break
    last = time.monotonic()
    first = last if first is None else first
    seqs.append(int.from_bytes(data[:4], "big"))
    nbytes += len(data)
    if last >= deadline:
        break
    sock.settimeout(min(idle, deadline - last))
print(json.dumps({"seqs": seqs, "bytes": nbytes, "span": 0.0 if first is None else last - first}), flush=True)
"""

UDP_PORT = 7002
ETH_IP_UDP = 14 + 20 + 8  # header bytes of a frame around a UDP payload


@dataclass
class Arrivals:
    """What a UDP_SINK saw of the datagrams 0 .. sent-1."""

    seqs: list[int]
    bytes: int
    span_s: float  # first to last arrival
    sent: int

    @property
    def missing_runs(self) -> list[int]:
        got = set(self.seqs)
        runs: list[int] = []
        current = 0
        for seq in range(self.sent):
            if seq in got:
                if current:
                    runs.append(current)
                current = 0
            else:
                current += 1
        return [*runs, current] if current else runs

    @property
    def overtaken(self) -> int:
        """Datagrams that arrived after one with a higher sequence number."""
        late, highest = 0, -1
        for seq in self.seqs:
            late += seq < highest
            highest = max(highest, seq)
        return late


def start_sink(
    receiver: Netns, dst: str, *, idle: float = 1.0, deadline: float = 20.0
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", UDP_SINK, dst, str(UDP_PORT), str(idle), str(deadline)]
    sink = receiver.popen(argv, stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "listening"
    return sink


def send_udp(sender: Netns, dst: str, count: int, pps: float, size: int, *, first: int = 0) -> int:
    """Send datagrams first .. first+count-1 at `pps`; return how many went out."""
    argv = [sys.executable, "-c", UDP_SOURCE, dst, str(UDP_PORT), str(first), str(count), str(pps), str(size)]
    sent: int = json.loads(sender.run(argv, timeout=2 * count / pps + 30).stdout)["sent"]
    return sent


def arrivals(sink: subprocess.Popen[str], sent: int) -> Arrivals:
    out, _ = sink.communicate(timeout=30)
    got = json.loads(out)
    return Arrivals(got["seqs"], got["bytes"], got["span"], sent)


def test_clean_link_carries_ping_and_tcp_bytes(testbed: Testbed) -> None:
    link = testbed.linked_pair(seed=1)
    result = ping(link.ip_b, count=3, interval=0.05, netns=link.a)
    assert result.received == 3
    size = 4 << 20
    sent, received = tcp_transfer(link, size)
    assert sent == received
    assert sent.startswith(f"{size} ")
    report = iperf3(link.a, link.b, link.ip_b, ["-t", "1", "-C", "cubic"], timeout=60)
    assert report["end"]["sum_received"]["bytes"] > 0
    counters = link.stop()
    assert link.process.returncode == 0  # SIGTERM is a clean exit
    for direction in (counters.ab, counters.ba):
        assert direction.lost == direction.queue_dropped == direction.send_failed == 0
        assert 0 < direction.max_frame <= MAX_FRAME
    assert counters.ab.passed == counters.ab.received
    assert counters.ab.bytes > size  # every TCP byte crossed the emulator


def test_delay_applies_each_way(testbed: Testbed) -> None:
    link = testbed.linked_pair(delay_ms=50)
    result = ping(link.ip_b, count=5, interval=0.1, timeout=2.0, netns=link.a)
    assert result.received == 5
    assert result.min_ms >= 100.0
    assert result.max_ms < 1000.0


def test_asymmetric_delay(testbed: Testbed) -> None:
    link = testbed.linked_pair(delay_ab=40, delay_ba=10)
    result = ping(link.ip_b, count=3, interval=0.1, timeout=2.0, netns=link.a)
    assert result.received == 3
    assert result.min_ms >= 50.0


def test_random_loss_lies_in_a_plausible_band(testbed: Testbed) -> None:
    link = testbed.linked_pair(loss_pct=30, seed=7)
    result = ping(link.ip_b, count=100, interval=0.01, timeout=1.0, netns=link.a)
    # Expected delivery 0.7 * 0.7 = 49 %, so 51 % loss; the band is about +-5 standard deviations.
    assert 25.0 <= result.loss_pct <= 77.0, result.summary()
    counters = link.stop()
    ab = counters.ab
    assert 100 <= ab.received <= 110  # 100 requests plus a little ARP
    assert 15 <= ab.lost <= 45
    assert ab.passed + ab.lost == ab.received


def test_arp_survives_total_loss(testbed: Testbed) -> None:
    link = testbed.linked_pair(loss_pct=100)
    result = ping(link.ip_b, count=3, interval=0.1, timeout=0.5, netns=link.a)
    assert result.received == 0
    neighbours = json.loads(link.a.run(["ip", "-j", "neigh", "show", "dev", link.if_a]).stdout)
    assert any(n.get("dst") == str(link.ip_b) and "lladdr" in n for n in neighbours), neighbours
    counters = link.stop()
    assert counters.ab.lost >= 3 and counters.ba.lost == 0  # no request ever reached B


def test_rate_cap_limits_tcp(testbed: Testbed) -> None:
    link = testbed.linked_pair(rate_mbit=20)
    report = iperf3(link.a, link.b, link.ip_b, ["-t", "3", "-C", "cubic"], timeout=60)
    received = report["end"]["sum_received"]
    assert received["bytes"] > 0
    assert received["bits_per_second"] < 22e6
    counters = link.stop()
    assert counters.ab.max_frame <= MAX_FRAME


def static_neighbours(link: EmulatedLink) -> None:
    """Permanent neighbour entries at A and B, so that no ARP frame shares the streams' counters."""
    for ns, ifname, peer_ns, peer_if, peer_ip in (
        (link.a, link.if_a, link.b, link.if_b, link.ip_b),
        (link.b, link.if_b, link.a, link.if_a, link.ip_a),
    ):
        mac = json.loads(peer_ns.run(["ip", "-j", "link", "show", "dev", peer_if]).stdout)[0]["address"]
        ns.run(["ip", "neigh", "replace", str(peer_ip), "lladdr", mac, "dev", ifname, "nud", "permanent"])


BURST_AVG = 0.10  # long-run share of frames lost in bursts
BURST_EXIT_PCT = 25.0  # mean burst of 100 / 25 = 4 frames
BURST_ENTER_PCT = BURST_AVG * BURST_EXIT_PCT / (1 - BURST_AVG)  # stationary P(bad) = BURST_AVG
POLICE_MBIT = 20.0
POLICE_BUCKET = 65536
REORDER_PCT, REORDER_MS = 2.0, 10.0


def test_burst_loss_policer_and_reordering_as_measured_by_the_receiver(testbed: Testbed) -> None:
    params = LinkParams.both_ways(
        delay_ms=5,
        rate_mbit=100,
        queue_ms=50,
        burst=(BURST_ENTER_PCT, BURST_EXIT_PCT, 100.0),
        police_mbit=POLICE_MBIT,
        police_bucket_bytes=POLICE_BUCKET,
        reorder_pct=REORDER_PCT,
        reorder_ms=REORDER_MS,
    )
    link = testbed.linked_pair(params=params, seed=5)
    static_neighbours(link)
    # A to B: small datagrams at 15k/s (under 9 Mbit/s, so the policer passes all) for bursts and order.
    sink = start_sink(link.b, str(link.ip_b))
    stream = arrivals(sink, send_udp(link.a, str(link.ip_b), 60_000, 15_000, 32))
    # B to A: full-size datagrams at twice the police rate for 3 s.
    size = 1200
    frame = size + ETH_IP_UDP
    pps = 2 * POLICE_MBIT * 1e6 / 8 / frame
    sink = start_sink(link.a, str(link.ip_a))
    policed = arrivals(sink, send_udp(link.b, str(link.ip_a), int(3 * pps), pps, size))
    counters = link.stop()
    ab, ba = counters.ab, counters.ba
    for d in (ab, ba):
        assert d.socket_dropped == d.send_failed == d.queue_dropped == d.lost == 0, d

    # What arrived is what the emulator counted ...
    # The stream stays below the police rate, unless a busy machine stalled its sender, which then
    # catches up in a burst the bucket cannot take: those few frames are missing too.
    assert ab.received == stream.sent > 50_000 and ab.policed <= stream.sent // 200
    runs = stream.missing_runs
    assert sum(runs) == ab.burst_lost + ab.policed
    assert ab.loss_runs <= len(runs) <= ab.loss_runs + ab.policed
    # A held-back frame is overtaken only if a later one leaves within its extra delay: a sender
    # paused that long by a busy machine leaves a few that nothing overtook.
    assert ab.reordered - max(3, ab.reordered // 100) <= stream.overtaken <= ab.reordered
    # ... and both are what was configured, within about three standard errors of these sample sizes.
    assert ab.burst_lost / stream.sent == pytest.approx(BURST_AVG, rel=0.08)
    assert ab.mean_loss_run() == pytest.approx(100 / BURST_EXIT_PCT, rel=0.08)
    assert sum(runs) / len(runs) == ab.mean_loss_run()
    assert ab.reordered / (stream.sent - ab.burst_lost) == pytest.approx(REORDER_PCT / 100, rel=0.1)

    received = len(policed.seqs) * frame
    assert ba.received == policed.sent and ba.passed == len(policed.seqs) and ba.bytes == received
    assert ba.policed > 0.3 * policed.sent  # about half was over the rate, less what burst loss took
    assert received == pytest.approx(POLICE_MBIT * 1e6 / 8 * policed.span_s + POLICE_BUCKET, rel=0.03)


def wait_for_stderr(capfd: pytest.CaptureFixture[str], text: str, timeout: float = 5.0) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, f"no {text!r} on stderr, only {seen!r}"
        time.sleep(0.02)
        seen += capfd.readouterr().err
    return seen


def test_sigusr2_steps_through_the_phases_under_traffic(
    testbed: Testbed, capfd: pytest.CaptureFixture[str]
) -> None:
    params = LinkParams.both_ways(delay_ms=2, phases=[Phase(loss_pct=50), Phase(loss_pct=0)])
    link = testbed.linked_pair(params=params, seed=3)
    static_neighbours(link)
    dst = str(link.ip_b)
    batch = 1000
    sink = start_sink(link.b, dst, idle=3.0)
    sent = send_udp(link.a, dst, batch, 5000, 100)
    for n in (1, 2):
        link.next_phase()
        said = wait_for_stderr(capfd, f"linkem phase {n}: ")
        if n == 1:
            assert "a->b: delay=2ms loss=50% rate=unlimited b->a: delay=2ms loss=50%" in said
        sent += send_udp(link.a, dst, batch, 5000, 100, first=sent)
    link.next_phase()  # past the last phase: nothing changes
    sent += send_udp(link.a, dst, batch, 5000, 100, first=sent)
    got = arrivals(sink, sent)
    counters = link.stop()
    assert link.process.returncode == 0 and sent == 4 * batch
    assert 0.4 * batch <= counters.ab.lost <= 0.6 * batch
    received = set(got.seqs)
    lost_per_batch = [batch - len(received & set(range(k * batch, (k + 1) * batch))) for k in range(4)]
    assert lost_per_batch == [0, counters.ab.lost, 0, 0]
    assert counters.ab.received == sent  # the queue and counters carried over every switch
    assert "linkem phase 3" not in capfd.readouterr().err


def test_nft_input_loss_drops_only_on_ingress(testbed: Testbed) -> None:
    a = testbed.netns("a")
    b = testbed.netns("b")
    pair = testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    nft_input_loss(b, pair.ifname_b, 100)
    assert ping("198.18.1.2", count=2, interval=0.05, timeout=0.3, netns=a).received == 0
    nft_clear_loss(b, pair.ifname_b)
    assert ping("198.18.1.2", count=2, interval=0.05, timeout=1.0, netns=a).received == 2


def test_linked_pair_refuses_addresses_outside_the_underlay(testbed: Testbed) -> None:
    with pytest.raises(ValueError, match=r"198\.18\.0\.0/15"):
        testbed.linked_pair(subnet="10.0.0.0/24")
    with pytest.raises(ValueError, match=r"198\.18\.0\.0/15"):
        testbed.veth(testbed.netns("x"), testbed.netns("y"), "192.168.1.1/24", None)


def test_command_line_bad_interface_fails_cleanly() -> None:
    argv = [sys.executable, "-m", "pytier.testbed.linkem", "--if-a", "ptnosuch0", "--if-b", "ptnosuch1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("pytier-linkem: ")


# The link model alone, without sockets.


def test_shaper_serialises_at_the_rate_and_keeps_order() -> None:
    shaper = Shaper(DirParams(delay_ms=10, rate_mbit=8), random.Random(0))  # 1 byte per microsecond
    times = [shaper.admit(1000, True, now=1.0) for _ in range(5)]
    assert times == pytest.approx([1.011, 1.012, 1.013, 1.014, 1.015])
    assert shaper.admit(1000, True, now=2.0) == pytest.approx(2.011)  # idle link: no backlog


def test_shaper_drop_tail_spares_arp() -> None:
    shaper = Shaper(DirParams(rate_mbit=8, queue_ms=2.5), random.Random(0))
    outcomes = [shaper.admit(1000, True, now=0.0) for _ in range(10)]
    assert outcomes.count(DROP) == 7  # 1 ms per frame: 3 fit before the backlog passes 2.5 ms
    assert shaper.admit(60, False, now=0.0) != DROP
    assert shaper.counters.queue_dropped == 7


def test_shaper_loss_is_seeded_and_spares_arp() -> None:
    def run(seed: int) -> list[float]:
        s = Shaper(DirParams(loss_pct=50), random.Random(seed))
        return [s.admit(100, True, now=0.0) for _ in range(200)]

    assert run(3) == run(3)
    assert 60 <= run(3).count(DROP) <= 140
    arp_only = Shaper(DirParams(loss_pct=100), random.Random(0))
    assert all(arp_only.admit(60, False, now=0.0) != DROP for _ in range(50))


def test_params_round_trip_through_the_command_line() -> None:
    params = LinkParams.both_ways(delay_ms=20, loss_pct=10, rate_mbit=100, queue_ms=30, loss_ba=0)
    assert params.ba.loss_pct == 0 and params.ab.loss_pct == 10
    argv = params.to_argv()
    assert "--loss-ba" in argv and "--rate-ab" in argv and "--queue-ms" in argv
    with pytest.raises(ValueError):
        DirParams(loss_pct=101)


def test_counters_parse_the_last_report() -> None:
    text = (
        "linkem ready if_a=x if_b=y\n"
        "linkem a->b received=1 passed=1\nlinkem b->a received=2 passed=2\n"
        "linkem a->b received=5 passed=4 lost=1\nlinkem b->a received=6 passed=6\n"
    )
    counters = LinkCounters.parse(text)
    assert (counters.ab.received, counters.ab.lost, counters.ba.received) == (5, 1, 6)
    with pytest.raises(ValueError):
        LinkCounters.parse("linkem ready\n")


def test_testbed_ends_processes_and_namespaces_even_on_error(testbed: Testbed) -> None:
    inner = Testbed(prefix=testbed.prefix + "z")
    with pytest.raises(RuntimeError, match="boom"), inner:
        link = inner.linked_pair(delay_ms=5)
        sleeper = link.b.popen(["sleep", "60"])
        names = [ns.name for ns in inner.namespaces]
        raise RuntimeError("boom")
    assert link.process.poll() is not None and sleeper.poll() is not None
    left = set(names) & set(list_namespaces())
    assert not left
