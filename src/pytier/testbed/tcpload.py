"""Many TCP connections from one asyncio process, each checked byte for byte, for proxy benchmarks and
tests run inside testbed namespaces.

    python -m pytier.testbed.tcpload server --bind 10.144.144.1 --port 7100
    python -m pytier.testbed.tcpload client --host 10.144.144.1 --port 7100 --count 1000 \\
        --concurrency 1000 --up 65536 --down 65536 --hold

Every connection starts with a 16-byte header from the client (connection id, bytes it will send,
bytes it wants back); then both sides send at once. Connection `i`'s bytes in either direction are a
fixed pseudo-random 1 MiB pattern read from an offset that depends on `i` and the direction, so a
byte from the wrong place, the wrong connection or the wrong direction shows. A receiver checks the
sha256 of what it got against the sha256 of the same length of expected bytes: a connection that
ended early still says whether what arrived is a correct prefix.

Without `--hold` each side half-closes once it has sent everything and reads until EOF (complete =
every byte and then EOF). With `--hold` nobody half-closes: the client prints "held" once every
connection has moved its bytes, keeps them all open until a line arrives on its stdin, then closes
them all (the memory benchmark measures while they are held).

The client prints one JSON line per connection with `--per-conn`, and a summary line at the end; the
server prints "listening", then one JSON line per connection it served when `--per-conn` is given.
Every wait is bounded (`--timeout` per connection, from its connect to its outcome).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import struct
import sys
import time
from dataclasses import asdict, dataclass

PATTERN_LEN = 1 << 20
_PATTERN = random.Random(0x5EED).randbytes(PATTERN_LEN) * 2  # doubled: any 1 MiB window is one slice
HEADER = struct.Struct("!QIIB")  # connection id, bytes up, bytes down, held
CHUNK = 16 * 1024
UP, DOWN = 0, 1


def pattern_offset(conn_id: int, direction: int) -> int:
    return (conn_id * 2 + direction) * 7919 % PATTERN_LEN


def expected(conn_id: int, direction: int, start: int, length: int) -> bytes:
    """`length` bytes of connection `conn_id`'s stream in `direction`, from byte `start` on."""
    out = bytearray()
    pos = (pattern_offset(conn_id, direction) + start) % PATTERN_LEN
    while len(out) < length:
        n = min(length - len(out), PATTERN_LEN)
        out += _PATTERN[pos:pos + n]
        pos = (pos + n) % PATTERN_LEN
    return bytes(out)


class Checker:
    """Hashes what arrives and, at the end, the same length of what should have arrived."""

    def __init__(self, conn_id: int, direction: int) -> None:
        self.conn_id = conn_id
        self.direction = direction
        self.received = 0
        self._hash = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self._hash.update(data)
        self.received += len(data)

    def prefix_ok(self) -> bool:
        want = hashlib.sha256()
        for start in range(0, self.received, PATTERN_LEN):
            n = min(PATTERN_LEN, self.received - start)
            want.update(expected(self.conn_id, self.direction, start, n))
        return want.digest() == self._hash.digest()


async def _send(writer: asyncio.StreamWriter, conn_id: int, direction: int, total: int, eof: bool) -> None:
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        writer.write(expected(conn_id, direction, sent, n))
        sent += n
        await writer.drain()
    if eof and writer.can_write_eof():
        writer.write_eof()


async def _receive(reader: asyncio.StreamReader, check: Checker, total: int, until_eof: bool) -> bool:
    """True when `total` bytes (and, with `until_eof`, then EOF) arrived; False on an early EOF."""
    while check.received < total or until_eof:
        data = await reader.read(CHUNK if until_eof else min(CHUNK, total - check.received))
        if not data:
            return check.received == total
        check.feed(data)
    return True


@dataclass
class Outcome:
    id: int
    outcome: str  # complete, eof (ended early), reset, refused, timeout, corrupt
    seconds: float
    sent: int = 0
    received: int = 0
    prefix_ok: bool = True


def _classify(exc: BaseException | None, complete: bool, check: Checker) -> str:
    if not check.prefix_ok():
        return "corrupt"
    if exc is None:
        return "complete" if complete else "eof"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return "reset"


