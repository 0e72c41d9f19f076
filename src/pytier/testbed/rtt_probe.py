"""Small-request round trips over one TCP connection, for benchmarks run inside testbed namespaces.

    python -m pytier.testbed.rtt_probe server --bind 10.144.144.1 --port 7000 --lifetime 60
    python -m pytier.testbed.rtt_probe client --host 10.144.144.1 --port 7000 --count 100 --seconds 6

The server prints "listening", serves one connection (echoing every byte back) and exits; the
client connects, then sends `size`-byte requests one at a time, each answered before the next one
goes, and prints one JSON line: the round trip of every completed request in milliseconds, the
connect time, and whether the run was cut short (time budget spent or an error) with a request
still unanswered. Both ends are bounded in time, so a stalled path cannot hang a benchmark. Both
ends use cubic unless told otherwise (`--congestion`): the testbed namespaces default to BBR.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "percentile"]


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the smallest sample with at least `pct` % of samples at or below it)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def _serve(bind: str, port: int, lifetime: float, congestion: str) -> int:
    deadline = time.monotonic() + lifetime
    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())  # inherited
        lsock.bind((bind, port))
        lsock.listen(1)
        lsock.settimeout(lifetime)
        print("listening", flush=True)
        conn, _ = lsock.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            try:
                data = conn.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            conn.sendall(data)
    return 0


def _recv_exactly(conn: socket.socket, size: int, deadline: float) -> bool:
    got = 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        conn.settimeout(left)
        chunk = conn.recv(size - got)
        if not chunk:
            raise ConnectionError("server closed the connection")
        got += len(chunk)
    return True


def _client(host: str, port: int, size: int, count: int, seconds: float, connect_timeout: float,
            congestion: str) -> int:
    result: dict[str, Any] = {"rtt_ms": [], "connect_ms": None, "cut_short": False, "error": None}
    started = time.monotonic()
    conn = socket.socket()
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        conn.settimeout(connect_timeout)
        conn.connect((host, port))
    except OSError as exc:
        conn.close()
        result["error"] = f"connect: {exc}"
        print(json.dumps(result), flush=True)
        return 1
    result["connect_ms"] = (time.monotonic() - started) * 1000
    request = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    deadline = time.monotonic() + seconds
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for _ in range(count):
                if time.monotonic() >= deadline:
                    break
                sent = time.monotonic()
                conn.sendall(request)
                if not _recv_exactly(conn, size, deadline):
                    result["cut_short"] = True
                    break
                result["rtt_ms"].append((time.monotonic() - sent) * 1000)
        except OSError as exc:
            result["cut_short"] = True
            result["error"] = str(exc)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="small-request TCP round trips (echo server and client)")
    parser.add_argument("--congestion", default="cubic", help="TCP congestion control (default cubic)")
    sub = parser.add_subparsers(dest="role", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--bind", required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--lifetime", type=float, default=60.0, help="seconds before giving up (default 60)")
    cli = sub.add_parser("client")
    cli.add_argument("--host", required=True)
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--size", type=int, default=64, help="request and response bytes (default 64)")
    cli.add_argument("--count", type=int, default=100, help="requests at most (default 100)")
    cli.add_argument("--seconds", type=float, default=6.0, help="time budget for the requests (default 6)")
    cli.add_argument("--connect-timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    if args.role == "server":
        return _serve(args.bind, args.port, args.lifetime, args.congestion)
    if args.size < 1 or args.count < 1:
        parser.error("--size and --count must be at least 1")
    return _client(args.host, args.port, args.size, args.count, args.seconds, args.connect_timeout,
                   args.congestion)


if __name__ == "__main__":
    sys.exit(main())
