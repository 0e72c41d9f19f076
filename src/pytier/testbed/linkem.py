"""pytier-linkem: a small link emulator (delay, random loss, rate with a drop-tail queue).

The test kernel has no netem, so this process stands in for it. It runs in a middle namespace M
that has two veth ends and no addresses, reads every Ethernet frame arriving on one end through an
AF_PACKET socket and sends it out of the other, after applying that direction's link model.

    python -m pytier.testbed.linkem --if-a X --if-b Y --delay-ms 20 --loss 10 --rate-mbit 100

"ab" is the direction from --if-a to --if-b. Loss and queue drops spare ARP frames, so that
neighbour discovery cannot make a lossy test flake; everything else is subject to them. On SIGTERM
or SIGINT it prints one counter line per direction and exits 0; SIGUSR1 prints them and carries on.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TextIO

__all__ = [
    "DirCounters",
    "DirParams",
    "LinkCounters",
    "LinkParams",
    "Shaper",
    "main",
]

ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_SNDBUFFORCE = 32  # not in Python's socket module
SO_RCVBUFFORCE = 33
_PACKET_MREQ = struct.Struct("iHH8s")
_TPACKET_STATS = struct.Struct("II")

DEFAULT_QUEUE_MS = 50.0  # drop-tail limit of a rate-limited direction when none is given
RCVBUF_BYTES = 8 << 20  # room for bursts while the loop is busy with the other direction
FRAME_BUF = 65536  # bytes; larger than any frame an MTU-1500 veth without offloads can carry
READ_BATCH = 256  # frames read from one socket per wake-up before looking at the other
DROP = -1.0  # Shaper.admit's answer for a dropped frame

_ARP_HI, _ARP_LO = ETH_P_ARP >> 8, ETH_P_ARP & 0xFF


@dataclass(frozen=True)
class DirParams:
    """The link model of one direction."""

    delay_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float | None = None
    queue_ms: float | None = None
    queue_bytes: int | None = None

    def __post_init__(self) -> None:
        if not (self.delay_ms >= 0 and math.isfinite(self.delay_ms)):
            raise ValueError(f"delay {self.delay_ms} ms must be a finite number >= 0")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"loss {self.loss_pct} % must be within 0..100")
        if self.rate_mbit is not None and not (self.rate_mbit > 0 and math.isfinite(self.rate_mbit)):
            raise ValueError(f"rate {self.rate_mbit} Mbit/s must be a finite number > 0")
        if self.queue_ms is not None and self.queue_ms < 0:
            raise ValueError(f"queue {self.queue_ms} ms must be >= 0")
        if self.queue_bytes is not None and self.queue_bytes < 0:
            raise ValueError(f"queue {self.queue_bytes} bytes must be >= 0")

    def queue_limit_s(self) -> float:
        """How long a frame may wait for the rate-limited link before drop-tail refuses it."""
        if self.rate_mbit is None:
            return math.inf
        limits = []
        if self.queue_ms is not None:
            limits.append(self.queue_ms / 1000)
        if self.queue_bytes is not None:
            limits.append(self.queue_bytes * 8 / (self.rate_mbit * 1e6))
        return min(limits) if limits else DEFAULT_QUEUE_MS / 1000

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g}Mbit"
        queue = "" if self.rate_mbit is None else f" queue={self.queue_limit_s() * 1000:g}ms"
        return f"delay={self.delay_ms:g}ms loss={self.loss_pct:g}% rate={rate}{queue}"


@dataclass(frozen=True)
class LinkParams:
    ab: DirParams
    ba: DirParams

    @classmethod
    def both_ways(
        cls,
        *,
        delay_ms: float = 0.0,
        loss_pct: float = 0.0,
        rate_mbit: float | None = None,
        queue_ms: float | None = None,
        queue_bytes: int | None = None,
        loss_ab: float | None = None,
        loss_ba: float | None = None,
        delay_ab: float | None = None,
        delay_ba: float | None = None,
        rate_ab: float | None = None,
        rate_ba: float | None = None,
    ) -> LinkParams:
        """Symmetric settings, with optional per-direction overrides."""

        def one(delay: float | None, loss: float | None, rate: float | None) -> DirParams:
            return DirParams(
                delay_ms=delay_ms if delay is None else delay,
                loss_pct=loss_pct if loss is None else loss,
                rate_mbit=rate_mbit if rate is None else rate,
                queue_ms=queue_ms,
                queue_bytes=queue_bytes,
            )

        return cls(one(delay_ab, loss_ab, rate_ab), one(delay_ba, loss_ba, rate_ba))

    def to_argv(self) -> list[str]:
        """Command-line options for this process that reproduce these settings."""
        argv: list[str] = []
        for tag, p in (("ab", self.ab), ("ba", self.ba)):
            argv += [f"--delay-{tag}", repr(p.delay_ms), f"--loss-{tag}", repr(p.loss_pct)]
            if p.rate_mbit is not None:
                argv += [f"--rate-{tag}", repr(p.rate_mbit)]
        if self.ab.queue_ms is not None:
            argv += ["--queue-ms", repr(self.ab.queue_ms)]
        if self.ab.queue_bytes is not None:
            argv += ["--queue-bytes", str(self.ab.queue_bytes)]
        return argv


@dataclass
class DirCounters:
    """What happened to the frames of one direction."""

    received: int = 0  # frames read from the ingress socket
    passed: int = 0  # frames handed to the egress device
    lost: int = 0  # dropped by the random-loss model
    queue_dropped: int = 0  # refused by the drop-tail queue in front of the rate limit
    send_failed: int = 0  # refused by the egress device (ENOBUFS and the like)
    socket_dropped: int = 0  # dropped by the kernel before we could read them (receive buffer full)
    bytes: int = 0  # bytes of the frames passed
    max_frame: int = 0  # largest frame seen, in bytes, Ethernet header included

    def format(self, name: str) -> str:
        return f"linkem {name} " + " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@dataclass
class LinkCounters:
    ab: DirCounters
    ba: DirCounters

    @classmethod
    def parse(cls, text: str) -> LinkCounters:
        """Read the counter lines this program prints; the last report for each direction wins."""
        found: dict[str, DirCounters] = {}
        names = {f.name for f in fields(DirCounters)}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 2 or parts[0] != "linkem" or parts[1] not in ("a->b", "b->a"):
                continue
            values = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
            found[parts[1]] = DirCounters(**{k: int(v) for k, v in values.items() if k in names})
        if set(found) != {"a->b", "b->a"}:
            raise ValueError(f"no complete link emulator counters in {text!r}")
        return cls(found["a->b"], found["b->a"])


class Shaper:
    """The link model of one direction, sans-IO: frame size and arrival time in, delivery time out.

    Rate is modelled as serialisation onto a link that is busy until `busy_until`; a frame that
    would wait longer than the queue limit is dropped (drop-tail). Delivery times never decrease,
    so the caller can hold delayed frames in one FIFO.
    """

    __slots__ = ("_busy_until", "_delay_s", "_loss", "_queue_s", "_rng", "_s_per_byte", "counters")

    def __init__(self, params: DirParams, rng: random.Random) -> None:
        self._delay_s = params.delay_ms / 1000
        self._loss = params.loss_pct / 100
        self._s_per_byte = 0.0 if params.rate_mbit is None else 8 / (params.rate_mbit * 1e6)
        self._queue_s = params.queue_limit_s()
        self._busy_until = 0.0
        self._rng = rng
        self.counters = DirCounters()

    def admit(self, size: int, droppable: bool, now: float) -> float:
        """Return when a frame of `size` bytes arriving at `now` leaves the link, or DROP."""
        c = self.counters
        c.received += 1
        if size > c.max_frame:
            c.max_frame = size
        if droppable and self._loss and self._rng.random() < self._loss:
            c.lost += 1
            return DROP
        if self._s_per_byte:
            start = self._busy_until if self._busy_until > now else now
            if droppable and start - now > self._queue_s:
                c.queue_dropped += 1
                return DROP
            self._busy_until = start + size * self._s_per_byte
            return self._busy_until + self._delay_s
        return now + self._delay_s


def _is_arp(frame: bytearray) -> bool:
    return frame[12] == _ARP_HI and frame[13] == _ARP_LO


def _packet_socket(ifname: str, rcvbuf: int) -> socket.socket:
    # Protocol 0 at creation: the socket hears nothing until bind() names both the device and
    # ETH_P_ALL, so no frame of the other interface can slip in before the bind.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, rcvbuf)
        sock.bind((ifname, ETH_P_ALL))
        index = socket.if_nametoindex(ifname)
        sock.setsockopt(
            SOL_PACKET, PACKET_ADD_MEMBERSHIP, _PACKET_MREQ.pack(index, PACKET_MR_PROMISC, 0, b"")
        )
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Port:
    """One direction's I/O: the ingress socket, the shaper, the FIFO of delayed frames, the egress socket."""

    __slots__ = ("fifo", "rx", "shaper", "tx")

    def __init__(self, rx: socket.socket, tx: socket.socket, shaper: Shaper) -> None:
        self.rx = rx
        self.tx = tx
        self.shaper = shaper
        self.fifo: deque[tuple[float, bytes]] = deque()

    def pump(self, buf: bytearray, view: memoryview) -> None:
        rx_into = self.rx.recv_into
        admit = self.shaper.admit
        fifo = self.fifo
        now = time.monotonic()
        for _ in range(READ_BATCH):
            try:
                n = rx_into(buf)
            except BlockingIOError:
                return
            at = admit(n, not _is_arp(buf), now)
            if at == DROP:
                continue
            if at <= now and not fifo:
                self._send(view[:n])
            else:
                fifo.append((at, bytes(view[:n])))

    def release(self, now: float) -> float:
        """Send every frame due by `now`; return when the next one is due (inf if none)."""
        fifo = self.fifo
        while fifo:
            at, frame = fifo[0]
            if at > now:
                return at
            fifo.popleft()
            self._send(frame)
        return math.inf

    def _send(self, frame: bytes | memoryview) -> None:
        c = self.shaper.counters
        try:
            self.tx.send(frame)
        except OSError:
            c.send_failed += 1
            return
        c.passed += 1
        c.bytes += len(frame)

    def socket_drops(self) -> int:
        # PACKET_STATISTICS resets the kernel's counters on every read, hence the sum.
        _, drops = _TPACKET_STATS.unpack(
            self.rx.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        )
        self.shaper.counters.socket_dropped += drops
        return self.shaper.counters.socket_dropped


