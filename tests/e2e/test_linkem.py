"""The link emulator between two namespaces: A -- M (pytier-linkem) -- B."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from pytier.testbed.linkem import DROP, DirParams, LinkCounters, LinkParams, Shaper
from pytier.testbed.netns import (
    EmulatedLink,
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