# ---- client ---------------------------------------------------------------------------------------


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.outcomes: list[Outcome] = []
        self.moved = 0
        self.all_moved = asyncio.Event()
        self.release = asyncio.Event()
        self.open_now = 0

    async def one(self, conn_id: int) -> None:
        a = self.args
        t0 = time.monotonic()
        check = Checker(conn_id, DOWN)
        sent = 0
        exc: BaseException | None = None
        complete = False
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(a.timeout):
                reader, writer = await asyncio.open_connection(a.host, a.port)
                self.open_now += 1
                writer.write(HEADER.pack(conn_id, a.up, a.down, a.hold))
                sender = asyncio.ensure_future(_send(writer, conn_id, UP, a.up, eof=not a.hold))
                try:
                    complete = await _receive(reader, check, a.down, until_eof=not a.hold)
                    await sender
                finally:
                    sender.cancel()
                sent = a.up
            if a.hold and complete:
                self.moved += 1
                if self.moved == a.count:
                    self.all_moved.set()
                await self.release.wait()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            exc = e
        finally:
            if writer is not None:
                self.open_now -= 1
                if isinstance(exc, OSError):
                    writer.transport.abort()
                else:
                    writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(5):
                        await writer.wait_closed()
        outcome = Outcome(conn_id, _classify(exc, complete, check), round(time.monotonic() - t0, 3),
                          sent, check.received, check.prefix_ok())
        if a.hold and outcome.outcome != "complete" and not self.all_moved.is_set():
            self.moved += 1  # a failed connection must not keep the others waiting for "held"
            if self.moved == a.count:
                self.all_moved.set()
        self.outcomes.append(outcome)
        if a.per_conn:
            print(json.dumps(asdict(outcome)), flush=True)

    async def run(self) -> dict[str, object]:
        a = self.args
        t0 = time.monotonic()
        limit = asyncio.Semaphore(a.concurrency)

        async def slot(i: int) -> None:
            async with limit:
                await self.one(a.first_id + i)

        tasks = [asyncio.ensure_future(slot(i)) for i in range(a.count)]
        if a.hold:
            await self.all_moved.wait()
            print(json.dumps({"held": self.open_now,
                              "failed": sum(o.outcome != "complete" for o in self.outcomes)}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            self.release.set()
        await asyncio.gather(*tasks)
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        return {"summary": counts, "count": len(self.outcomes), "seconds": round(time.monotonic() - t0, 2),
                "max_seconds": max((o.seconds for o in self.outcomes), default=0.0)}


# ---- server ---------------------------------------------------------------------------------------


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    conn_id = -1
    check = Checker(0, UP)
    exc: BaseException | None = None
    complete = False
    try:
        async with asyncio.timeout(args.timeout):
            conn_id, up, down, held = HEADER.unpack(await reader.readexactly(HEADER.size))
            check = Checker(conn_id, UP)
            sender = asyncio.ensure_future(_send(writer, conn_id, DOWN, down, eof=not held))
            try:
                complete = await _receive(reader, check, up, until_eof=False)
                await sender
            finally:
                sender.cancel()
            # The client's EOF (or, held, its close) ends the connection; more bytes would be a fault.
            extra = await reader.read(1)
            if extra:
                check.feed(extra)
                complete = False
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
        exc = e
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                await writer.wait_closed()
    if args.per_conn and conn_id >= 0:
        outcome = Outcome(conn_id, _classify(exc, complete, check), round(time.monotonic() - t0, 3),
                          down if complete else 0, check.received, check.prefix_ok())
        print(json.dumps(asdict(outcome)), flush=True)


async def serve(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(lambda r, w: _serve_one(r, w, args), args.bind, args.port,
                                        reuse_address=True, backlog=4096)
    print("listening", flush=True)
    async with server:
        await asyncio.sleep(args.lifetime)


def _runner() -> asyncio.Runner:
    """uvloop when installed, as the nodes run: the load generator shares the machine's cores with the
    node it loads, and the default loop spent about a third of what that node did at 5,000
    connections."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--bind", required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds per connection at most")
    srv.add_argument("--lifetime", type=float, default=24 * 3600.0)
    srv.add_argument("--per-conn", action="store_true")
    cli = sub.add_parser("client")
    cli.add_argument("--host", required=True)
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--count", type=int, default=1)
    cli.add_argument("--concurrency", type=int, default=1)
    cli.add_argument("--first-id", type=int, default=0)
    cli.add_argument("--up", type=int, default=1024, help="bytes each connection sends")
    cli.add_argument("--down", type=int, default=1024, help="bytes each connection receives")
    cli.add_argument("--hold", action="store_true")
    cli.add_argument("--timeout", type=float, default=120.0, help="seconds per connection at most")
    cli.add_argument("--per-conn", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "server":
        with _runner() as runner:
            runner.run(serve(args))
        return 0
    # Many sockets at once: the soft limit of open files is often 1024.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with _runner() as runner:
        result = runner.run(Client(args).run())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