class Emulator:
    """Bridges two interfaces through one Shaper per direction, in a single epoll loop."""

    def __init__(
        self, if_a: str, if_b: str, params: LinkParams, seed: int | None = None, rcvbuf: int = RCVBUF_BYTES
    ) -> None:
        self.if_a = if_a
        self.if_b = if_b
        self.params = params
        base = random.Random(seed).getrandbits(64)
        self._sock_a = _packet_socket(if_a, rcvbuf)
        try:
            self._sock_b = _packet_socket(if_b, rcvbuf)
        except BaseException:
            self._sock_a.close()
            raise
        self.ab = _Port(self._sock_a, self._sock_b, Shaper(params.ab, random.Random(f"{base}-ab")))
        self.ba = _Port(self._sock_b, self._sock_a, Shaper(params.ba, random.Random(f"{base}-ba")))
        self._stop = False
        self._dump = False

    @property
    def counters(self) -> LinkCounters:
        return LinkCounters(self.ab.shaper.counters, self.ba.shaper.counters)

    def report(self, out: TextIO) -> None:
        self.ab.socket_drops()
        self.ba.socket_drops()
        out.write(self.ab.shaper.counters.format("a->b") + "\n")
        out.write(self.ba.shaper.counters.format("b->a") + "\n")
        out.flush()

    def request_stop(self) -> None:
        self._stop = True

    def request_report(self) -> None:
        self._dump = True

    def run(self, wake_fd: int, out: TextIO) -> None:
        """Bridge frames until request_stop(); `wake_fd` becomes readable when a signal arrives."""
        buf = bytearray(FRAME_BUF)
        view = memoryview(buf)
        ep = select.epoll()
        fd_a, fd_b = self._sock_a.fileno(), self._sock_b.fileno()
        ab, ba = self.ab, self.ba
        try:
            for fd in (fd_a, fd_b, wake_fd):
                ep.register(fd, select.EPOLLIN)
            poll = ep.poll
            monotonic = time.monotonic
            next_due = math.inf
            while not self._stop:
                timeout = -1.0 if next_due == math.inf else max(0.0, next_due - monotonic())
                for fd, _ in poll(timeout):
                    if fd == fd_a:
                        ab.pump(buf, view)
                    elif fd == fd_b:
                        ba.pump(buf, view)
                    else:
                        _drain(wake_fd)
                now = monotonic()
                next_due = min(ab.release(now), ba.release(now))
                if self._dump:
                    self._dump = False
                    self.report(out)
        finally:
            ep.close()

    def close(self) -> None:
        self._sock_a.close()
        self._sock_b.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytier-linkem", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--if-a", required=True, help="first interface (frames from it go out of --if-b)")
    p.add_argument("--if-b", required=True, help="second interface")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, both directions")
    p.add_argument("--loss", type=float, default=0.0, help="random loss in percent, both directions")
    p.add_argument("--rate-mbit", type=float, default=None, help="rate limit in Mbit/s, both directions")
    p.add_argument(
        "--queue-ms",
        type=float,
        default=None,
        help=f"drop-tail queue limit in ms of serialisation (default {DEFAULT_QUEUE_MS:g})",
    )
    p.add_argument("--queue-bytes", type=int, default=None, help="drop-tail queue limit in bytes")
    for tag, desc in (("ab", "a to b"), ("ba", "b to a")):
        p.add_argument(f"--delay-{tag}", type=float, default=None, help=f"one-way delay {desc}, ms")
        p.add_argument(f"--loss-{tag}", type=float, default=None, help=f"loss {desc}, percent")
        p.add_argument(f"--rate-{tag}", type=float, default=None, help=f"rate {desc}, Mbit/s")
    p.add_argument("--seed", type=int, default=None, help="seed for the loss draws (default: random)")
    p.add_argument("--rcvbuf", type=int, default=RCVBUF_BYTES, help="socket buffer size in bytes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        params = LinkParams.both_ways(
            delay_ms=args.delay_ms,
            loss_pct=args.loss,
            rate_mbit=args.rate_mbit,
            queue_ms=args.queue_ms,
            queue_bytes=args.queue_bytes,
            loss_ab=args.loss_ab,
            loss_ba=args.loss_ba,
            delay_ab=args.delay_ab,
            delay_ba=args.delay_ba,
            rate_ab=args.rate_ab,
            rate_ba=args.rate_ba,
        )
        emu = Emulator(args.if_a, args.if_b, params, seed=args.seed, rcvbuf=args.rcvbuf)
    except (ValueError, OSError) as exc:
        print(f"pytier-linkem: {exc}", file=sys.stderr)
        return 2
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda *_: emu.request_stop())
    signal.signal(signal.SIGINT, lambda *_: emu.request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: emu.request_report())
    out = sys.stdout
    out.write(
        f"linkem ready if_a={args.if_a} if_b={args.if_b} "
        f"a->b: {params.ab.describe()} b->a: {params.ba.describe()}\n"
    )
    out.flush()
    try:
        emu.run(wake_r.fileno(), out)
    finally:
        emu.report(out)
        emu.close()
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
