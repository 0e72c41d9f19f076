"""The demo: a small virtual network in namespaces on this machine, then TCP across a lossy path.

    A ---- (link emulator: 20 ms each way, 5% loss each way, 100 Mbit/s) ---- B ---- C

pytier-core runs in A, B and C; C reaches A only through B. The demo pings across the mesh, prints
pytier-cli's tables, then measures TCP from C to A (iperf3, cubic) with plain tunnelled TCP and
through the KCP proxy, and moves a checked file through the proxy. Everything is removed at
the end (namespaces, processes, TUN devices).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

from pytier.testbed.netns import Testbed, iperf3
from pytier.testbed.nodes import PytierNode, tcp_transfer
from pytier.testbed.ping import ping

NET = ["--network-name", "demo", "--network-secret", "demo-secret"]


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def kcp_proxy_available() -> bool:
    return importlib.util.find_spec("pytier.proxy.service") is not None


def run(loss: float, seconds: int, nbytes: int, proxy_flags: list[str], label: str) -> None:
    with Testbed() as tb:
        link = tb.linked_pair(delay_ms=20, loss_pct=loss, rate_mbit=100, queue_ms=50, seed=1,
                              subnet="198.18.10.0/24")
        c = tb.netns("c")
        tb.veth(link.b, c, "198.18.11.2/24", "198.18.11.3/24")
        say(f"{label}: starting pytier-core in A, B and C")
        na = PytierNode(tb, link.a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010",
                                     *proxy_flags], name="node-a").start()
        nb = PytierNode(tb, link.b, [*NET, "-i", "10.144.144.2/24", "-l", "udp://0.0.0.0:11010", "-p",
                                     f"udp://{link.ip_a}:11010", *proxy_flags], name="node-b").start()
        nc = PytierNode(tb, c, [*NET, "-i", "10.144.144.3/24", "--no-listener", "-p",
                                "udp://198.18.11.2:11010", *proxy_flags], name="node-c").start()
        nc.wait_route("10.144.144.1", timeout=60)
        result = ping("10.144.144.1", count=5, interval=0.3, timeout=2, netns=c)
        print(f"ping C -> A (10.144.144.1, through B): {result.received}/5 replies, "
              f"avg {result.avg_ms or 0:.1f} ms")
        say("pytier-cli route (on C)")
        print(nc.cli_table("route"), end="")
        say("pytier-cli peer (on B)")
        print(nb.cli_table("peer"), end="")
        say(f"TCP C -> A: iperf3 -C cubic for {seconds} s, {loss:g}% loss each way on A-B")
        report = iperf3(c, na.ns, "10.144.144.1", ["-C", "cubic", "-t", str(seconds)], timeout=seconds + 60)
        mbit = report["end"]["sum_received"]["bits_per_second"] / 1e6
        print(f"{label}: {mbit:.1f} Mbit/s")
        if proxy_flags:
            sent, sha_sent, sha_received, took = tcp_transfer(tb, na.ns, c, "10.144.144.1", nbytes)
            ok = "intact" if sha_sent == sha_received else "CORRUPTED"
            print(f"{label}: {sent // (1024 * 1024)} MiB file C -> A in {took:.1f} s, sha256 {ok}")
        if proxy_flags:
            say("pytier-cli proxy (on C), shortly after the transfer")
            print(nc.cli_table("proxy"), end="")
        for node in (nc, nb, na):
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="pytier demo in network namespaces")
    parser.add_argument("--loss", type=float, default=5.0, help="random loss each way on A-B, percent")
    parser.add_argument("--seconds", type=int, default=8, help="length of each iperf3 run")
    parser.add_argument("--mib", type=int, default=8, help="size of the checked file transfer")
    args = parser.parse_args()
    started = time.monotonic()
    run(args.loss, args.seconds, args.mib * 1024 * 1024, [], "plain TCP through the tunnel")
    if kcp_proxy_available():
        run(args.loss, args.seconds, args.mib * 1024 * 1024, ["--enable-kcp-proxy"], "KCP proxy")
    else:
        print("\n(this build has no KCP proxy yet; only the plain path was shown)")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; namespaces and processes removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
