"""A constant-rate UDP stream with sequence numbers, and the receiver that counts what arrived.

Run in namespaces by tests and benchmarks (python -m pytier.testbed.udp_stream ...):

    recv PORT FIRST COUNT IDLE_S     prints JSON {"received": distinct seqs in [FIRST, FIRST+COUNT),
                                     "datagrams": all datagrams}, after IDLE_S without one (or
                                     60 s in all)
    send HOST PORT COUNT RATE SIZE   COUNT datagrams of SIZE bytes at RATE per second, seq 0..COUNT-1

The sender keeps to an absolute schedule, so a slow moment sends a short burst, not a slower stream.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time

from pytier.testbed.netns import Netns, Testbed

_SEQ = struct.Struct(">I")
MAX_RECEIVE_S = 60.0
_MODULE = [sys.executable, "-m", "pytier.testbed.udp_stream"]


def start_receiver(tb: Testbed, ns: Netns, port: int, first: int, count: int,
                   idle_s: float = 1.5) -> subprocess.Popen[str]:
    """A receiver in `ns`, bound and ready when this returns; read it with `result`."""
    proc = tb.popen(ns, [*_MODULE, "recv", str(port), str(first), str(count), str(idle_s)],
                    stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"UDP receiver on port {port} did not start")
    return proc


def start_sender(tb: Testbed, ns: Netns, ip: str, port: int, count: int, rate: float,
                 size: int) -> subprocess.Popen[str]:
    return tb.popen(ns, [*_MODULE, "send", ip, str(port), str(count), str(rate), str(size)])


def result(proc: subprocess.Popen[str]) -> dict[str, int]:
    """What a receiver counted, once it ended (idle after the stream)."""
    out, _ = proc.communicate(timeout=MAX_RECEIVE_S + 10)
    return dict(json.loads(out.strip().splitlines()[-1]))


def receive(port: int, first: int, count: int, idle_s: float) -> dict[str, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(("0.0.0.0", port))
    print("ready", flush=True)
    seen: set[int] = set()
    datagrams = 0
    end = time.monotonic() + MAX_RECEIVE_S
    sock.settimeout(idle_s)
    while time.monotonic() < end:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            if datagrams:
                break
            continue
        datagrams += 1
        if len(data) >= _SEQ.size:
            seq = _SEQ.unpack_from(data)[0]
            if first <= seq < first + count:
                seen.add(seq)
    sock.close()
    return {"received": len(seen), "datagrams": datagrams}


def send(host: str, port: int, count: int, rate: float, size: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = bytes(max(0, size - _SEQ.size))
    start = time.monotonic()
    for seq in range(count):
        delay = start + seq / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendto(_SEQ.pack(seq) + pad, (host, port))
    sock.close()


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "recv":
        print(json.dumps(receive(int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]))), flush=True)
        return 0
    if len(argv) == 6 and argv[0] == "send":
        send(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), int(argv[5]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
